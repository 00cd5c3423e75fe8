"""Publishing stage: the release folder round-trips bit for bit for every architecture, SAELens's own
loader reads it with equal outputs (in a separate virtual environment), and the Hub upload path works
against a loopback Hub (tests/hub_server.py): files arrive equal, a rerun sends nothing, an interrupted
upload resumes and is never presented as complete, the token never reaches a log. Also S3 (moto) as a
target, dry runs, the command line and bad input. No test touches the internet.

Xet: these Hub tests run with HF_HUB_DISABLE_XET=1, over the LFS "basic" transfer. With hf_xet installed
(it is, and the real Hub uploads through it), huggingface_hub sends every LFS file through Xet: it asks
the Hub for /api/models/<repo>/xet-write-token/<revision> and hf_xet then uploads chunked, compressed
xorbs and binary shards to the content-addressed store that token names, and downloads by asking that
store for a file's reconstruction. The loopback Hub implements none of that (storing and serving Xet
content means reading both binary formats), so hf_xet's chunking, deduplication, token refresh,
upload and download are not covered here; test_xet_is_what_the_client_uses_when_enabled checks the
first step, so that this note goes stale visibly. Covered either way: which files are sent (the tree
listing's LFS sha256 and blob ids, which the Hub lists for Xet-backed files too), the commit order that
keeps an interrupted release incomplete, the errors, and the token's path (docs/saelens.md)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pipeline.publish as P
import pipeline.sae as S
from pipeline.errors import ConfigError, InputNotFoundError, UserError
from pipeline.publish import (MissingMetricsError, OutDirNotEmptyError, PublishAuthError, PublishConfig,
                              PublishIncompleteError, ReleaseIncompleteError, run)
from pipeline.analysis.release import parse_hf_url
from pipeline.publish.inputs import transformer_lens_hook
from pipeline.sae.checkpoint import CheckpointFormatError, save_config, save_shard

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402
from saelens_venv import run_saelens  # noqa: E402

TOKEN = "hf_TESTsecretTOKEN0123456789"
OTHER_TOKEN = "hf_OTHERsecretTOKEN987654321"
D, N = 16, 64
SCALE = 2.5
ROOT = Path(__file__).resolve().parent.parent


def make_export(folder: Path, arch: str, hook: str, feature_shards: int = 1, seed: int = 0) -> Path:
    """An exported SAE with every tensor non-trivial, written as training writes it (optionally as
    several feature shards, as a feature-parallel run exports)."""
    cfg = S.SAEConfig(architecture=arch, n_features=N, d_model=D, k=4)
    sae = S.create(cfg)
    sae.reset_parameters(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.add_(0.05 * torch.randn(N, D, generator=g))
        sae.b_enc.copy_(0.1 * torch.randn(N, generator=g))
        sae.b_dec.copy_(torch.randn(D, generator=g))
        if arch == "jumprelu":
            sae.log_threshold.copy_(-1.5 + 0.5 * torch.randn(N, generator=g))
        if arch == "batchtopk":
            sae.threshold.fill_(0.37)
    meta = {"hook": hook, "model": {"id": "HuggingFaceTB/SmolLM2-135M", "revision": None},
            "training": {"steps": 10, "tokens": 40960}}
    bounds = [round(i * N / feature_shards) for i in range(feature_shards + 1)]
    shards = [range(bounds[i], bounds[i + 1]) for i in range(feature_shards)]
    for i, r in enumerate(shards):
        part = S.create(cfg, features=r)
        part.load_state_dict({k: (v[r.start:r.stop] if k in part.feature_tensors else v)
                              for k, v in sae.state_dict().items()})
        save_shard(part, folder, SCALE, i, feature_shards)
    save_config(folder, cfg, shards, SCALE, meta)
    return folder


def make_eval(folder: Path, with_extras: bool = True, dashboard: Path | None = None) -> Path:
    """What pipeline.evaluate writes (metrics.json with per-feature density, density_histogram.png) and
    what pipeline.interpret writes (a dashboard folder), small."""
    folder.mkdir(parents=True, exist_ok=True)
    density = [round(0.5 ** (i % 12), 6) if i % 7 else 0.0 for i in range(N)]
    (folder / "metrics.json").write_text(json.dumps({
        "mse": 1.25, "fvu": 0.125, "l0": 4.0, "dead_fraction": 0.14, "n_tokens_reconstruction": 4096,
        "downstream": {"ce_loss_recovered": 0.93}, "feature_density": density}))
    if with_extras:
        from PIL import Image
        Image.new("RGB", (8, 6), (200, 30, 30)).save(folder / "density_histogram.png")
        dashboard = dashboard or folder / "dashboard"
        (dashboard / "features").mkdir(parents=True)
        (dashboard / "index.html").write_text("<html><body>index</body></html>")
        (dashboard / "features" / "0.html").write_text("<html><body>feature 0</body></html>")
    return folder


BARE = "relu_l1"
"""The architecture whose run has metrics only: no histogram, no dashboard."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One training run folder per architecture: <run>/sae (export), <run>/eval (the evaluation's out_dir)
    and, but for BARE, <run>/interpret (the interpretation's out_dir: the dashboard)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for i, arch in enumerate(S.ARCHITECTURES):
        run_dir = root / arch
        make_export(run_dir / "sae", arch, f"model.layers.{i}", feature_shards=2 if arch == "topk" else 1, seed=i)
        make_eval(run_dir / "eval", with_extras=arch != BARE, dashboard=run_dir / "interpret")
        out[arch] = run_dir
    return out


def given(runs: dict[str, Path], *archs: str) -> dict[str, list[str]]:
    """What publish is given for these runs: each export, its evaluation's and its dashboard's folder."""
    return {"checkpoints": [str(runs[a] / "sae") for a in archs], "eval_dirs": [str(runs[a] / "eval") for a in archs],
            "dashboard_dirs": ["" if a == BARE else str(runs[a] / "interpret") for a in archs]}


def dense_latents(sae, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        f = sae.encode(x)
        if isinstance(f, tuple):  # topk, batchtopk: (values, indices)
            vals, idx = f
            return torch.zeros(x.shape[0], sae.cfg.n_features).scatter_add_(1, idx, vals)  # padding repeats index 0
        return f


def inputs(seed: int = 0, n: int = 48) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 3


def assert_same_sae(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{k} differs"
    x = inputs()
    with torch.no_grad():
        ea, eb = a.encode(x), b.encode(x)
        for u, v in zip(ea if isinstance(ea, tuple) else [ea], eb if isinstance(eb, tuple) else [eb]):
            assert torch.equal(u, v)
        assert torch.equal(a(x).x_hat, b(x).x_hat)


# --- the release folder -----------------------------------------------------------------------------

@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("arch", S.ARCHITECTURES)
def test_round_trip_is_bit_identical(runs, tmp_path, arch, sharded):
    """export -> release folder -> pipeline.publish.load: the same tensors and the same outputs."""
    res = run(PublishConfig(**given(runs, arch), out_dir=str(tmp_path / "rel"),
                            max_shard_size="3kB" if sharded else "5GB", progress=False))
    folder = res.folder / res.sae_ids[0]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.match("*sae_weights*"))
    if sharded:  # shard folders, each SAELens's layout over a feature range, and the index
        shard_dirs = sorted(p.parent for p in folder.glob("shards/*/sae_weights.safetensors"))
        assert len(shard_dirs) > 1 and all((d / "cfg.json").is_file() for d in shard_dirs)
        assert files == ["sae_weights.safetensors.index.json"] + [
            f"shards/{i + 1:05d}-of-{len(shard_dirs):05d}/sae_weights.safetensors" for i in range(len(shard_dirs))]
    else:
        assert files == ["sae_weights.safetensors"]
    assert_same_sae(S.load(runs[arch] / "sae"), P.load(folder))


def test_release_follows_the_saelens_layout(runs, tmp_path):
    import yaml
    res = run(PublishConfig(**given(runs, *S.ARCHITECTURES),
                            out_dir=str(tmp_path / "rel"), repo_id="alice/saes", dry_run=True, progress=False))
    assert res.sae_ids == [f"model.layers.{i}" for i in range(4)]
    expect = {"relu_l1": ("standard", False), "topk": ("topk", True), "jumprelu": ("jumprelu", False),
              "batchtopk": ("jumprelu", True)}
    for i, arch in enumerate(S.ARCHITECTURES):
        folder = res.folder / f"model.layers.{i}"
        cfg = json.loads((folder / "cfg.json").read_text())
        assert (cfg["architecture"], cfg["apply_b_dec_to_input"]) == expect[arch]
        assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["normalize_activations"]) == (D, N, "float32", "none")
        assert cfg["metadata"]["hook_name"] == f"blocks.{i}.hook_resid_post"
        assert cfg["metadata"]["model_name"] == "HuggingFaceTB/SmolLM2-135M"
        assert cfg["metadata"]["sae_lens_version"].startswith("6.")
        if arch == "topk":
            assert cfg["k"] == 4 and cfg["rescale_acts_by_decoder_norm"] is False
        w = load_file(str(folder / "sae_weights.safetensors"))
        shapes = {"W_enc": (D, N), "W_dec": (N, D), "b_enc": (N,), "b_dec": (D,)}
        if arch in ("jumprelu", "batchtopk"):
            shapes["threshold"] = (N,)
        assert {k: tuple(v.shape) for k, v in w.items()} == shapes
        assert all(v.dtype == torch.float32 for v in w.values())
        density = torch.tensor(json.loads((runs[arch] / "eval" / "metrics.json").read_text())["feature_density"])
        sparsity = load_file(str(folder / "sparsity.safetensors"))["sparsity"]
        assert torch.allclose(sparsity, torch.log10(density.float() + 1e-10))
        manifest = json.loads((folder / "release.json").read_text())
        on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"release.json"}
        assert set(manifest["files"]) == on_disk
        assert (arch == "relu_l1") != ("dashboard/index.html" in on_disk and "density_histogram.png" in on_disk)
    text = (res.folder / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "saelens" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert {"sparse-autoencoder", "saelens", *S.ARCHITECTURES} <= set(meta["tags"])
    for needle in ("| fvu | 0.125 |", "| downstream.ce_loss_recovered | 0.93 |", "model.layers.1/density_histogram.png", '"k": 4',
                   'SAE.from_pretrained("alice/saes", "model.layers.0")',
                   'pipeline.publish.load("hf://alice/saes/model.layers.0")'):
        assert needle in text, needle


def test_demo_layout_with_explicit_eval_and_dashboard_dirs(tmp_path):
    """As `make demo` lays out a run: train/<arch>/sae, evaluate/, interpret/ side by side."""
    from pipeline.errors import ConfigError
    ckpt = make_export(tmp_path / "train" / "topk" / "sae", "topk", "model.layers.15")
    make_eval(tmp_path / "evaluate", dashboard=tmp_path / "interpret")
    res = run(PublishConfig(checkpoints=[str(ckpt)], eval_dirs=[str(tmp_path / "evaluate")],
                            dashboard_dirs=[str(tmp_path / "interpret")], out_dir=str(tmp_path / "rel")))
    folder = res.folder / "model.layers.15"
    assert (folder / "dashboard" / "features" / "0.html").is_file() and (folder / "density_histogram.png").is_file()
    with pytest.raises(ConfigError, match="eval_dirs has 1 entries for 2 checkpoints"):
        PublishConfig(checkpoints=[str(ckpt), str(ckpt)], eval_dirs=[str(tmp_path)])
    with pytest.raises(ConfigError, match="repo_id='nope' must be owner/name"):
        PublishConfig(repo_id="nope")
    with pytest.raises(ConfigError, match="like 500MB"):
        PublishConfig(max_shard_size="lots")


def test_missing_metrics_is_a_clear_error(tmp_path):
    ckpt = make_export(tmp_path / "run" / "sae", "topk", "model.layers.2")
    with pytest.raises(MissingMetricsError, match=r"no evaluation metrics.*metrics\.json.*pipeline\.evaluate"
                                                  r".*eval_dirs=.*require_metrics=false") as e:
        run(PublishConfig(checkpoints=[str(ckpt)], eval_dirs=[str(tmp_path / "run" / "eval")],
                          out_dir=str(tmp_path / "rel"), repo_id="alice/x"))
    assert str(tmp_path / "run" / "eval" / "metrics.json") in str(e.value)  # the missing path
    assert not (tmp_path / "rel").exists()
    with pytest.raises(MissingMetricsError, match=r"eval_dirs names no folder for it.*Fix: evaluate it "
                                                  r"\(python -m pipeline\.evaluate input\.checkpoint=.*"
                                                  r"eval_dirs=.*require_metrics=false") as e:
        run(PublishConfig(checkpoints=[str(ckpt)], out_dir=str(tmp_path / "rel"), repo_id="alice/x"))
    assert str(ckpt) in str(e.value) and not (tmp_path / "rel").exists()
    res = run(PublishConfig(checkpoints=[str(ckpt)], out_dir=str(tmp_path / "rel"), require_metrics=False))
    assert not (res.folder / "model.layers.2" / "metrics.json").exists()
    with pytest.raises(FileNotFoundError, match="no exported SAE at"):
        run(PublishConfig(checkpoints=[str(tmp_path / "nothing")], out_dir=str(tmp_path / "rel2")))


def test_publish_reads_only_what_it_is_given(tmp_path):
    """No guessing of other stages' folders (issue 16): evaluation results, histograms, dashboards and
    density files lying in every place publish once searched are ignored; it reads the eval_dirs and
    dashboard_dirs entries it is given, each file by its producing stage's name, and the density from
    metrics.json's feature_density alone (no stage writes a density file)."""
    from safetensors.torch import save_file as save_tensors

    from pipeline import demo
    run_dir = tmp_path / "run"
    ckpt = make_export(run_dir / "sae", "topk", "model.layers.4")
    decoys = [ckpt, ckpt / "eval", ckpt / "evaluate", run_dir / "eval", run_dir / "evaluate", run_dir]
    for d in decoys:
        make_eval(d, dashboard=d / "dashboard")
    (run_dir / "interpret" / "features").mkdir(parents=True)  # and where the interpretation may have written
    (run_dir / "interpret" / "index.html").write_text("<html>decoy</html>")
    rel = tmp_path / "rel"
    with pytest.raises(MissingMetricsError, match="eval_dirs names no folder for it"):
        run(PublishConfig(checkpoints=[str(ckpt)], out_dir=str(rel), progress=False))
    res = run(PublishConfig(checkpoints=[str(ckpt)], out_dir=str(rel), require_metrics=False, progress=False))
    assert sorted(p.name for p in (res.folder / "model.layers.4").iterdir()) == sorted(
        ["cfg.json", "pipeline.json", "release.json", "sae_weights.safetensors"])

    given_dir = tmp_path / "given"  # an evaluation's out_dir: metrics.json without feature_density, and
    given_dir.mkdir()               # files no stage writes there (another PNG, the old density files)
    (given_dir / "metrics.json").write_text(json.dumps({"fvu": 0.25, "l0": 4.0}))
    from PIL import Image
    Image.new("RGB", (8, 6)).save(given_dir / "feature_density_hist.png")
    save_tensors({"density": torch.full((N,), 0.5)}, str(given_dir / "feature_density.safetensors"))
    import numpy as np
    np.save(given_dir / "feature_density.npy", np.full(N, 0.5))
    res = run(PublishConfig(checkpoints=[str(ckpt)], eval_dirs=[str(given_dir)], dashboard_dirs=[""],
                            out_dir=str(rel), progress=False))
    folder = res.folder / "model.layers.4"
    assert json.loads((folder / "metrics.json").read_text()) == {"fvu": 0.25, "l0": 4.0}
    for absent in ("sparsity.safetensors", "density_histogram.png", "dashboard"):
        assert not (folder / absent).exists(), absent

    with pytest.raises(InputNotFoundError, match=r"dashboard_dirs entry .* holds no dashboard: .*index\.html is "
                                                 r"missing\. Fix: write it \(python -m pipeline\.interpret ") as e:
        run(PublishConfig(checkpoints=[str(ckpt)], eval_dirs=[str(given_dir)], dashboard_dirs=[str(given_dir)],
                          out_dir=str(rel), progress=False))
    assert str(given_dir / "index.html") in str(e.value)

    # the embedded default's chain (pipeline/demo.py) is the one default: for its own checkpoint only
    assert (PublishConfig().eval_dirs, PublishConfig().dashboard_dirs) == ([demo.EVALUATE], [])
    other = PublishConfig(checkpoints=[str(ckpt)])
    assert (other.eval_dirs, other.dashboard_dirs) == ([], [])


def test_bad_inputs_are_user_errors(runs, tmp_path):
    """Each names the bad value and the fix, and keeps the builtin base a caller may catch."""
    stray = tmp_path / "notes" / "todo.txt"
    stray.parent.mkdir()
    stray.write_text("mine")
    with pytest.raises(OutDirNotEmptyError, match=r"out_dir='.*notes'.*Fix: choose an empty or new out_dir") as e:
        run(PublishConfig(**given(runs, "topk"), out_dir=str(stray.parent), progress=False))
    assert isinstance(e.value, FileExistsError) and isinstance(e.value, UserError) and stray.read_text() == "mine"

    twin = make_export(tmp_path / "twin" / "sae", "topk", "model.layers.1")  # runs["topk"] has that hook too
    with pytest.raises(ConfigError, match=r"checkpoints '.*topk/sae' .*'model\.layers\.1'.* and '.*twin/sae'.*"
                                          r"Fix: sae_ids=\[...\]") as e:
        run(PublishConfig(checkpoints=[str(runs["topk"] / "sae"), str(twin)], out_dir=str(tmp_path / "rel"),
                          require_metrics=False, progress=False))
    assert isinstance(e.value, ValueError) and not (tmp_path / "rel").exists() and not (tmp_path / "rel.tmp").exists()
    # a family on one hook: sae_ids names a folder for each, and each loads back as its own SAE
    res = run(PublishConfig(checkpoints=[str(runs["topk"] / "sae"), str(twin)], sae_ids=["l1-a", "l1-b"],
                            out_dir=str(tmp_path / "fam"), require_metrics=False, progress=False))
    assert res.sae_ids == ["l1-a", "l1-b"]
    assert_same_sae(P.load(res.folder / "l1-b"), P.load(twin))
    for bad, match in ((["a/b", "c"], "one folder name"), (["a", "a"], "repeats"), (["a"], "sae_ids has 1 entries")):
        with pytest.raises(ConfigError, match=match):
            PublishConfig(checkpoints=[str(runs["topk"] / "sae"), str(twin)], sae_ids=bad)

    other = make_export(tmp_path / "other" / "sae", "topk", "model.layers.5")
    doc = json.loads((other / "cfg.json").read_text())
    (other / "cfg.json").write_text(json.dumps({**doc, "format": "sae_lens"}))
    with pytest.raises(CheckpointFormatError, match=r"other/sae/cfg\.json.*format='sae_lens'.*Fix: point at"):
        run(PublishConfig(checkpoints=[str(other)], out_dir=str(tmp_path / "rel"), require_metrics=False))
    assert not (tmp_path / "rel.tmp").exists()  # refused before anything was written

    with pytest.raises(ConfigError, match=r"'hf://my-org'.*Fix: name the repo and the SAE's folder") as e:
        parse_hf_url("hf://my-org")
    assert isinstance(e.value, ValueError)

    # a release folder whose pipeline.json no longer lists the extras (jumprelu's log_threshold); same size,
    # so the manifest check passes and the weights check refuses it
    res = run(PublishConfig(**given(runs, "jumprelu"), out_dir=str(tmp_path / "rel-j"),
                            progress=False))
    cfg = res.folder / res.sae_ids[0] / "pipeline.json"
    text = cfg.read_text()
    old = '"extras": "pipeline_extras.safetensors"'
    assert old in text
    cfg.write_text(text.replace(old, '"extras": null'.ljust(len(old))))
    with pytest.raises(CheckpointFormatError, match=r"rel-j/model\.layers\.2'.*missing \['log_threshold'\].*"
                                                    r"Fix: download the release again") as e:
        P.load(res.folder / res.sae_ids[0])
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)


def test_pipeline_sae_reads_exports_only(runs, tmp_path):
    """pipeline.sae imports nothing above it: a release is pipeline.publish.load's, which reads exports too."""
    res = run(PublishConfig(**given(runs, "topk"), out_dir=str(tmp_path / "rel"), progress=False))
    assert_same_sae(S.load(runs["topk"] / "sae"), P.load(runs["topk"] / "sae"))
    for path in (res.folder / res.sae_ids[0], "hf://alice/saes/model.layers.0"):
        with pytest.raises(ConfigError, match=r"Fix: .*load .* with pipeline\.publish\.load"):
            S.load(path)


def test_incomplete_release_is_refused(runs, tmp_path):
    res = run(PublishConfig(**given(runs, "topk"), out_dir=str(tmp_path / "rel"), progress=False))
    folder = res.folder / res.sae_ids[0]
    (folder / "release.json").unlink()
    with pytest.raises(ReleaseIncompleteError, match="release.json is missing.*rerun"):
        P.load(folder)


# --- the Hugging Face Hub (loopback) -----------------------------------------------------------------

@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A loopback Hub with users alice and bob; the client is pointed at it, online, with alice's token."""
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)  # LFS transfers: the loopback Hub has no Xet storage
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(C, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubServer(tokens={TOKEN: "alice", OTHER_TOKEN: "bob"}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def release_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_hub_upload_arrives_equal_reruns_send_nothing_and_never_log_the_token(runs, tmp_path, hub, caplog, capfd):
    caplog.set_level(logging.DEBUG)  # everything the client and we log, at the most verbose level
    cfg = PublishConfig(**given(runs, "topk", "jumprelu"),
                        out_dir=str(tmp_path / "rel"), repo_id="alice/saes", progress=True)
    res = run(cfg)
    assert hub.state.commits == 1  # a small release is one commit
    remote = hub.state.files("alice/saes")
    remote.pop(".gitattributes")
    assert remote == release_files(res.folder)
    sent = list(hub.state.uploads)

    res2 = run(cfg)
    assert res2.hub.upload == [] and hub.state.uploads == sent and hub.state.commits == 1

    for sid, arch in zip(res.sae_ids, ("topk", "jumprelu")):
        assert_same_sae(S.load(runs[arch] / "sae"), P.load(f"hf://alice/saes/{sid}@main"))

    out, err = capfd.readouterr()
    logs = caplog.text + out + err
    assert "alice/saes" in logs and TOKEN not in logs
    assert all(TOKEN not in str(r.args) for r in caplog.records)


def test_hub_release_in_a_subfolder_and_branch(runs, tmp_path, hub):
    cfg = PublishConfig(**given(runs, "batchtopk"), out_dir=str(tmp_path / "rel"),
                        repo_id="alice/many", path_in_repo="smollm2/v1", revision="dev", private=True)
    res = run(cfg)
    files = hub.state.files("alice/many", "dev")
    assert "smollm2/v1/model.layers.3/sae_weights.safetensors" in files and "smollm2/v1/README.md" in files
    assert "smollm2/v1/README.md" not in hub.state.files("alice/many", "main")
    assert hub.state.repos["alice/many"].private
    assert_same_sae(S.load(runs["batchtopk"] / "sae"), P.load("hf://alice/many/smollm2/v1/model.layers.3@dev"))
    assert 'hf://alice/many/smollm2/v1/model.layers.3' in (res.folder / "README.md").read_text()


def test_hub_interrupted_upload_resumes_and_is_never_shown_complete(runs, tmp_path, hub):
    cfg = PublishConfig(**given(runs, "relu_l1", "jumprelu"),
                        out_dir=str(tmp_path / "rel"), repo_id="alice/big", single_commit_size="1",
                        commit_size="6kB", progress=False)
    hub.state.fail["commit"] = 2  # the network drops during the second commit (and every later one)
    with pytest.raises(PublishIncompleteError, match=r"stopped in commit 2 of \d.*not marked complete.*rerun"):
        run(cfg)
    files = hub.state.files("alice/big")
    assert files and not any(p.endswith(("release.json", "cfg.json")) for p in files)
    with pytest.raises(ReleaseIncompleteError, match="release.json is missing"):
        P.load("hf://alice/big/model.layers.0")

    hub.state.fail.clear()
    res = run(cfg)
    assert len(res.hub.commits) > 2
    assert len(hub.state.uploads) == len(set(hub.state.uploads)), "a file was sent twice"
    remote = hub.state.files("alice/big")
    remote.pop(".gitattributes")
    assert remote == release_files(res.folder)
    assert_same_sae(S.load(runs["jumprelu"] / "sae"), P.load("hf://alice/big/model.layers.2"))

    # an update that fails part way must not leave the old manifest presenting the new files as complete
    make_export(tmp_path / "v2" / "sae", "jumprelu", "model.layers.2", seed=7)
    make_eval(tmp_path / "v2" / "eval")
    cfg2 = PublishConfig(checkpoints=[str(tmp_path / "v2" / "sae")], eval_dirs=[str(tmp_path / "v2" / "eval")],
                         dashboard_dirs=[str(tmp_path / "v2" / "eval" / "dashboard")], out_dir=str(tmp_path / "rel2"),
                         repo_id="alice/big", single_commit_size="1", commit_size="6kB", progress=False)
    hub.state.commits, hub.state.fail["commit"] = 0, 2
    with pytest.raises(PublishIncompleteError):
        run(cfg2)
    assert "model.layers.2/release.json" not in hub.state.files("alice/big")
    hub.state.fail.clear()
    run(cfg2)
    assert_same_sae(S.load(tmp_path / "v2" / "sae"), P.load("hf://alice/big/model.layers.2"))


def test_hub_sharded_release_loads_back(runs, tmp_path, hub):
    """hf:// downloads the shard folders (and not the dashboard) and loads them as one SAE."""
    res = run(PublishConfig(**given(runs, "topk"), out_dir=str(tmp_path / "rel"), repo_id="alice/sharded",
                            max_shard_size="3kB", progress=False))
    sae = P.load(f"hf://alice/sharded/{res.sae_ids[0]}")
    assert_same_sae(S.load(runs["topk"] / "sae"), sae)
    downloaded = {p.name for p in (tmp_path / "hf-cache").rglob("*") if p.is_file()}  # the hub fixture's cache
    assert "index.html" not in downloaded and "sae_weights.safetensors" in downloaded


def test_hub_commits_a_sharded_release_shard_configs_last(runs, tmp_path):
    """A shard folder's cfg.json is what makes SAELens see that shard: it goes in the last commit
    with the SAE's own cfg.json and manifest, and a changed shard replaces the SAE's manifest first."""
    from types import SimpleNamespace
    from pipeline.publish.hub import local_files, plan
    res = run(PublishConfig(**given(runs, "topk"), out_dir=str(tmp_path / "rel"), max_shard_size="3kB",
                            dry_run=True, progress=False))
    sid = res.sae_ids[0]
    shard_cfgs = {p.relative_to(res.folder).as_posix() for p in res.folder.glob(f"{sid}/shards/*/cfg.json")}
    assert len(shard_cfgs) == 3
    old_manifest = f"v1/{sid}/release.json"
    p = plan(local_files(res.folder, "v1"), {old_manifest: SimpleNamespace(size=-1)}, single_commit=1,
             commit_size=3000)
    assert len(p.commits) > 2
    assert {f.path for f in p.commits[-1]} == shard_cfgs | {f"{sid}/{n}" for n in ("cfg.json", "pipeline.json",
                                                                                  "release.json")} | {"README.md"}
    assert p.delete_first == [old_manifest]


def test_xet_is_what_the_client_uses_when_enabled(runs, tmp_path, hub, monkeypatch):
    """With Xet on, the upload's first request beyond the commit's preparation is Xet's write token,
    which the loopback Hub does not serve: the LFS path the other tests take is the one it stands in for."""
    import huggingface_hub.constants as C
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", False)
    # (the error, not the server's request log: the server logs a request after answering it)
    with pytest.raises(PublishIncompleteError, match=r"404 Not Found.*/api/models/alice/xet/xet-write-token/main"):
        run(PublishConfig(**given(runs, "topk"), out_dir=str(tmp_path / "rel"), repo_id="alice/xet", progress=False))
    assert not any("/lfs" in path for _, path, _ in hub.state.log)


def test_hub_bad_credentials_and_foreign_repo(runs, tmp_path, hub, monkeypatch):
    cfg = PublishConfig(**given(runs, "topk"), out_dir=str(tmp_path / "rel"), repo_id="alice/saes")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishAuthError, match="no Hugging Face token: set HF_TOKEN.*hf auth login"):
        run(cfg)
    assert hub.state.log == []  # refused before any request

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(PublishAuthError, match="rejected the token.*401"):
        run(cfg)

    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)  # bob owns bob/saes
    run(PublishConfig(**given(runs, "relu_l1"), out_dir=str(tmp_path / "bob"), repo_id="bob/saes"))
    before = hub.state.files("bob/saes")
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # alice may not write there
    with pytest.raises(PublishAuthError, match=r"may not write to 'bob/saes' \(HTTP 403.*own namespace") as e:
        run(PublishConfig(**given(runs, "topk"), out_dir=str(tmp_path / "rel"), repo_id="bob/saes"))
    assert TOKEN not in str(e.value) and hub.state.files("bob/saes") == before
    with pytest.raises(PublishAuthError, match=r"may not write to 'bob/new' \(HTTP 403"):
        run(PublishConfig(**given(runs, "topk"), out_dir=str(tmp_path / "rel"), repo_id="bob/new"))
    assert "bob/new" not in hub.state.repos


def test_dry_run_lists_operations_without_network(runs, tmp_path, hub, capsys, s3_bucket):
    bucket, opts = s3_bucket
    res = run(PublishConfig(**given(runs, "topk"), out_dir=str(tmp_path / "rel"),
                            repo_id="alice/saes", target=f"s3://{bucket}/releases/x", storage_options=opts,
                            dry_run=True))
    out = capsys.readouterr().out
    assert hub.state.log == [] and "alice/saes" not in hub.state.repos
    import s3fs
    assert s3fs.S3FileSystem(**opts).ls(bucket) == []
    assert (res.folder / "model.layers.1" / "release.json").is_file()
    for needle in ("dry run", "create_repo alice/saes", "commit 1/1", "model.layers.1/sae_weights.safetensors",
                   f"copy to s3://{bucket}/releases/x", "put README.md"):
        assert needle in out, needle


# --- an fsspec target: S3 on moto --------------------------------------------------------------------

def test_publish_to_s3_is_idempotent_and_resumes(runs, tmp_path, s3_bucket):
    import s3fs
    bucket, opts = s3_bucket
    url = f"s3://{bucket}/releases/smollm2"
    cfg = PublishConfig(**given(runs, "topk", "batchtopk"),
                        out_dir=str(tmp_path / "rel"), target=url, storage_options=opts, progress=False)
    res = run(cfg)
    fs = s3fs.S3FileSystem(**opts)
    local = release_files(res.folder)
    assert {k: fs.cat(f"{bucket}/releases/smollm2/{k}") for k in local} == local
    assert len(fs.find(f"{bucket}/releases/smollm2")) == len(local)
    assert run(cfg).target.upload == []

    # an interrupted copy: one weights file and the manifest never arrived
    fs.rm(f"{bucket}/releases/smollm2/model.layers.3/sae_weights.safetensors")
    fs.rm(f"{bucket}/releases/smollm2/model.layers.3/release.json")
    res = run(cfg)
    assert [f.path for f in res.target.upload] == ["model.layers.3/sae_weights.safetensors",
                                                   "model.layers.3/release.json"]
    assert fs.cat(f"{bucket}/releases/smollm2/model.layers.3/sae_weights.safetensors") == \
        local["model.layers.3/sae_weights.safetensors"]

    with pytest.raises(OSError, match="cannot reach the storage"):
        run(PublishConfig(**given(runs, "topk"), out_dir=str(tmp_path / "rel3"),
                          target=f"s3://{bucket}/x", storage_options={**opts, "endpoint_url": "http://127.0.0.1:9"}))


# --- the command line --------------------------------------------------------------------------------

def test_command_line_publishes_and_keeps_the_token_out_of_every_log(runs, tmp_path, hub):
    env = {**os.environ, "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"), "PIPELINE_RUNS": str(tmp_path / "runs"),
           "HF_HUB_VERBOSITY": "debug"}
    args = [sys.executable, "-m", "pipeline.publish", f"checkpoints=[{runs['jumprelu'] / 'sae'}]",
            f"eval_dirs=[{runs['jumprelu'] / 'eval'}]", f"dashboard_dirs=[{runs['jumprelu'] / 'interpret'}]",
            f"out_dir={tmp_path / 'rel'}", "repo_id=alice/cli", "progress=false"]
    p = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "published alice/cli@main" in p.stdout + p.stderr
    assert hub.state.files("alice/cli")["model.layers.2/cfg.json"] == (tmp_path / "rel/model.layers.2/cfg.json").read_bytes()
    hydra_logs = "".join(f.read_text(errors="replace") for f in (tmp_path / "runs").rglob("*") if f.is_file())
    assert "published alice/cli@main" in hydra_logs
    assert TOKEN not in p.stdout + p.stderr + hydra_logs


# --- SAELens, in its own virtual environment (tests/saelens_venv.py) -----------------------------------

SAELENS_SCRIPT = """
import json, sys, torch
from safetensors.torch import load_file, save_file
import sae_lens
from sae_lens import SAE
from pipeline.saelens_shards import ShardedSAE
args = json.loads(sys.argv[1])
x = load_file(args["x"])["x"]
out = {}
def run(tag, sae):
    with torch.no_grad():
        f = sae.encode(x)
        out[tag + "/latents"], out[tag + "/x_hat"] = f.contiguous(), sae.decode(f).contiguous()
loaders = {"disk": SAE.load_from_disk, "sharded_disk": ShardedSAE.load_from_disk,
           "hub": lambda sid: SAE.from_pretrained(args["repo"], sid),
           "sharded_hub": lambda sid: ShardedSAE.from_pretrained(args["repo"], sid)}
for how, load in loaders.items():
    for tag, where in args[how].items():
        run(tag, load(where))
save_file(out, args["out"])
print("sae_lens", sae_lens.__version__)
"""
SHARDINGS = {1: "5GB", 2: "5000B", 5: "1800B"}
"""Shard count -> max_shard_size giving it for every architecture at D x N (8.4 or 8.7 kB of weights)."""


def test_saelens_loads_every_release_with_equal_outputs(runs, tmp_path, hub):
    """SAELens's own loaders (load_from_disk on the folder, from_pretrained from the loopback Hub)
    give the same latents (same active set) and reconstructions as pipeline.sae on the same inputs,
    for one-file releases and for 2- and 5-shard ones (pipeline.saelens_shards.ShardedSAE over the
    shard folders). Each shard folder alone is an SAE over its features: exactly our latents there
    (topk: its own top k, which holds every latent of ours in its range)."""
    args = {"x": str(tmp_path / "x.safetensors"), "out": str(tmp_path / "out.safetensors"), "repo": "alice/saelens",
            "disk": {}, "hub": {}, "sharded_disk": {}, "sharded_hub": {}}
    shards = {}  # tag of a shard -> (release tag, arch, feature range)
    for n, size in SHARDINGS.items():
        res = run(PublishConfig(**given(runs, *S.ARCHITECTURES), out_dir=str(tmp_path / f"rel{n}"),
                                repo_id="alice/saelens", path_in_repo=f"s{n}", max_shard_size=size, progress=False))
        for sid, arch in zip(res.sae_ids, S.ARCHITECTURES):
            folder, tag = res.folder / sid, f"{n}/{arch}"
            if n == 1:
                args["disk"][f"disk/{tag}"], args["hub"][f"hub/{tag}"] = str(folder), f"s{n}/{sid}"
                continue
            index = json.loads((folder / "sae_weights.safetensors.index.json").read_text())
            assert [s["features"] for s in index["shards"]] == [[round(i * N / n), round((i + 1) * N / n)]
                                                                for i in range(n)]
            args["sharded_disk"][f"disk/{tag}"], args["sharded_hub"][f"hub/{tag}"] = str(folder), f"s{n}/{sid}"
            for i, s in enumerate(index["shards"]):
                args["disk"][f"shard/{tag}/{i}"] = str(folder / s["folder"])
                shards[f"shard/{tag}/{i}"] = arch, s["features"]
    x = inputs(seed=3, n=256)
    save_file({"x": x}, args["x"])
    stdout = run_saelens(SAELENS_SCRIPT, args, env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN,
                                                     "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home")})
    theirs = load_file(args["out"])
    ours = {}
    for arch in S.ARCHITECTURES:
        sae = S.load(runs[arch] / "sae")
        with torch.no_grad():
            ours[arch] = dense_latents(sae, x), sae(x).x_hat
        assert (ours[arch][0] > 0).any(1).all(), "inputs too weak: some tokens have no active latent"
        assert transformer_lens_hook(sae.meta["hook"]).startswith("blocks.")
    for n in SHARDINGS:
        for arch in S.ARCHITECTURES:
            latents, x_hat = ours[arch]
            for where in ("disk", "hub"):
                f, r = theirs[f"{where}/{n}/{arch}/latents"], theirs[f"{where}/{n}/{arch}/x_hat"]
                what = f"{arch}, {n} shard(s), {where}"
                assert torch.equal(f != 0, latents != 0), f"{what}: a different set of active latents"
                torch.testing.assert_close(f, latents, rtol=1e-5, atol=1e-5, msg=f"latents of {what}")
                torch.testing.assert_close(r, x_hat, rtol=1e-5, atol=1e-5, msg=f"x_hat of {what}")
                print(f"{stdout.strip()} {what}: max |latent diff| {(f - latents).abs().max():.2e}, "
                      f"max |x_hat diff| {(r - x_hat).abs().max():.2e} (|x_hat| up to {x_hat.abs().max():.1f})")
    for tag, (arch, (a, b)) in shards.items():
        f, mine = theirs[f"{tag}/latents"], ours[arch][0][:, a:b]
        if S.sae_class(arch).saelens_architecture == "topk":  # its own top k: a superset of ours in its range, equal where ours fire
            assert ((mine != 0) <= (f != 0)).all() and ((f != 0).sum(1) <= 4).all(), tag
            torch.testing.assert_close(f[mine != 0], mine[mine != 0], rtol=1e-5, atol=1e-5, msg=tag)
        else:
            assert torch.equal(f != 0, mine != 0), f"{tag}: a different set of active latents"
            torch.testing.assert_close(f, mine, rtol=1e-5, atol=1e-5, msg=tag)

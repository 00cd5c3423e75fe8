"""Training stage: single-process runs of `python -m pipeline.train` on a synthetic store,
resume after kill -9 and SIGTERM, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.store import ActivationStoreWriter, StoreLayout, commit

REPO = Path(__file__).resolve().parent.parent


def synthetic_store(url: str, n_rows: int = 2048, d_model: int = 16, seed: int = 0, scale: float = 3.0,
                    nan_row: int | None = None) -> str:
    """A committed store of sparse-ish synthetic activations: a mean plus a few of 48 random
    directions per row, the way an SAE's data looks (rows_per_context 32)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, d_model, generator=g)
    codes = torch.rand(n_rows, 48, generator=g) * (torch.rand(n_rows, 48, generator=g) < 0.1)
    x = scale * (codes @ dirs + 0.5 * torch.randn(d_model, generator=g) + 0.05 * torch.randn(n_rows, d_model, generator=g))
    if nan_row is not None:
        x[nan_row] = float("nan")
    rows_per_context = 32
    layout = StoreLayout(("blocks.0",), d_model, "float32", n_rows // rows_per_context, rows_per_context, 16, 8)
    w = ActivationStoreWriter(url, layout, {"fingerprint": f"synthetic-{seed}", "model": {"id": "synthetic"}})
    ctx = torch.arange(n_rows) // rows_per_context
    for shard in range(layout.n_shards):
        span = layout.shard_contexts_range(shard)
        rows = slice(span.start * rows_per_context, span.stop * rows_per_context)
        w.begin_shard(shard)
        w.append({"blocks.0": x[rows]}, torch.zeros(rows.stop - rows.start, dtype=torch.int32), ctx[rows],
                 torch.arange(rows.start, rows.stop) % rows_per_context)
        w.end_shard(len(span))
    w.close()
    assert commit(w) is not None
    return url


def run_train(args: list[str], nproc: int = 1, env: dict | None = None, check: bool = True, **kw):
    """`python -m pipeline.train` as users run it (under torchrun when nproc > 1)."""
    launcher = [sys.executable, "-m", "pipeline.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "pipeline.train"]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    flags = [a for a in args if a.startswith("--")]  # Hydra's flags come before the overrides
    args = [a for a in args if not a.startswith("--")]
    p = subprocess.run(launcher + flags + ["hydra.output_subdir=null", "hydra/job_logging=none",
                                   "hydra/hydra_logging=none", "progress=false", *args],
                       cwd=REPO, env=e, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return synthetic_store(str(tmp_path_factory.mktemp("store") / "acts"))


def tiny(store: str, out: Path, *extra: str) -> list[str]:
    return [f"data.url={store}", "sae=topk", "sae.n_features=32", "sae.k=4", "sae.k_aux=8", "sae.dead_tokens=64",
            "batch_size=32", "optim.lr=0.003", f"out_dir={out}", *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from pipeline.sae import load
    return load(folder).state_dict()


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_single_process_run_exports_a_loadable_dictionary(store, tmp_path):
    from pipeline.sae import load
    run_train(tiny(store, tmp_path, "n_tokens=640", "log_every=5", "checkpoint_every=10"))
    sae = load(tmp_path / "sae")
    assert sae.cfg.n_features == 32 and sae.cfg.d_model == 16 and sae.meta["hook"] == "blocks.0"
    assert sae.meta["model"]["id"] == "synthetic" and sae.meta["normalization"]["input_scale"] > 0
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == [5, 10, 15, 20]
    assert all(0 < r["fvu"] < 2 and r["l0"] == 4 for r in m)
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-20"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-10", "step-20"]
    assert list((tmp_path / "tb").iterdir())


def test_the_default_recipe_follows_the_width_and_reaches_the_export(store, tmp_path):
    """optim.lr=null: Adam's rate scales as 1/sqrt(n_features) from the recipe's constant and falls as
    steps^-1/4 beyond 100 steps (to a quarter at most); warm-up is
    5% of the steps up to 1000; a set value wins. The trainer prints the resolved values and writes
    them to the export's cfg.json, and the DeepSpeed optimizer runs with that rate."""
    from pipeline.errors import ConfigError
    from pipeline.sae import SAEConfig
    from pipeline.step import OptimConfig
    from pipeline.train import recipe

    auto = OptimConfig()
    assert recipe.learning_rate(auto, 2 ** 14, 100) == recipe.LR_AT_16K
    assert recipe.learning_rate(auto, 2 ** 12, 10) == pytest.approx(2 * recipe.LR_AT_16K)
    assert recipe.learning_rate(auto, 2 ** 20, 100) == pytest.approx(recipe.LR_AT_16K / 8)
    # the budget: (steps / 100) ** -1/4 beyond 100 steps, never below a quarter
    assert recipe.learning_rate(auto, 2 ** 14, 1600) == pytest.approx(recipe.LR_AT_16K / 2)
    assert recipe.learning_rate(auto, 2 ** 16, 25_600) == pytest.approx(recipe.LR_AT_16K / 8)
    assert recipe.learning_rate(auto, 2 ** 16, 10 ** 7) == pytest.approx(recipe.LR_AT_16K / 8)
    assert recipe.learning_rate(OptimConfig(lr=4e-4), 2 ** 20, 10 ** 6) == 4e-4
    assert recipe.learning_rate(auto, 2 ** 14, 100, "jumprelu") == pytest.approx(0.3 * recipe.LR_AT_16K)
    assert recipe.learning_rate(OptimConfig(lr=4e-4), 2 ** 14, 100, "jumprelu") == 4e-4  # a set rate is the rate
    assert [recipe.warmup_steps(auto, s) for s in (10, 100, 1000, 10 ** 6)] == [0, 5, 50, 1000]
    assert recipe.warmup_steps(OptimConfig(lr_warmup_steps=7), 10 ** 6) == 7
    with pytest.raises(ConfigError, match="optim.lr=-1"):
        OptimConfig(lr=-1.0)
    # dead-latent window: Gao's 10M tokens, at most a 64th of the run, at least one batch and 50 average
    # firing intervals (n_features / k tokens); a set value wins
    auto_sae = SAEConfig(architecture="topk")  # 4,096 latents, k = 32: 50 intervals = 6,400 tokens
    assert [recipe.dead_tokens(auto_sae, t, 4096) for t in (16_000, 400_000, 2_000_000, 10 ** 9)] == \
        [6400, 6400, 31_250, 10_000_000]
    wide = SAEConfig(architecture="topk", n_features=2 ** 18, k=32)
    assert recipe.dead_tokens(wide, 51_200, 1024) == 50 * 2 ** 13
    assert recipe.dead_tokens(SAEConfig(architecture="topk", dead_tokens=7), 10 ** 9, 4096) == 7

    drop = ("optim.lr=", "sae.dead_tokens=")
    p = run_train([a for a in tiny(store, tmp_path, "n_tokens=1280", "log_every=1") if not a.startswith(drop)])
    exported = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert exported["config"]["dead_tokens"] == 400 and "a latent is dead after 400 tokens" in p.stdout  # 50 x 32 / 4
    resolved = exported["training"]["optim"]
    assert resolved["lr"] == pytest.approx(recipe.LR_AT_16K * (2 ** 14 / 32) ** 0.5)
    assert resolved["lr_warmup_steps"] == 2 and "sqrt(16384 / n_features)" in resolved["rule"]
    assert resolved["betas"] == [0.8, 0.999] and "betas (0.8, 0.999)" in p.stdout
    assert f"Adam lr {resolved['lr']:.3g}" in p.stdout and "warm-up 2 of 40 steps" in p.stdout
    lrs = [r["lr"] for r in metrics(tmp_path)]  # what DeepSpeed's optimizer ran with: warm-up, flat, decay
    assert lrs[0] == pytest.approx(resolved["lr"] / 2) and max(lrs) == pytest.approx(resolved["lr"])
    assert lrs[-1] < max(lrs)
    run_train(tiny(store, tmp_path / "set", "n_tokens=1280"))
    assert json.loads((tmp_path / "set" / "sae" / "cfg.json").read_text())["training"]["optim"]["lr"] == 0.003


_GROUP_LRS = """
import json, sys, torch
from pipeline.parallel import Mesh, init_distributed
from pipeline.sae import SAEConfig
from pipeline.step import OptimConfig
from pipeline.train.config import TrainConfig
from pipeline.train.engine import build_engine
cfg = TrainConfig(sae=SAEConfig(architecture="jumprelu", n_features=64, d_model=8, threshold_lr_scale=7.0),
                  n_tokens=40 * 32, batch_size=32, out_dir=sys.argv[1], optim=OptimConfig(lr_warmup_steps=0))
device = init_distributed(torch.device("cpu"))
mesh = Mesh(cfg.parallel, device)
sae = mesh.build_sae(cfg.sae, 0)
engine = build_engine(cfg, sae, mesh, device)
names = {id(p): n for n, p in sae.named_parameters()}
print(json.dumps({"lrs": [float(lr) for lr in engine.get_lr()],
                  "groups": [sorted(names[id(p)] for p in g["params"]) for g in sae.param_groups()]}))
"""


def test_jumprelu_trains_its_thresholds_at_their_own_rate(tmp_path):
    """The optimizer DeepSpeed builds runs jumprelu's thresholds at threshold_lr_scale times the
    recipe's rate for jumprelu (0.3 x topk's), every other parameter at that rate."""
    from pipeline.step import OptimConfig
    from pipeline.train import recipe

    p = subprocess.run([sys.executable, "-c", _GROUP_LRS, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    lr = recipe.learning_rate(OptimConfig(), 64, 40, "jumprelu")
    assert out["groups"] == [["W_dec", "W_enc", "b_dec", "b_enc"], ["log_threshold"]]
    assert out["lrs"] == pytest.approx([lr, 7 * lr])


def _launch(args: list[str], nproc: int) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "pipeline.train"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
         "pipeline.train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(launcher + ["hydra.output_subdir=null", "progress=false", "hydra/job_logging=none",
                                        "hydra/hydra_logging=none", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Processes below `pid` (torchrun starts each rank in its own session, out of our group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_9(p: subprocess.Popen) -> None:
    """SIGKILL to every rank and the launcher at once, mid-step, as when a node dies."""
    for pid in _descendants(p.pid) + [p.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # a helper process that ended on its own meanwhile
            pass


def _interrupt_after_first_checkpoint(args: list[str], nproc: int, out: Path, sig: int) -> str:
    p = _launch(args, nproc)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be interrupted:\n" + p.stdout.read()[-3000:]
    if sig == signal.SIGKILL:
        _kill_9(p)
    else:
        os.kill(p.pid, sig)  # as a scheduler does: the launcher forwards it to the ranks
    log = p.communicate(timeout=120)[0]
    return log


@pytest.mark.slow
@pytest.mark.parametrize("layout,sig,extra", [
    ((1, 2), signal.SIGKILL, []), ((2, 1), signal.SIGTERM, []),
    # fp8 Adam state (torchao): 512 features per shard x d=16 = 8192 values, quantised in 256-value blocks
    ((1, 2), signal.SIGKILL, ["optim.state_dtype=fp8", "sae.n_features=1024", "deepspeed.zero_stage=0"])],
    ids=["fp2-kill9", "dp2-sigterm", "fp2-kill9-fp8-adam"])
def test_interrupted_run_resumes_to_the_same_weights(store, tmp_path, layout, sig, extra):
    dp, fp = layout
    steps = 200

    def args(out):
        return tiny(store, out, f"n_tokens={32 * steps}", "log_every=10", "checkpoint_every=40",
                    "keep_checkpoints=0", f"parallel.data_parallel={dp}", f"parallel.feature_parallel={fp}", *extra)
    run_train(args(tmp_path / "straight"), nproc=dp * fp, timeout=600)

    out = tmp_path / "interrupted"
    log = _interrupt_after_first_checkpoint(args(out), dp * fp, out, sig)
    stopped_at = int((out / "checkpoints" / "latest").read_text().split("-")[1])
    assert 0 < stopped_at < steps, log[-3000:]
    assert not (out / "sae").exists()
    if sig == signal.SIGTERM:  # a clean stop: checkpoint at the step the signal arrived, not on schedule
        assert f"stopped by a signal after step {stopped_at}" in log, log[-3000:]

    resumed = run_train(args(out), nproc=dp * fp, timeout=600)
    assert f"at step {stopped_at}" in resumed.stdout + resumed.stderr
    a, b = weights(tmp_path / "straight" / "sae"), weights(out / "sae")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if extra:  # the checkpointed Adam state: the weight matrices' m and v in fp8 codes, the biases' fp32
        ckpt = torch.load(out / "checkpoints" / f"step-{stopped_at}" / "mp_rank_00_model_states.pt",
                          weights_only=False, map_location="cpu")
        kinds = sorted(str(v["inner"]["codes"].dtype if isinstance(v, dict) else v.dtype)
                       for st in ckpt["optimizer"]["state"].values() for k, v in st.items() if k != "step")
        assert kinds == ["torch.float32"] * 4 + ["torch.float8_e4m3fn"] * 4, kinds
    # the log: the same lines, except the window the stop cut in two (it averages fewer steps)
    cut = lambda r: r["step"] - 10 < stopped_at < r["step"]  # noqa: E731
    same = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}  # noqa: E731
    assert [same(r) for r in metrics(out) if not cut(r)] == \
        [same(r) for r in metrics(tmp_path / "straight") if not cut(r)]


def test_nonfinite_loss_stops_with_the_step_and_a_checkpoint(store, tmp_path):
    p = run_train(tiny(store, tmp_path, "n_tokens=640", "optim.lr=1e30", "optim.gradient_clipping=0"),
                  check=False, timeout=300)
    assert p.returncode != 0
    assert "NonFiniteLossError" in p.stderr and "at step 1 " in p.stderr, p.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-1"
    assert not (tmp_path / "sae").exists()


def test_world_size_must_match_the_layout(store, tmp_path):
    p = run_train(tiny(store, tmp_path, "n_tokens=640", "parallel.feature_parallel=1"), nproc=2, check=False,
                  timeout=300)
    assert p.returncode != 0
    assert ("parallel.data_parallel=1 x parallel.feature_parallel=1 = 1 ranks, but WORLD_SIZE=2" in p.stderr), \
        p.stderr[-3000:]


def _cfg(store: str, tmp_path: Path, **kw):
    from pipeline.parallel import ParallelDims
    from pipeline.sae import SAEConfig
    from pipeline.train import TrainConfig
    from pipeline.train.config import ActivationDataConfig
    sae = kw.pop("sae", SAEConfig(architecture="topk", n_features=32, k=4))
    kw = {"n_tokens": 64, "batch_size": 32, "parallel": ParallelDims(), **kw}
    return TrainConfig(data=ActivationDataConfig(url=store), sae=sae, out_dir=str(tmp_path), **kw)


def test_d_model_mismatch(store, tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.sae import SAEConfig
    from pipeline.train import train
    with pytest.raises(ConfigError, match=r"sae.d_model=8, but the store .* width 16"):
        train(_cfg(store, tmp_path, sae=SAEConfig(architecture="topk", n_features=32, k=4, d_model=8)))


def test_more_feature_shards_than_features(store, tmp_path, monkeypatch):
    from pipeline.errors import ConfigError
    from pipeline.parallel import ParallelDims
    from pipeline.sae import SAEConfig
    from pipeline.train import train
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match="feature_parallel=8 is larger than sae.n_features=5"):
        train(_cfg(store, tmp_path, sae=SAEConfig(architecture="relu_l1", n_features=5), parallel=ParallelDims(1, 8)))


def test_config_errors(store, tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.parallel import ParallelDims
    with pytest.raises(ConfigError, match="divisible by parallel.data_parallel=3"):
        _cfg(store, tmp_path, parallel=ParallelDims(3, 1))
    with pytest.raises(ConfigError, match="at most n_tokens"):
        _cfg(store, tmp_path, n_tokens=8)
    from pipeline.train import OptimConfig
    with pytest.raises(ConfigError, match="optim.state_dtype='bf16' must be one of"):
        OptimConfig(state_dtype="bf16")

"""Scaling-law sweeps: the fits recover known exponents from noisy synthetic runs of both forms;
bad sweeps (failed, unfinished, too few runs) are reported and refused; a real multirun of tiny
training runs writes held-out metrics and, killed part-way, finishes on rerun without redoing the
finished points; a 2-point sweep runs through Hydra's submitit launcher on the SLURM test cluster."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ScalingFitError
from pipeline.scaling import ScalingConfig, run
from pipeline.scaling.run import flops_per_token

REPO = Path(__file__).resolve().parent.parent
D_MODEL = 64


def write_point(root: Path, name: str, n: int, tokens: int, loss: float, arch: str = "relu_l1", k: int = 32,
                **extra) -> Path:
    """A finished run as the trainer leaves it: out_dir/heldout.json (only what the fit reads)."""
    d = root / name
    d.mkdir(parents=True)
    doc = {"format": "pipeline.heldout", "version": 1, "architecture": arch, "n_features": n, "k": k,
           "d_model": D_MODEL, "tokens": tokens, "steps": tokens // 32, "batch_size": 32,
           "heldout_url": "test-store", "proxy_loss": loss, "fvu": loss, "nmse": loss, "mse": loss, **extra}
    (d / "heldout.json").write_text(json.dumps(doc))
    return d


def joint_sweep(root: Path, E=0.1, A=3.0, alpha=0.35, B=8.0, beta=0.3, noise=0.003, seed=0,
                outlier: float = 1.0) -> Path:
    """A 7 x 7 grid of sizes x token budgets from L(N, D) = E + A/N^alpha + B/D^beta with 0.3%
    log-normal noise (each term between a tenth and a half of the loss over the grid); the run at
    the grid's centre has its loss multiplied by `outlier` (a bad run)."""
    rng = np.random.default_rng(seed)
    for n in (256, 512, 1024, 2048, 4096, 8192, 16384):
        for t in (10_000, 21_500, 46_400, 100_000, 215_000, 464_000, 1_000_000):
            loss = (E + A * n ** -alpha + B * t ** -beta) * math.exp(rng.normal(0, noise))
            write_point(root, f"n{n}-t{t}", n, t, loss * (outlier if (n, t) == (2048, 100_000) else 1.0))
    return root


def test_joint_fit_recovers_known_exponents_within_5_percent(tmp_path):
    root = joint_sweep(tmp_path / "sweep", outlier=1.5)
    r = run(ScalingConfig(sweep_dir=str(root), bootstrap=20, holdout_largest=1))
    j = r["joint"]["fit"]
    assert j["alpha"] == pytest.approx(0.35, rel=0.05) and j["beta"] == pytest.approx(0.3, rel=0.05), j
    # the Huber loss is what keeps the one bad run from pulling the fit: least squares misses by > 5%
    lsq = run(ScalingConfig(sweep_dir=str(root), bootstrap=0, holdout_largest=0, huber_delta=1.0,
                            out_dir=str(tmp_path / "lsq")))["joint"]["fit"]
    assert abs(lsq["alpha"] / 0.35 - 1) > 0.05
    # a dense step costs 10 d N per token, so C ~ N D and the optimum is Chinchilla's closed form
    assert r["joint"]["implied"]["b"] == pytest.approx(0.3 / 0.65, rel=0.05)
    assert r["joint"]["implied"]["c"] == pytest.approx(0.35 / 0.65, rel=0.05)
    lo, hi = r["joint"]["ci95"]["alpha"]
    assert lo < j["alpha"] < hi and hi - lo < 0.2
    assert r["extrapolation"]["held_out_sizes"] == [16384] and r["extrapolation"]["n_held_out"] == 7
    assert r["extrapolation"]["joint"]["mean_abs_rel_error"] < 0.05
    assert r["loss"] == "proxy_loss" and r["excluded"] == [] and r["n_points"] == 49
    for p in r["points"]:  # compute from the planner's dense count: 10 d N per token
        assert p["flops"] == pytest.approx(10 * D_MODEL * p["n_features"] * p["tokens"])


def test_frontier_fit_recovers_known_exponents_within_5_percent(tmp_path):
    """Runs on the frontier follow L = E + A C^-a with N_opt ~ C^b (D_opt ~ C^(1 - b) for a dense
    step); each compute also has two off-optimal runs (half and twice the size) that lose."""
    E, A, a, b, noise = 0.02, 60.0, 0.25, 0.6, 0.005
    rng = np.random.default_rng(1)
    root = tmp_path / "sweep"
    for i, c in enumerate(np.geomspace(1e11, 1e15, 9)):
        n_opt = 2e-4 * c ** b
        best = (E + A * c ** -a) * math.exp(rng.normal(0, noise))
        for tag, n, penalty in (("opt", n_opt, 1.0), ("small", n_opt / 2, 1.15), ("big", n_opt * 2, 1.1)):
            n = int(round(n))
            write_point(root, f"c{i}-{tag}", n, int(round(c / (10 * D_MODEL * n))), best * penalty)
    r = run(ScalingConfig(sweep_dir=str(root), bootstrap=20, budget=1e16))
    f = r["frontier"]
    assert sorted(Path(p).name for p in f["points"]) == [f"c{i}-opt" for i in range(9)]
    assert f["fit"]["a"] == pytest.approx(a, rel=0.05)
    assert f["n_opt"]["b"] == pytest.approx(b, rel=0.05) and f["d_opt"]["c"] == pytest.approx(1 - b, rel=0.05)
    lo, hi = f["ci95"]["a"]
    assert lo <= f["fit"]["a"] <= hi
    assert r["budget"]["frontier_power_laws"]["n_features"] == pytest.approx(2e-4 * 1e16 ** b, rel=0.1)


def test_topk_compute_uses_the_sparse_step_count(tmp_path):
    from pipeline.cost_model import PlanConfig, step_flops
    from pipeline.sae import SAEConfig
    root = tmp_path / "sweep"
    write_point(root, "a", 1024, 100_000, 0.3, arch="topk", k=16)
    dense, sparse = step_flops(PlanConfig(sae=SAEConfig(d_model=D_MODEL, n_features=1024, architecture="topk", k=16),
                                          batch_size=1))
    assert flops_per_token("topk", D_MODEL, 1024, 16) == sparse == 2 * D_MODEL * 1024 + 8 * 16 * D_MODEL
    assert flops_per_token("relu_l1", D_MODEL, 1024, 16) == dense == 10 * D_MODEL * 1024


def test_failed_and_unfinished_runs_are_reported_and_left_out(tmp_path, capsys):
    root = joint_sweep(tmp_path / "sweep")
    nan = root / "failed-nan"          # stopped by the NaN guard: metrics.jsonl ends non-finite, no heldout.json
    nan.mkdir()
    (nan / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0}) + "\n" +
                                       json.dumps({"step": 20, "loss": float("nan")}) + "\n")
    half = root / "killed"             # killed mid-way: 30 of 100 steps logged
    (half / ".hydra").mkdir(parents=True)
    (half / ".hydra" / "config.yaml").write_text("n_tokens: 3200\nbatch_size: 32\n")
    (half / "metrics.jsonl").write_text(json.dumps({"step": 30, "loss": 0.5}) + "\n")
    write_point(root, "bad-loss", 512, 1000, float("nan"))  # evaluated, but the held-out loss is NaN
    r = run(ScalingConfig(sweep_dir=str(root), bootstrap=0))
    status = {Path(e["dir"]).name: (e["status"], e["reason"]) for e in r["excluded"]}
    assert set(status) == {"failed-nan", "killed", "bad-loss"}
    assert status["failed-nan"][0] == "failed" and "non-finite" in status["failed-nan"][1]
    assert status["killed"][0] == "unfinished" and "step 30 of 100" in status["killed"][1]
    assert status["bad-loss"][0] == "failed"
    assert r["n_points"] == 49 and not any(Path(p["dir"]).name in status for p in r["points"])
    out = capsys.readouterr().out
    assert "excluded (unfinished):" in out and "killed" in out and "3 excluded" in out


def test_too_few_runs_name_how_many_are_needed(tmp_path):
    root = tmp_path / "sweep"
    for i, (n, t) in enumerate([(256, 1000), (512, 2000), (1024, 4000), (2048, 8000)]):
        write_point(root, f"p{i}", n, t, 1.0 / (i + 1))
    nan = root / "failed"
    nan.mkdir()
    (nan / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": float("inf")}) + "\n")
    with pytest.raises(ScalingFitError, match=r"needs at least 6 finished runs .* 3 distinct sizes .* got 4 runs"):
        run(ScalingConfig(sweep_dir=str(root), bootstrap=0))
    for i in range(3):
        write_point(tmp_path / "three", f"p{i}", 256 * 2 ** i, 1000, 1.0 / (i + 1))
    with pytest.raises(ScalingFitError, match=r"^3 finished runs .* needs at least 6"):
        run(ScalingConfig(sweep_dir=str(tmp_path / "three"), bootstrap=0))
    with pytest.raises(ScalingFitError, match="is not a folder"):
        run(ScalingConfig(sweep_dir=str(tmp_path / "missing")))


def test_runs_of_different_architectures_are_not_fitted_together(tmp_path):
    root = joint_sweep(tmp_path / "sweep")
    write_point(root, "topk-run", 512, 1000, 0.3, arch="topk")
    with pytest.raises(ScalingFitError, match=r"differ in architecture.*Fix: fit one architecture at a time"):
        run(ScalingConfig(sweep_dir=str(root), bootstrap=0))


def test_cli_answers_for_a_budget_with_plots_and_the_plan_command(tmp_path):
    root = joint_sweep(tmp_path / "sweep")
    p = subprocess.run([sys.executable, "-m", "pipeline.scaling", str(root), "budget=1e17", "bootstrap=10",
                        "+plan.gpu_memory_gb=40"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads((root / "scaling.json").read_text())
    rec = r["budget"]["recommended"]
    n = rec["n_features"]
    assert n & (n - 1) == 0 and rec["tokens"] * 10 * D_MODEL * n == pytest.approx(1e17, rel=1e-6)
    # Chinchilla's closed form for the generating parameters, rounded to a power of two
    j = r["budget"]["joint_fit"]
    assert abs(math.log2(n) - math.log2(j["n_features"])) <= 0.5
    args = f"sae.d_model={D_MODEL} sae.n_features={n} sae.architecture=relu_l1 gpu_memory_gb=40"
    assert f'make plan ARGS="{args}"' in p.stdout or f"make plan ARGS='{args}'" in p.stdout
    assert "recommended" in p.stdout and r["budget"]["plan"]["gpus"] >= 1 and r["budget"]["plan"]["hours"] > 0
    for png in ("loss_vs_compute.png", "optimal_vs_compute.png", "joint_fit.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (root / png).stat().st_size > 20_000
    assert not list(tmp_path.glob("*.log")), "the CLI leaves no log files in the working directory"


# -- real sweeps of tiny training runs --------------------------------------------------------------

from slurm_cluster import slurm_cluster  # noqa: E402,F401  (a session fixture; skips without SLURM)
from test_train import synthetic_store  # noqa: E402  (the training tests' store of sparse synthetic rows)


def heldout_store(url: str, train_url: str) -> str:
    """Other rows of the training store's distribution: synthetic_store's rows are a function of
    (seed, n_rows), so a 4096-row store of the same seed is cut to the rows after the first 2048."""
    from pipeline.store import ActivationStore, ActivationStoreWriter, StoreLayout, commit
    full = ActivationStore.open(synthetic_store(url + "-full", n_rows=4096))
    x = full.acts(2048, 4096)
    layout = StoreLayout(("blocks.0",), x.shape[1], "float32", 64, 32, 16, 8)
    w = ActivationStoreWriter(url, layout, {"fingerprint": "synthetic-heldout", "model": {"id": "synthetic"}})
    for shard in range(layout.n_shards):
        span = layout.shard_contexts_range(shard)
        rows = slice(span.start * 32, span.stop * 32)
        w.begin_shard(shard)
        w.append({"blocks.0": x[rows]}, torch.zeros(rows.stop - rows.start, dtype=torch.int32),
                 torch.arange(rows.start, rows.stop) // 32, torch.arange(rows.start, rows.stop) % 32)
        w.end_shard(len(span))
    w.close()
    assert commit(w) is not None
    return url


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    """A training store and a held-out store of the same synthetic distribution (other rows)."""
    root = tmp_path_factory.mktemp("stores")
    train = synthetic_store(str(root / "train"))
    return train, heldout_store(str(root / "test"), train)


def sweep_args(train: str, test: str, sweep_dir: Path, sizes: str = "32,64", tokens: str = "640") -> list[str]:
    """The gao preset on the tiny stores: sizes x token budgets, batches of 32 rows."""
    return ["+sweep=gao", f"data.url={train}", f"heldout_url={test}", f"hydra.sweep.dir={sweep_dir}",
            f"sae.n_features={sizes}", f"n_tokens={tokens}", "sae.k=4", "sae.k_aux=8", "sae.dead_tokens=64",
            "batch_size=32", "optim.lr=0.003", "heldout_tokens=512", "log_every=5", "checkpoint_every=5",
            "hydra/job_logging=none", "hydra/hydra_logging=none"]


def train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.train", *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_heldout_matches_a_separate_evaluation_of_the_export(stores, tmp_path):
    """heldout.json holds the exported SAE's error on the held-out rows, in training units."""
    from pipeline.sae import load
    from pipeline.store import ActivationLoader
    train, test = stores
    p = subprocess.run(train_cmd(sweep_args(train, test, tmp_path / "sweep", sizes="32")), cwd=REPO, env=ENV,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    run_dir = tmp_path / "sweep" / "n32-t640"
    h = json.loads((run_dir / "heldout.json").read_text())
    assert (h["architecture"], h["n_features"], h["k"], h["tokens"], h["n_rows"]) == ("topk", 32, 4, 640, 512)
    sae = load(run_dir / "sae")
    x = torch.cat(list(ActivationLoader(test, 512, seed=0, epochs=1, exclude_norm_factor=8.0)))[:512]
    with torch.no_grad():
        err = (x - sae(x).x_hat).pow(2).sum()  # raw units; the export folds the input scale in
    assert h["fvu"] == pytest.approx(float(err / (x - x.mean(0)).pow(2).sum()), rel=1e-3)
    assert h["mse"] == pytest.approx(float(err / 512) * h["input_scale"] ** 2, rel=1e-3)
    assert 0 < h["fvu"] < 1 and h["proxy_loss"] == h["mse"]  # topk: no sparsity term


def test_killed_sweep_finishes_on_rerun_without_redoing_finished_points(stores, tmp_path):
    train, test = stores
    sweep = tmp_path / "sweep"
    args = sweep_args(train, test, sweep, sizes="32,64,128", tokens="3200")  # 100 steps per point
    p = subprocess.Popen(train_cmd(args), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    first = sweep / "n32-t3200" / "heldout.json"
    deadline = time.time() + 120
    while not first.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)  # the whole multirun, mid-sweep
    out = p.communicate()[0]
    assert first.exists(), out[-4000:]
    finished = {d.name: d.joinpath("heldout.json").stat().st_mtime_ns for d in sweep.iterdir()
                if d.joinpath("heldout.json").exists()}
    assert "n128-t3200" not in finished  # killed part-way: the last point had not finished

    from pipeline.scaling.run import read_sweep
    points, excluded, _ = read_sweep(ScalingConfig(sweep_dir=str(sweep)))
    assert {Path(q.dir).name for q in points} == set(finished)
    assert all(e.status == "unfinished" for e in excluded)

    r = subprocess.run(train_cmd(args), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    for name, mtime in finished.items():  # skipped: not retrained, not re-evaluated
        assert (sweep / name / "heldout.json").stat().st_mtime_ns == mtime
    assert r.stdout.count("finished, nothing to do") == len(finished)
    assert r.stdout.count("exported topk SAE") == 3 - len(finished)
    points, excluded, _ = read_sweep(ScalingConfig(sweep_dir=str(sweep)))
    assert sorted((q.n_features, q.tokens) for q in points) == [(32, 3200), (64, 3200), (128, 3200)]
    assert excluded == []


def test_two_point_sweep_runs_through_the_submitit_launcher_on_slurm(slurm_cluster, stores, tmp_path):  # noqa: F811
    """Each point is its own SLURM job (Hydra's submitit launcher), on the one-node test cluster."""
    train, test = stores
    sweep = tmp_path / "sweep"
    args = sweep_args(train, test, sweep, sizes="32,64") + [
        "+sweep/launcher=slurm", f"hydra.launcher.partition={slurm_cluster.partition}",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10"]
    r = subprocess.run(train_cmd(args), cwd=REPO, env={**slurm_cluster.env, "OMP_NUM_THREADS": "1"},
                       capture_output=True, text=True, timeout=600)
    logs = "\n".join(f"==> {p}\n{p.read_text()[-2000:]}" for p in sorted(sweep.glob(".submitit/*/*.out")))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:] + logs
    from pipeline.scaling.run import read_sweep
    points, excluded, _ = read_sweep(ScalingConfig(sweep_dir=str(sweep)))
    assert sorted((q.n_features, q.tokens) for q in points) == [(32, 640), (64, 640)] and excluded == []
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2, tasks  # one array job, a task per point
    array_id = tasks[0].split("_")[0]
    assert slurm_cluster.wait_idle(60)  # the launcher returns on the results; the job records come after
    ours = [rec for rec in slurm_cluster.completed() if int(rec["JobId"]) >= int(array_id)]
    assert [rec["JobState"] for rec in ours] == ["COMPLETED", "COMPLETED"], ours
    assert all("held-out (512 rows" in (sweep / ".submitit" / t / f"{t}_0_log.out").read_text() for t in tasks)


@pytest.mark.parametrize("preset, architecture, loss", [("gao", "topk", "fvu"), ("sm", "relu_l1", "proxy_loss")])
def test_sweep_presets_compose_into_a_training_config(preset, architecture, loss):
    """+sweep=<preset> selects the architecture, a grid of >= 3 sizes x >= 3 token budgets (what the
    joint fit needs), one folder per point, and a held-out store; the fit picks the paper's loss."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pipeline.train.__main__  # noqa: F401  (registers train_schema)
    from pipeline.config import CONF_DIR
    from pipeline.scaling.run import loss_key
    from pipeline.train import TrainConfig
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        c = compose("train", overrides=[f"+sweep={preset}"], return_hydra_config=True)
        # out_dir is ${hydra:runtime.output_dir}, which resolves only inside a run
        job = compose("train", overrides=[f"+sweep={preset}", "out_dir=somewhere"])
    params = c.hydra.sweeper.params
    assert len(str(params["sae.n_features"]).split(",")) >= 3 and len(str(params["n_tokens"]).split(",")) >= 3
    assert str(c.hydra.mode).endswith("MULTIRUN") and c.hydra.sweep.dir.endswith(f"sweep/{preset}")
    assert c.hydra.sweep.subdir == f"n{c.sae.n_features}-t{c.n_tokens}"
    cfg = OmegaConf.to_object(job)
    assert isinstance(cfg, TrainConfig)
    assert cfg.sae.architecture == architecture and cfg.heldout_url and cfg.heldout_url != cfg.data.url
    assert loss_key(ScalingConfig(), {architecture}) == loss


def test_a_finished_point_is_recognised_only_for_its_own_configuration(tmp_path, capsys):
    from dataclasses import replace

    from pipeline.train import TrainConfig, heldout
    cfg = TrainConfig(out_dir=str(tmp_path), heldout_url="test-store", n_tokens=8192, batch_size=1024)
    assert heldout.finished(cfg) is None  # nothing written yet
    (tmp_path / heldout.HELDOUT_FILE).write_text(json.dumps({"fvu": 0.3, "point": heldout.point(cfg)}))
    assert heldout.finished(cfg) == tmp_path / "sae"
    assert "finished, nothing to do" in capsys.readouterr().out
    assert heldout.finished(replace(cfg, n_tokens=16384)) is None  # another point in the same folder
    assert "another configuration" in capsys.readouterr().out
    assert heldout.finished(replace(cfg, resume=False)) is None    # resume=false trains again
    (tmp_path / heldout.HELDOUT_FILE).write_text('{"fvu": 0.3, "poi')  # killed while writing
    assert heldout.finished(cfg) is None

"""The job scripts in slurm/ on a real one-node SLURM cluster (tests/slurm_cluster.py): the stages
are submitted by slurm/pipeline.sh, run through sbatch in dependency order, and leave their outputs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (a session fixture)

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_SH = ROOT / "slurm" / "pipeline.sh"
HAS_TRAIN = all((ROOT / p).exists() for p in ("pipeline/train/__main__.py", "slurm/train.sbatch"))


def site_env(cluster: SlurmCluster, tmp_path: Path, **extra) -> dict[str, str]:
    """Site settings for the 2-CPU test node: no GPUs, small tasks, outputs in tmp_path."""
    return {**cluster.env, "PIPELINE_PYTHON": sys.executable, "PARTITION": cluster.partition,
            "PIPELINE_RUNS": str(tmp_path / "runs"), "CACHE_TASKS": "2", "CACHE_CPUS": "1", "CACHE_GPUS": "0",
            "CACHE_TIME": "10:00", "TRAIN_NODES": "1", "TRAIN_GPUS_PER_NODE": "0", "TRAIN_TASKS_PER_NODE": "2",
            "TRAIN_CPUS_PER_TASK": "1", "TRAIN_TIME": "10:00", "PREEMPT_GRACE": "60",
            "EVAL_GPUS": "0", "EVAL_CPUS": "1", "EVAL_TIME": "10:00", "PUBLISH_CPUS": "1", "PUBLISH_TIME": "10:00",
            "OMP_NUM_THREADS": "1", **extra}


def cache_overrides(model_dir, text_dir, url) -> list[str]:
    """tests/test_cache.py's tiny store: 2400 tokens of a 4-layer model, 20 shards of 4 contexts."""
    return [f"cache:model.name={model_dir}", "cache:model.device=cpu", "cache:data=files",
            f"cache:data.path=[{text_dir}/*]", "cache:hooks=[layers.2]", "cache:context_size=32",
            "cache:n_tokens=2400", "cache:store.dtype=float32", "cache:store.chunk_contexts=2",
            "cache:store.shard_contexts=4", f"cache:store.url={url}", "cache:progress=false", "cache:batch_size=4"]


def submitted(stdout: str) -> dict[str, tuple[str, str]]:
    """pipeline.sh's table: stage -> (job id, log file)."""
    jobs = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S+)\s+(\d+)\s+(\S+)$", line)
        if m:
            jobs[m.group(1)] = (m.group(2), m.group(3))
    return jobs


def logs_of(tmp_path: Path) -> str:
    return "\n".join(f"==> {p}\n{p.read_text()}" for p in sorted((tmp_path / "runs" / "slurm-logs").glob("*.out")))


def test_pipeline_sh_runs_the_stages_in_order_through_sbatch(slurm_cluster, tiny_model_dir, text_dir, tmp_path):
    from pipeline.store import ActivationStore
    url = tmp_path / "acts"
    stages = "cache,train" if HAS_TRAIN else "cache"
    out = subprocess.run([str(PIPELINE_SH), "--stages", stages, *cache_overrides(tiny_model_dir, text_dir, url)],
                         env=site_env(slurm_cluster, tmp_path), cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = submitted(out.stdout)
    assert {"cache-array", "cache-commit"} <= set(jobs), out.stdout
    array_id, commit_id = jobs["cache-array"][0], jobs["cache-commit"][0]
    assert slurm_cluster.job_state(commit_id).get("Dependency", "").startswith(f"afterok:{array_id}")

    assert slurm_cluster.wait_idle(240), "jobs still queued after 240 s:\n" + \
        slurm_cluster.run("squeue", check=False).stdout + logs_of(tmp_path)
    done = [r for r in slurm_cluster.completed() if int(r["JobId"]) >= int(array_id)]  # this test's jobs
    by_name: dict[str, list[dict]] = {}
    for rec in done:
        by_name.setdefault(rec["Name"], []).append(rec)
    assert all(r["JobState"] == "COMPLETED" for r in done), [(r["Name"], r["JobState"]) for r in done] + \
        [logs_of(tmp_path)]
    tasks, commit = by_name["pipeline-cache"], by_name["pipeline-cache-commit"]
    assert len(tasks) == 2 and len(commit) == 1
    assert commit[0]["StartTime"] >= max(t["EndTime"] for t in tasks), "the commit task ran before the array ended"

    # each array task wrote its half of the shards and left the commit to the final task
    logs = {p.name: p.read_text() for p in (tmp_path / "runs" / "slurm-logs").glob("*.out")}
    for k in (0, 1):
        log = logs[f"pipeline-cache-{array_id}_{k}.out"]
        assert f"worker {k}/2: 10 of 20 shards to write" in log, log
        assert f"output: store.url={url}" in log and "stage cache exited with 0" in log
        assert "committed" not in log
    commit_log = logs[f"pipeline-cache-commit-{commit_id}.out"]
    m = re.search(r"committed (\d+) tokens x 1 hook", commit_log)
    assert m, commit_log
    assert f"job log: {tmp_path}/runs/slurm-logs/pipeline-cache-commit-{commit_id}.out" in commit_log
    hydra_dir = tmp_path / "runs" / "slurm" / "cache" / commit_id
    assert (hydra_dir / ".hydra" / "config.yaml").exists() and str(hydra_dir) in commit_log
    store = ActivationStore.open(str(url))
    assert store.n_tokens == int(m.group(1)) >= 2400
    if HAS_TRAIN:
        train = by_name["pipeline-train"]
        assert train[0]["StartTime"] >= commit[0]["EndTime"] and train[0]["ProcCnt"] == "2"


def test_a_failed_stage_cancels_the_stages_after_it(slurm_cluster, tmp_path):
    """A bad override fails the cache array; its commit task (afterok) is cancelled, not left pending."""
    out = subprocess.run([str(PIPELINE_SH), "--stages", "cache", "cache:hooks=[no.such.module]",
                          "cache:model.name=/nonexistent/model", f"cache:store.url={tmp_path}/never"],
                         env=site_env(slurm_cluster, tmp_path), cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    jobs = submitted(out.stdout)
    assert slurm_cluster.wait_idle(120), slurm_cluster.run("squeue", check=False).stdout
    states = {r["JobId"]: r["JobState"] for r in slurm_cluster.completed()}
    assert states[jobs["cache-commit"][0]] == "CANCELLED", states
    assert not (tmp_path / "never").exists()


def test_site_settings_and_overrides_reach_sbatch(tmp_path):
    """--dry-run shows the sbatch lines: site.env values become options, STAGE:KEY=VALUE goes to
    that stage only, KEY=VALUE to all, and each job waits for the one before."""
    env = {**os.environ, "PARTITION": "gpu", "ACCOUNT": "proj1", "CACHE_TASKS": "3", "CACHE_ARRAY_LIMIT": "2",
           "CACHE_GPUS": "1", "EXTRA_SBATCH_ARGS": "--constraint=h100", "PIPELINE_RUNS": str(tmp_path)}
    out = subprocess.run([str(PIPELINE_SH), "--dry-run", "--stages", "cache", "--after", "77",
                          "cache:n_tokens=5", "seed=3"], env=env, capture_output=True, text=True, check=True)
    lines = [x for x in out.stderr.splitlines() if x.startswith("sbatch ")]
    assert len(lines) == 2
    array, commit = lines
    for opt in ("--partition=gpu", "--account=proj1", "--constraint=h100", "--array=0-2%2",
                "--gpus-per-task=1", "--dependency=afterok:77", f"--output={tmp_path}/slurm-logs/%x-%A_%a.out"):
        assert opt in array, (opt, array)
    assert array.endswith("slurm/cache.sbatch n_tokens=5 seed=3")
    assert "--dependency=afterok:<cache>" in commit and commit.endswith("cache.sbatch commit_only=true n_tokens=5 seed=3")


@pytest.mark.parametrize("argv, message", [
    (["--stages", "cache,bogus"], "unknown stage 'bogus'; choose from: cache train evaluate publish"),
    (["nonsense"], "'nonsense' is neither an option nor an override"),
    (["bogus:x=1"], "override 'bogus:x=1' names unknown stage 'bogus'"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
])
def test_pipeline_sh_bad_arguments_fail_clearly(argv, message):
    out = subprocess.run([str(PIPELINE_SH), "--dry-run", *argv], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_shell_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (Debian package `shellcheck`; .ci/run installs it)")
    scripts = [*sorted((ROOT / "slurm").glob("*.sh")), *sorted((ROOT / "slurm").glob("*.sbatch")),
               ROOT / "docker" / "entrypoint.sh"]
    out = subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR", "-s", "bash", *map(str, scripts)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout

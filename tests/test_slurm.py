"""The job scripts in slurm/ on a real one-node SLURM cluster (tests/slurm_cluster.py): the stages
are submitted by slurm/pipeline.sh, run through sbatch in dependency order, and leave their outputs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import netns_hosts
import system_packages
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (a session fixture)

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_SH = ROOT / "slurm" / "pipeline.sh"
# a tiny SAE on the tiny store: 400 steps of 64 rows; pre-empted after its first checkpoint (step 50)
STEPS = 400
TRAIN = ["sae.n_features=64", "sae.k=4", "sae.k_aux=16", f"n_tokens={64 * STEPS}", "batch_size=64",
         "checkpoint_every=50", "log_every=50", "progress=false"]


def site_env(cluster: SlurmCluster, work: Path, **extra) -> dict[str, str]:
    """Site settings for the 2-CPU test node: no GPUs, small tasks, everything in `work`."""
    return {**cluster.env, "PIPELINE_PYTHON": sys.executable, "PARTITION": cluster.partition,
            "WORK_DIR": str(work), "CACHE_TASKS": "2", "CACHE_CPUS": "1", "CACHE_GPUS": "0",
            "CACHE_TIME": "10:00", "TRAIN_NODES": "1", "TRAIN_GPUS_PER_NODE": "0", "TRAIN_TASKS_PER_NODE": "2",
            "TRAIN_CPUS_PER_TASK": "1", "TRAIN_TIME": "15:00", "PREEMPT_GRACE": "60",
            "EVAL_GPUS": "0", "EVAL_CPUS": "1", "EVAL_TIME": "10:00", "PUBLISH_CPUS": "1", "PUBLISH_TIME": "10:00",
            "OMP_NUM_THREADS": "1", **extra}


def model_overrides(stage: str, model_dir, text_dir) -> list[str]:
    """The tiny 4-layer model and a few kilobytes of text instead of the embedded SmolLM2 + corpus."""
    p = "" if stage == "cache" else "input."  # the analysis stages' section (pipeline/analysis/config.py)
    return [f"{stage}:{p}model.name={model_dir}", f"{stage}:{p}model.device=cpu", f"{stage}:{p.replace('.', '/')}data=files",
            f"{stage}:{p}data.path=[{text_dir}/*]", f"{stage}:{p}context_size=32"]


def pipeline_overrides(model_dir, text_dir) -> list[str]:
    """The embedded default's chain of paths (runs/demo/... in WORK_DIR), with small sizes: 2400
    tokens of a tiny model in 20 shards, a 64-feature SAE trained by 2 feature-sharded ranks."""
    cache = ["cache:hooks=[layers.2]", "cache:n_tokens=2400", "cache:store.dtype=float32",
             "cache:store.chunk_contexts=2", "cache:store.shard_contexts=4", "cache:progress=false",
             "cache:batch_size=4"]
    train = [f"train:{a}" for a in TRAIN] + ["train:parallel.feature_parallel=2"]
    evaluate = ["evaluate:input.n_tokens=512", "evaluate:input.batch_size=4", "evaluate:progress=false"]
    publish = ["publish:checkpoints=[runs/demo/train/topk/sae]", "publish:eval_dirs=[runs/demo/evaluate]",
               "publish:progress=false"]
    return [*model_overrides("cache", model_dir, text_dir), *cache, *train,
            *model_overrides("evaluate", model_dir, text_dir), *evaluate, *publish]


def submitted(stdout: str) -> dict[str, tuple[str, str]]:
    """pipeline.sh's table: stage -> (job id, log file)."""
    jobs = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\S+)\s+(\d+)\s+(\S+)$", line)
        if m:
            jobs[m.group(1)] = (m.group(2), m.group(3))
    return jobs


def all_logs(log_dir: Path) -> str:
    return "\n".join(f"==> {p}\n{p.read_text()}" for p in sorted(log_dir.glob("*.out")))


@pytest.fixture(scope="module")
def pipeline_run(slurm_cluster, tiny_model_dir, text_dir, tmp_path_factory):  # noqa: F811
    """slurm/pipeline.sh submitted once: cache (array + commit) -> train -> evaluate -> publish. The
    training job is pre-empted the way SLURM does it (USR1 to the batch shell) once it has written
    its first checkpoint."""
    work = tmp_path_factory.mktemp("work")
    # RUN_PREFIX as a container runtime would use it (apptainer exec ...): it must wrap every command
    env = site_env(slurm_cluster, work, RUN_PREFIX="env PIPELINE_TEST_PREFIX=1")
    out = subprocess.run([str(PIPELINE_SH), *pipeline_overrides(tiny_model_dir, text_dir)],
                         env=env, cwd=work, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = submitted(out.stdout)
    deps = {stage: slurm_cluster.job_state(job).get("Dependency") for stage, (job, _) in jobs.items()}
    log_dir = work / "runs" / "slurm-logs"
    train_id = jobs["train"][0]
    latest = work / "runs/demo/train/topk/checkpoints/latest"
    deadline = time.time() + 300
    while not latest.exists() and time.time() < deadline and \
            slurm_cluster.job_state(train_id).get("JobState") in ("PENDING", "RUNNING"):
        time.sleep(0.1)
    signalled = slurm_cluster.run("scancel", "--batch", "--signal=USR1", train_id, check=False)
    idle = slurm_cluster.wait_idle(420)
    ended = time.strftime("%Y-%m-%dT%H:%M:%S")
    yield SimpleNamespace(ended=ended, work=work, jobs=jobs, deps=deps, stdout=out.stdout, log_dir=log_dir,
                          idle=idle, signalled=signalled, squeue=slurm_cluster.run("squeue", check=False).stdout)


def finished_jobs(cluster: SlurmCluster, first_id: str, submitted_by: str) -> list[dict]:
    """This run's jobs: ids from its first one on (array tasks get later ids), submitted before it ended."""
    return [r for r in cluster.completed() if int(r["JobId"]) >= int(first_id) and r["SubmitTime"] <= submitted_by]


def test_pipeline_sh_runs_the_four_stages_in_order_through_sbatch(slurm_cluster, pipeline_run):  # noqa: F811
    from pipeline.store import ActivationStore
    run, jobs = pipeline_run, pipeline_run.jobs
    assert run.idle, "jobs still queued:\n" + run.squeue + all_logs(run.log_dir)
    assert {"cache-array", "cache-commit", "train", "evaluate", "publish"} == set(jobs), run.stdout
    ids = {k: v[0] for k, v in jobs.items()}
    for before, after in [("cache-array", "cache-commit"), ("cache-commit", "train"), ("train", "evaluate"),
                          ("evaluate", "publish")]:
        assert run.deps[after].startswith(f"afterok:{ids[before]}"), run.deps  # as submitted
    done = finished_jobs(slurm_cluster, ids["cache-array"], run.ended)
    final = {}
    for rec in done:
        final.setdefault(rec["Name"], []).append(rec)
    states = [(r["Name"], r["JobId"], r["JobState"]) for r in done]
    tasks = final["pipeline-cache"]
    assert len(tasks) == 2 and all(r["JobState"] == "COMPLETED" for r in tasks), states
    chain = [final[n][-1] for n in ("pipeline-cache-commit", "pipeline-train", "pipeline-evaluate", "pipeline-publish")]
    assert [r["JobState"] for r in chain] == ["COMPLETED"] * 4, (states, all_logs(run.log_dir))
    ends = [max(r["EndTime"] for r in tasks)] + [r["EndTime"] for r in chain]
    starts = [r["StartTime"] for r in chain]
    assert all(s >= e for s, e in zip(starts, ends)), f"a stage started before the one it depends on: {states}"
    assert final["pipeline-train"][-1]["ProcCnt"] == "2"

    logs = {p.name: p.read_text() for p in run.log_dir.glob("*.out")}
    for k in (0, 1):  # each array task wrote its half of the shards and left the commit to the last task
        log = logs[f"pipeline-cache-{ids['cache-array']}_{k}.out"]
        assert f"worker {k}/2: 10 of 20 shards to write" in log, log
        assert f"output: store.url=runs/demo/activations" in log and "stage cache exited with 0" in log
        assert "committed" not in log
    commit_log = logs[f"pipeline-cache-commit-{ids['cache-commit']}.out"]
    m = re.search(r"committed (\d+) tokens x 1 hook", commit_log)
    assert m, commit_log
    assert f"job log: {run.log_dir}/pipeline-cache-commit-{ids['cache-commit']}.out" in commit_log
    hydra_dir = run.work / "runs" / "slurm" / "cache" / ids["cache-commit"]
    assert (hydra_dir / ".hydra" / "config.yaml").exists() and str(hydra_dir) in commit_log
    assert ActivationStore.open(str(run.work / "runs/demo/activations")).n_tokens == int(m.group(1)) >= 2400

    train_log = logs[f"pipeline-train-{ids['train']}.out"]
    assert "command: srun --kill-on-bad-exit=1 env PIPELINE_TEST_PREFIX=1 " in train_log
    assert f"command: env PIPELINE_TEST_PREFIX=1 {sys.executable} -m pipeline.cache" in commit_log
    assert "rank 0/2" in train_log and "rank 1/2" in train_log and "output: out_dir=runs/demo/train/topk" in train_log
    assert "output: out_dir=runs/demo/evaluate" in logs[f"pipeline-evaluate-{ids['evaluate']}.out"]
    assert (run.work / "runs/demo/evaluate/metrics.json").exists()
    release = run.work / "runs/demo/release"
    assert (release / "README.md").exists() and (release / "layers.2" / "cfg.json").exists(), \
        logs[f"pipeline-publish-{ids['publish']}.out"]


@pytest.fixture(scope="module")
def uninterrupted(pipeline_run, tmp_path_factory):
    """The same training, never interrupted: 2 feature-sharded ranks, one per test host (network
    namespaces) through pipeline.launch, or, where namespaces cannot be made, 2 local ranks."""
    store = pipeline_run.work / "runs/demo/activations"
    out = tmp_path_factory.mktemp("uninterrupted")
    argv = [sys.executable, "-m", "pipeline.train", *TRAIN, "parallel.feature_parallel=2", f"data.url={store}",
            f"out_dir={out}/train", f"hydra.run.dir={out}/hydra"]
    reason = netns_hosts.why_unavailable()
    if reason is None:
        with netns_hosts.TwoHosts() as hosts:
            codes, logs = hosts.launch(lambda rank: argv, out, timeout=400)
    else:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            *argv[1:]], env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True,
                           text=True, timeout=400)
        codes, logs = [p.returncode], p.stdout + p.stderr
    assert codes == [0] * len(codes), logs[-6000:]
    return SimpleNamespace(sae=out / "train" / "sae", two_hosts=reason is None, why_not=reason, logs=logs,
                           store=store, dir=out)


def weights(folder: Path) -> dict:
    from pipeline.sae import load
    return load(folder).state_dict()


def test_preempted_training_checkpoints_requeues_resumes_and_ends_with_the_same_weights(
        slurm_cluster, pipeline_run, uninterrupted):  # noqa: F811
    """USR1 to the batch shell (what --signal=B:USR1@GRACE does) -> the ranks checkpoint and stop ->
    the job requeues itself -> the rerun resumes from that checkpoint -> evaluate waits (afterok).
    Note: the weights usually match bit for bit; one run of this test on a busy machine differed by
    ~1e-7 relative (fp32 round-off), which the trainer's own resume tests do not show, so the
    comparison allows fp32 round-off rather than fail by chance."""
    run = pipeline_run
    assert run.signalled.returncode == 0, run.signalled.stderr
    train_id = run.jobs["train"][0]
    log = (run.log_dir / f"pipeline-train-{train_id}.out").read_text()
    m = re.search(r"stopped by a signal after step (\d+)", log)
    assert "USR1 (pre-emption or time limit)" in log and m, log
    stopped = int(m.group(1))
    assert 0 < stopped < STEPS
    assert f"requeueing job {train_id} to resume" in log and "(restart 1)" in log
    assert f"resumed from runs/demo/train/topk/checkpoints/step-{stopped} at step {stopped}" in log, log
    runs = [r for r in slurm_cluster.completed() if r["JobId"] == train_id]
    assert len(runs) == 2 and runs[-1]["JobState"] == "COMPLETED", runs  # the requeued run, then the final one
    # the same weights as a run that was never stopped (up to fp32 round-off: see the note above)
    a, b = weights(run.work / "runs/demo/train/topk/sae"), weights(uninterrupted.sae)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_two_hosts_train_the_same_dictionary_as_one_process(uninterrupted):
    """The feature-sharded result of one rank per host (rendezvous over the veth link, through the
    launch code the sbatch script uses) equals a single-process run."""
    if not uninterrupted.two_hosts:
        pytest.skip(uninterrupted.why_not)
    assert "[launch] node 0/2" in uninterrupted.logs and "[launch] node 1/2" in uninterrupted.logs
    assert "master plhost1:" in uninterrupted.logs
    single = uninterrupted.dir / "single"
    p = subprocess.run([sys.executable, "-m", "pipeline.train", *TRAIN, f"data.url={uninterrupted.store}",
                        f"out_dir={single}", f"hydra.run.dir={uninterrupted.dir}/hydra1"], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    a, b = weights(single / "sae"), weights(uninterrupted.sae)
    assert a.keys() == b.keys()
    # 400 fp32 steps of top-k: the two reductions sum in different orders, and a rare top-k tie can
    # flip one latent for a step, so single elements may drift; whole tensors agree to ~2e-5 and the
    # final loss to ~3e-7 (seen here), which is what a wrong sharding could never produce.
    for name in a:
        diff = (b[name].double() - a[name].double()).norm() / a[name].double().norm().clamp_min(1e-12)
        assert diff < 1e-4, (name, float(diff))
    last = [json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (single, uninterrupted.sae.parent)]
    assert last[1]["loss"] == pytest.approx(last[0]["loss"], rel=1e-5)


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


def test_family_sbatch_runs_the_family_driver(slurm_cluster, tmp_path):
    """slurm/family.sbatch runs pipeline.family as one job; here only its report step, on a family with
    nothing done yet: the report says so for every section, and the log says where it went."""
    job = slurm_cluster.run("sbatch", "--parsable", f"--partition={slurm_cluster.partition}",
                            f"--output={tmp_path}/family.log", str(ROOT / "slurm" / "family.sbatch"),
                            "steps=[report]", "sizes=[8,16]", f"out_dir={tmp_path}/fam", f"corpus={tmp_path}/none",
                            f"report={tmp_path}/results.md",
                            env={**site_env(slurm_cluster, tmp_path), "PIPELINE_ROOT": str(ROOT)},
                            cwd=tmp_path).stdout.strip()
    assert slurm_cluster.wait_idle(180), slurm_cluster.run("squeue", check=False).stdout
    log = (tmp_path / "family.log").read_text()
    assert slurm_cluster.job_state(job).get("JobState", "COMPLETED") == "COMPLETED", log
    assert "stage family exited with 0" in log and f"output: report={tmp_path}/results.md" in log, log
    report = (tmp_path / "results.md").read_text()
    assert "8 → 16: not run" in report and "| 16 | not run |" in report


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
    assert "--dependency=afterok:<cache>" in commit
    assert commit.endswith("cache.sbatch commit_only=true n_tokens=5 seed=3")


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
        pytest.skip(system_packages.missing("shellcheck", "lints the job scripts and docker/entrypoint.sh"))
    scripts = [*sorted((ROOT / "slurm").glob("*.sh")), *sorted((ROOT / "slurm").glob("*.sbatch")),
               ROOT / "docker" / "entrypoint.sh"]
    out = subprocess.run(["shellcheck", "-x", "-P", "SCRIPTDIR", "-s", "bash", *map(str, scripts)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout

"""Multi-node launch logic (pipeline/launch.py): host lists, ranks and rendezvous from made-up SLURM
environments for 1, 2 and 16 nodes; then the same code for real, under srun on the embedded cluster
and across two network-namespace hosts joined by a veth pair."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.launch import (LaunchPlan, command, expand_hostlist, job_port, master_from_env, plan_from_env,
                             tasks_per_node)
import netns_hosts
from netns_hosts import slurm_env
from slurm_cluster import slurm_cluster  # noqa: F401  (a session fixture)

ROOT = Path(__file__).resolve().parent.parent


# -- host lists ---------------------------------------------------------------------------------
@pytest.mark.parametrize("hostlist, hosts", [
    ("gpu07", ["gpu07"]),
    ("a,b,c", ["a", "b", "c"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[8-10]", ["node8", "node9", "node10"]),
    ("node[08-10]", ["node08", "node09", "node10"]),
    ("gpu-a[1-2]-ib,login", ["gpu-a1-ib", "gpu-a2-ib", "login"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x[1,3],y[001-002],z", ["x1", "x3", "y001", "y002", "z"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad, message", [
    ("", "empty SLURM host list"),
    ("node[01-03", "unbalanced brackets"),
    ("node[a-b]", "bad range 'a-b'"),
    ("node[1-]", "bad range '1-'"),
])
def test_expand_hostlist_bad_input(bad, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        expand_hostlist(bad)


def test_expand_hostlist_agrees_with_scontrol(slurm_cluster):  # noqa: F811
    for hostlist in ("node[01-03,07]", "r[1-2]n[08-10]", "a,b[1-3],c", "gpu[098-101]"):
        out = slurm_cluster.run("scontrol", "show", "hostnames", hostlist).stdout.split()
        assert expand_hostlist(hostlist) == out, hostlist


def test_tasks_per_node():
    assert tasks_per_node("8") == [8]
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ConfigError, match="SLURM_TASKS_PER_NODE='2x3'"):
        tasks_per_node("2x3")


# -- plans from made-up SLURM environments --------------------------------------------------------
@pytest.mark.parametrize("nodelist, nnodes, per_node, first", [
    ("gpu07", 1, 4, "gpu07"),
    ("node[01-02]", 2, 8, "node01"),
    ("r[1-2]n[01-08]", 16, 8, "r1n01"),
])
def test_every_rank_of_a_job_agrees_on_the_rendezvous(nodelist, nnodes, per_node, first):
    hosts = expand_hostlist(nodelist)
    plans = [plan_from_env(slurm_env(nodelist, nnodes, per_node, r)) for r in range(nnodes * per_node)]
    assert {(p.master_addr, p.master_port) for p in plans} == {(first, job_port(4242))}
    assert [p.rank for p in plans] == list(range(nnodes * per_node))
    for p in plans:
        assert p.world_size == nnodes * per_node and p.nnodes == nnodes and p.nproc_per_node == per_node
        assert p.node_rank == p.rank // per_node and p.local_rank == p.rank % per_node
        assert hosts[p.node_rank] == hosts[p.rank // per_node]
    env = plans[-1].env()
    assert env == {"MASTER_ADDR": first, "MASTER_PORT": str(job_port(4242)), "RANK": str(nnodes * per_node - 1),
                   "LOCAL_RANK": str(per_node - 1), "WORLD_SIZE": str(nnodes * per_node),
                   "LOCAL_WORLD_SIZE": str(per_node), "NODE_RANK": str(nnodes - 1), "GROUP_RANK": str(nnodes - 1),
                   "NNODES": str(nnodes)}


def test_16_nodes_one_launcher_per_node_runs_torchrun():
    env = slurm_env("r[1-2]n[01-08]", 16, 1, 5)
    plan = plan_from_env(env, nproc_per_node=8)
    assert (plan.node_rank, plan.world_size, plan.rank) == (5, 128, None)
    cmd = command(plan, ["python", "-m", "pipeline.train", "steps=10"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert cmd[3:] == ["--nnodes=16", "--node-rank=5", "--nproc-per-node=8", "--master-addr=r1n01",
                       f"--master-port={job_port(4242)}", "--no-python", "python", "-m", "pipeline.train", "steps=10"]
    assert "RANK" not in plan.env() and plan.env()["WORLD_SIZE"] == "128"


def test_master_set_by_the_batch_script_wins_and_ports_differ_between_jobs():
    env = slurm_env("node[01-02]", 2, 2, 3, MASTER_ADDR="10.1.2.3", MASTER_PORT="31337")
    p = plan_from_env(env)
    assert (p.master_addr, p.master_port) == ("10.1.2.3", 31337)
    assert job_port(1) != job_port(2)
    assert master_from_env({"SLURM_JOB_NODELIST": "node[07-09]"}, use_scontrol=False)[0] == "node07"


def test_uneven_tasks_per_node_and_step_variables():
    # 3 + 3 + 2 tasks; a step on all nodes sets its own counts, which win over the job's
    env = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS": "8",
           "SLURM_STEP_TASKS_PER_NODE": "3(x2),2", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_NODEID": "2", "SLURM_PROCID": "7", "SLURM_LOCALID": "1"}
    p = plan_from_env(env)
    assert (p.node_rank, p.local_rank, p.nproc_per_node, p.world_size) == (2, 1, 2, 8)


def test_torchrun_variables_pass_through_and_no_variables_mean_one_process():
    p = plan_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "h", "MASTER_PORT": "1234", "NODE_RANK": "1"})
    assert (p.rank, p.local_rank, p.node_rank, p.nnodes, p.master_addr) == (3, 1, 1, 2, "h")
    p = plan_from_env({})
    assert (p.rank, p.world_size, p.master_addr) == (0, 1, "127.0.0.1") and p.master_port > 0


@pytest.mark.parametrize("change, message", [
    ({"SLURM_NTASKS": "5"}, "SLURM_NTASKS=5 but SLURM_TASKS_PER_NODE='2\\(x2\\)' sums to 4"),
    ({"SLURM_JOB_NUM_NODES": "3", "SLURM_NNODES": "3"},
     "SLURM_JOB_NUM_NODES=3 but host list 'node\\[01-02\\]' names 2"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
    ({"SLURM_PROCID": "9"}, "rank=9 / local_rank=1 outside world_size=4"),
])
def test_inconsistent_slurm_environments_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        plan_from_env({**slurm_env("node[01-02]", 2, 2, 3), **change})


def test_plan_validation_names_every_value():
    with pytest.raises(ConfigError, match="node_rank=2, nnodes=2, nproc_per_node=1, world_size=2"):
        LaunchPlan("h", 1, 2, 2, 1, 2)


# -- the command line, as the sbatch script calls it ----------------------------------------------
SHOW_ENV = [sys.executable, "-c", "import os; print(' '.join(f'{k}={os.environ[k]}' for k in "
            "('RANK','LOCAL_RANK','WORLD_SIZE','NODE_RANK','MASTER_ADDR','MASTER_PORT')))"]


def run_launch(*argv, env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_"))}
    return subprocess.run([sys.executable, "-m", "pipeline.launch", *argv], env={**clean, **env},
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_run_sets_the_variables_and_execs_the_command():
    out = run_launch("run", "--", *SHOW_ENV, env=slurm_env("node[01-02]", 2, 2, 2))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["RANK=2", "LOCAL_RANK=0", "WORLD_SIZE=4", "NODE_RANK=1", "MASTER_ADDR=node01",
                                  f"MASTER_PORT={job_port(4242)}"]
    assert "[launch] node 1/2" in out.stderr and "rank 2/4, master node01" in out.stderr
    out = run_launch("master", env={"SLURM_JOB_NODELIST": "node[03-04]"})
    assert out.stdout.startswith("export MASTER_ADDR=node03 MASTER_PORT=")


def test_cli_bad_environment_is_a_clear_error():
    out = run_launch("env", env={"SLURM_JOB_ID": "1", "SLURM_PROCID": "0"})
    assert out.returncode == 2
    assert "SLURM_JOB_NODELIST is not set" in out.stderr and "Traceback" not in out.stderr
    out = run_launch("run", env=slurm_env("n1", 1, 1, 0))
    assert out.returncode == 2 and "no command to launch" in out.stderr


# -- for real: srun on the embedded cluster, and two hosts in network namespaces ------------------
ALLREDUCE = textwrap.dedent("""
    import os, socket, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    x = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(x)
    with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.txt"), "w") as f:
        f.write(f"{dist.get_rank()} {dist.get_world_size()} {os.environ['LOCAL_RANK']} {x.item():g}")
    dist.destroy_process_group()
""")


def test_srun_starts_ranks_that_form_one_process_group(slurm_cluster, tmp_path):  # noqa: F811
    """The sbatch scripts' own sequence: master on the batch host, then srun + pipeline.launch."""
    (tmp_path / "allreduce.py").write_text(ALLREDUCE)
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
set -euo pipefail
cd {ROOT}
eval "$({sys.executable} -m pipeline.launch master)"
echo "master $MASTER_ADDR:$MASTER_PORT"
srun --kill-on-bad-exit=1 {sys.executable} -m pipeline.launch run -- {sys.executable} {tmp_path}/allreduce.py {tmp_path}
""")
    out = slurm_cluster.run("sbatch", "--parsable", "--wait", "--ntasks=2", "--cpus-per-task=1",
                            f"--output={tmp_path}/job.out", str(script), check=False, timeout=180)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else out.stderr
    assert out.returncode == 0, log
    results = sorted((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert results == ["0 2 0 3", "1 2 1 3"], log
    assert f"master {slurm_cluster.host}:" in log


@pytest.fixture
def two_hosts():
    reason = netns_hosts.why_unavailable()
    if reason:
        pytest.skip(reason)
    with netns_hosts.TwoHosts() as hosts:
        yield hosts


def test_two_hosts_in_network_namespaces_rendezvous_over_the_veth_link(two_hosts, tmp_path):
    """One rank per host (namespaces with 10.200.0.1 and .2), the master found from the host list."""
    (tmp_path / "allreduce.py").write_text(ALLREDUCE)
    codes, logs = two_hosts.launch(lambda r: [sys.executable, str(tmp_path / "allreduce.py"), str(tmp_path)],
                                   tmp_path, timeout=120)
    assert codes == [0, 0], logs
    assert sorted((tmp_path / f"rank{r}.txt").read_text() for r in range(2)) == ["0 2 0 3", "1 2 0 3"]
    assert "master plhost1:" in logs

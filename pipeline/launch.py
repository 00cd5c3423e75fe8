"""Multi-node launch: from a SLURM allocation (or torchrun's own variables) to the torchrun-style
environment every distributed stage reads (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, NODE_RANK, NNODES). The one place the sbatch scripts, the Docker entrypoint and
the tests turn an allocation into ranks.

    # in an sbatch script, on the batch host (the allocation's first node): pick the rendezvous
    eval "$(python -m pipeline.launch master)"        # exports MASTER_ADDR, MASTER_PORT
    # one task per GPU (srun --ntasks-per-node=G): each task sets its rank and runs the stage
    srun python -m pipeline.launch run -- python -m pipeline.train [overrides]
    # one task per node (srun --ntasks-per-node=1): each starts torchrun with G processes
    srun python -m pipeline.launch run --nproc-per-node=G -- python -m pipeline.train [overrides]
    # what a task would get, without running anything
    python -m pipeline.launch env

Rules: the master is the first host of SLURM_JOB_NODELIST; an already-set MASTER_ADDR/MASTER_PORT
wins (the batch script exports them, srun passes them on); the port otherwise comes from the job id,
so every node computes the same one without talking.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

from pipeline.errors import USER_ERROR_EXIT, ConfigError

PORT_BASE, PORT_SPAN = 20000, 20000
"""Ports derived from a job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN)."""

_HOSTLIST_ITEM = re.compile(r"(?:[^,\[]|\[[^\]]*\])+")


# -- host lists ---------------------------------------------------------------------------------
def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list to host names, in order: `node[01-03,07],gpu-a[1-2]-b`
    -> node01 node02 node03 node07 gpu-a1-b gpu-a2-b. Zero padding is kept; several bracket groups
    in one name expand as a product (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2), like `scontrol show
    hostnames`."""
    hostlist = hostlist.strip()
    if not hostlist:
        raise ConfigError("empty SLURM host list; expected e.g. node[01-04] or a,b,c")
    if hostlist.count("[") != hostlist.count("]"):
        raise ConfigError(f"host list {hostlist!r} has unbalanced brackets; expected e.g. node[01-04,07]")
    hosts: list[str] = []
    pos = 0
    for m in _HOSTLIST_ITEM.finditer(hostlist):
        if hostlist[pos:m.start()].strip(","):
            raise ConfigError(f"cannot parse host list {hostlist!r} near {hostlist[pos:m.start()]!r}")
        pos = m.end()
        hosts.extend(_expand_one(m.group(0), hostlist))
    return hosts


def _expand_one(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if m is None:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    out = []
    for part in m.group(1).split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(f"bad range {part!r} in host list {whole!r}; expected N or N-M, e.g. node[01-04,07]")
        width = len(lo)  # SLURM pads to the width of the lower bound: [08-10] -> 08 09 10
        for i in range(int(lo), int(hi if sep else lo) + 1):
            out.extend(f"{head}{i:0{width}d}{rest}" for rest in _expand_one(tail, whole))
    return out


SLURM_CONF_DEFAULT = "/etc/slurm/slurm.conf"


def scontrol_hostnames(hostlist: str) -> list[str] | None:
    """`scontrol show hostnames` where SLURM is installed and configured, else None. Without a
    slurm.conf, scontrol would look for its controller in DNS: not asked then."""
    exe = shutil.which("scontrol")
    conf = os.environ.get("SLURM_CONF", SLURM_CONF_DEFAULT)
    if exe is None or not os.path.isfile(conf):
        return None
    try:
        r = subprocess.run([exe, "show", "hostnames", hostlist], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    return r.stdout.split() if r.returncode == 0 and r.stdout.strip() else None


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE (`2(x3),1`) to one count per node: [2, 2, 2, 1]."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ConfigError(f"cannot parse SLURM_TASKS_PER_NODE={spec!r}; expected e.g. 4 or 2(x3),1")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def free_port(host: str = "") -> int:
    """A TCP port free on this host now (the batch host is the master, so it is free there)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def job_port(job_id: str | int) -> int:
    """The port every node derives from the job id alone: the same on all of them, and
    different for jobs that share a master host."""
    return PORT_BASE + int(job_id) % PORT_SPAN


# -- the plan -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LaunchPlan:
    """Where this process (or this node's launcher) sits in the job."""

    master_addr: str
    master_port: int
    nnodes: int
    node_rank: int
    nproc_per_node: int
    """Processes on this node."""
    world_size: int
    rank: int | None = None
    """This process's global rank; None for a per-node launcher (torchrun assigns ranks)."""
    local_rank: int | None = None

    def __post_init__(self):
        if not (0 <= self.node_rank < self.nnodes and 1 <= self.nproc_per_node <= self.world_size
                and 1 <= self.master_port < 65536):
            raise ConfigError(f"inconsistent launch plan: node_rank={self.node_rank}, nnodes={self.nnodes}, "
                              f"nproc_per_node={self.nproc_per_node}, world_size={self.world_size}, "
                              f"master_port={self.master_port}")
        if self.rank is not None and not (0 <= self.rank < self.world_size
                                          and 0 <= (self.local_rank or 0) < self.nproc_per_node):
            raise ConfigError(f"rank={self.rank} / local_rank={self.local_rank} outside world_size="
                              f"{self.world_size} / nproc_per_node={self.nproc_per_node}")

    def env(self) -> dict[str, str]:
        """The torchrun-style variables for this process (a launcher gets the rendezvous only)."""
        out = {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
               "WORLD_SIZE": str(self.world_size), "NODE_RANK": str(self.node_rank),
               "GROUP_RANK": str(self.node_rank), "NNODES": str(self.nnodes),
               "LOCAL_WORLD_SIZE": str(self.nproc_per_node)}
        if self.rank is not None:
            out.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank or 0))
        return out

    def torchrun_args(self) -> list[str]:
        """torchrun flags for a per-node launcher (static rendezvous on the master)."""
        return [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}",
                f"--nproc-per-node={self.nproc_per_node}", f"--master-addr={self.master_addr}",
                f"--master-port={self.master_port}"]


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for n in names:
        if env.get(n, "").strip():
            try:
                return int(env[n])
            except ValueError:
                raise ConfigError(f"{n}={env[n]!r} is not an integer") from None
    if default is None:
        raise ConfigError(f"none of {', '.join(names)} is set; is this running inside a SLURM job step (srun)?")
    return default


def plan_from_env(env: Mapping[str, str] | None = None, nproc_per_node: int | None = None,
                  use_scontrol: bool = False) -> LaunchPlan:
    """The plan for this process from SLURM_* variables (inside `srun`), else from torchrun-style
    ones already set, else a single process on loopback.

    nproc_per_node: processes this task starts itself (a per-node launcher running torchrun).
    None or 1: this task *is* one rank, the SLURM task layout decides the ranks."""
    env = os.environ if env is None else env
    launcher = nproc_per_node is not None and nproc_per_node > 1
    if "SLURM_JOB_ID" in env and ("SLURM_PROCID" in env or "SLURM_NODEID" in env):
        # a job step (srun) may span fewer nodes than the job: its own variables come first
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ConfigError("SLURM_JOB_NODELIST is not set; cannot find the master host")
        hosts = (use_scontrol and scontrol_hostnames(nodelist)) or expand_hostlist(nodelist)
        nnodes = _int(env, "SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=len(hosts))
        if nnodes != len(hosts):
            raise ConfigError(f"SLURM_JOB_NUM_NODES={nnodes} but host list {nodelist!r} names {len(hosts)} hosts")
        node_rank = _int(env, "SLURM_NODEID")
        addr = env.get("MASTER_ADDR") or hosts[0]
        port = _int(env, "MASTER_PORT", default=job_port(env["SLURM_JOB_ID"]))
        if launcher:
            return LaunchPlan(addr, port, nnodes, node_rank, nproc_per_node, nnodes * nproc_per_node)
        spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
        counts = tasks_per_node(spec) if spec else [_int(env, "SLURM_NTASKS_PER_NODE", default=1)] * nnodes
        if len(counts) != nnodes:
            raise ConfigError(f"SLURM_TASKS_PER_NODE={spec!r} gives {len(counts)} nodes, the job has {nnodes}")
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=sum(counts))
        if world != sum(counts):
            raise ConfigError(f"SLURM_NTASKS={world} but SLURM_TASKS_PER_NODE={spec!r} sums to {sum(counts)}")
        rank = _int(env, "SLURM_PROCID")
        local = _int(env, "SLURM_LOCALID", default=rank - sum(counts[:node_rank]))
        return LaunchPlan(addr, port, nnodes, node_rank, counts[node_rank], world, rank, local)
    # torchrun (or a user) already set the variables: pass them through, checked
    if "WORLD_SIZE" in env or "RANK" in env:
        world = _int(env, "WORLD_SIZE")
        nper = _int(env, "LOCAL_WORLD_SIZE", default=world)
        return LaunchPlan(env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", default=29500),
                          _int(env, "NNODES", default=max(1, world // nper)),
                          _int(env, "NODE_RANK", "GROUP_RANK", default=0), nper, world, _int(env, "RANK"),
                          _int(env, "LOCAL_RANK", default=0))
    n = nproc_per_node or 1
    port = _int(env, "MASTER_PORT", default=0) or free_port("127.0.0.1")
    if launcher:
        return LaunchPlan(env.get("MASTER_ADDR", "127.0.0.1"), port, 1, 0, n, n)
    return LaunchPlan(env.get("MASTER_ADDR", "127.0.0.1"), port, 1, 0, 1, 1, 0, 0)


def master_from_env(env: Mapping[str, str] | None = None, use_scontrol: bool = True) -> tuple[str, int]:
    """For the batch script on the first node: the allocation's first host and a port free here."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", default=0) or free_port("127.0.0.1")
    hosts = (use_scontrol and scontrol_hostnames(nodelist)) or expand_hostlist(nodelist)
    addr = env.get("MASTER_ADDR") or hosts[0]
    return addr, _int(env, "MASTER_PORT", default=0) or free_port()


# -- command line -------------------------------------------------------------------------------
def command(plan: LaunchPlan, cmd: Sequence[str]) -> list[str]:
    """What runs: the command itself (one rank), or torchrun starting nproc_per_node copies."""
    if not cmd:
        raise ConfigError("no command to launch; usage: python -m pipeline.launch run -- python -m pipeline.train ...")
    if plan.rank is None:
        return [sys.executable, "-m", "torch.distributed.run", *plan.torchrun_args(), "--no-python", *cmd]
    return list(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.launch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("master", help="print `export MASTER_ADDR=... MASTER_PORT=...` for the batch script")
    for name in ("env", "run"):
        s = sub.add_parser(name, help="print this task's variables" if name == "env"
                           else "set this task's variables and exec the command after --")
        s.add_argument("--nproc-per-node", type=int, default=None,
                       help="start this many processes with torchrun (one SLURM task per node)")
        if name == "run":
            s.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    try:
        if a.what == "master":
            addr, port = master_from_env()
            print(f"export MASTER_ADDR={shlex.quote(addr)} MASTER_PORT={port}")
            return 0
        plan = plan_from_env(nproc_per_node=a.nproc_per_node, use_scontrol=True)
        if a.what == "env":
            print("\n".join(f"{k}={v}" for k, v in plan.env().items()))
            return 0
        cmd = command(plan, a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd)
    except ConfigError as e:
        print(f"pipeline.launch: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    where = f"rank {plan.rank}/{plan.world_size}" if plan.rank is not None else \
        f"{plan.nproc_per_node} processes of {plan.world_size}"
    print(f"[launch] node {plan.node_rank}/{plan.nnodes} ({socket.gethostname()}): {where}, "
          f"master {plan.master_addr}:{plan.master_port}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    os.environ.update(plan.env())
    os.execvp(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())

"""Two test hosts of our own on one machine: network namespaces joined by a veth pair, each with
its own address (10.200.0.1, 10.200.0.2) and host name (plhost1, plhost2, in the namespace's own
/etc/hosts). Processes started in them reach each other only over that link; nothing is routed
anywhere else. Used to run one rank per "node" through pipeline.launch, as srun would.

    with TwoHosts() as hosts:
        codes, logs = hosts.launch(lambda rank: [...command...], tmp_path)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import system_packages

ROOT = Path(__file__).resolve().parent.parent
ADDRS = ("10.200.0.1", "10.200.0.2")
HOSTNAMES = ("plhost1", "plhost2")
NODELIST = "plhost[1-2]"
IFNAME = "pl0"


def why_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return system_packages.missing("iproute2", "the two-host test makes network namespaces with `ip netns`")
    if os.geteuid() != 0:
        return "the two-host test makes network namespaces: run the tests as root"
    probe = f"plprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"network namespaces cannot be made here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def slurm_env(nodelist: str, nnodes: int, per_node: int, rank: int, job_id: int = 4242, **extra) -> dict:
    """What srun sets in one task of an N-node job with per_node tasks on each node."""
    return {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": str(nnodes),
            "SLURM_NNODES": str(nnodes), "SLURM_NTASKS": str(nnodes * per_node),
            "SLURM_TASKS_PER_NODE": f"{per_node}(x{nnodes})" if nnodes > 1 else str(per_node),
            "SLURM_NODEID": str(rank // per_node), "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node),
            **extra}


class TwoHosts:
    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.tag, self.names = tag, [f"pl{tag}a", f"pl{tag}b"]

    def __enter__(self) -> "TwoHosts":
        t = self.tag
        cmds = [["ip", "netns", "add", self.names[0]], ["ip", "netns", "add", self.names[1]],
                ["ip", "link", "add", f"v{t}a", "type", "veth", "peer", "name", f"v{t}b"]]
        for ns, end, addr in zip(self.names, "ab", ADDRS):
            cmds += [["ip", "link", "set", f"v{t}{end}", "netns", ns],
                     ["ip", "-n", ns, "link", "set", f"v{t}{end}", "name", IFNAME],
                     ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME],
                     ["ip", "-n", ns, "link", "set", IFNAME, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for a, h in zip(ADDRS, HOSTNAMES))
        try:
            for c in cmds:
                subprocess.run(c, check=True, capture_output=True, text=True)
            for ns in self.names:  # `ip netns exec` mounts these over /etc/hosts inside the namespace
                Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
                Path(f"/etc/netns/{ns}/hosts").write_text(hosts)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # removes the veth pair too
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)

    def launch(self, argv_for_rank: Callable[[int], list[str]], log_dir: Path, job_id: int = 777,
               timeout: float = 300, env: dict | None = None) -> tuple[list[int], str]:
        """One rank per host through `python -m pipeline.launch run`, with the SLURM variables of a
        2-node job with one task per node (the rendezvous: plhost1, a port from the job id)."""
        procs = []
        for rank, ns in enumerate(self.names):
            e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_"))}
            e.update(slurm_env(NODELIST, 2, 1, rank, job_id=job_id), GLOO_SOCKET_IFNAME=IFNAME,
                     OMP_NUM_THREADS="1", **(env or {}))
            log = open(log_dir / f"host{rank}.log", "w")
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "pipeline.launch", "run",
                                           "--", *argv_for_rank(rank)], env=e, cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        logs = "\n".join(f"==> host {r}\n" + (log_dir / f"host{r}.log").read_text() for r in range(len(procs)))
        return codes, logs

"""A real one-node SLURM cluster on loopback, for tests of the job scripts in slurm/.

Private to one temp folder: its own munge key, socket and daemon, its own slurm.conf on free ports
(so it never meets another cluster on the machine), slurmctld and slurmd in the foreground as child
processes, torn down after. Client commands find it through SLURM_CONF, which `env` carries.

    with SlurmCluster(tmp) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)

Needs root and Debian's `slurm-wlm` and `munge` (.ci/run installs them); `why_unavailable()` says
why not where they are missing."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

import system_packages

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)


def why_unavailable() -> str | None:
    """None when a cluster can be started here, else the reason (for pytest.skip)."""
    missing = [d for d in DAEMONS if _which(d) is None]
    if missing:
        return system_packages.missing("slurm-wlm and munge",
                                       f"a real one-node cluster; not found: {', '.join(missing)}")
    if os.geteuid() != 0:
        return "the embedded SLURM cluster runs its daemons as root; run the tests as root"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """One node named after this host (slurmd identifies itself by hostname), all CPUs, on 127.0.0.1."""

    def __init__(self, root: Path, partition: str = "debug"):
        self.root = Path(root)
        self.partition = partition
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if key != "SLURM_CONF":  # a test run inside a SLURM job must not leak that job's settings
                del self.env[key]

    # -- set-up ------------------------------------------------------------------------------
    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o700, parents=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = d / "munge.socket"
        # root's own munged (--force accepts root-owned files), so a root-only temp folder does
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--key-file={key}",
                               f"--socket={self.munge_socket}", f"--pid-file={d / 'munged.pid'}",
                               f"--seed-file={d / 'munged.seed'}", f"--log-file={d / 'munged.log'}"])
        self._wait(lambda: self.munge_socket.exists(), "munged socket", d / "munged.log")

    def _write_conf(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir()
        # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
        self.conf.write_text(f"""\
ClusterName=pipelinetest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/slurmd-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=30
PlugStackConfig={r}/plugstack.conf
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN
PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        (r / "plugstack.conf").write_text("")

    def start(self) -> "SlurmCluster":
        self.root.mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), "slurmctld", self.root / "log/slurmctld.log")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(lambda: self._ok(["sinfo", "-h", "-o", "%t"], "idle"), "slurmd (node idle)",
                   self.root / "log/slurmd.log")
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _ok(self, cmd: list[str], want: str) -> bool:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        return r.returncode == 0 and want in r.stdout

    def _wait(self, ready, what: str, log: Path, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ready():
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.25)
        tail = log.read_text()[-3000:] if log.exists() else "(no log)"
        self.stop()
        raise RuntimeError(f"embedded SLURM cluster: {what} did not come up; {log}:\n{tail}")

    # -- use ---------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True,
                              check=check, **kw)

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (first record; an array's first task)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id), check=False).stdout
        line = out.splitlines()[0] if out.strip() else ""
        return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)

    def completed(self) -> list[dict[str, str]]:
        """Finished jobs in the order they ended, from the job completion log."""
        if not self.jobcomp.exists():
            return []
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
                for line in self.jobcomp.read_text().splitlines() if line.strip()]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job is pending or running; False on timeout."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                return True
            time.sleep(1)
        return False

    def stop(self) -> None:
        if self.procs and self.conf.exists():
            subprocess.run(["scancel", "--full", "-u", pwd.getpwuid(os.geteuid()).pw_name],
                           env=self.env, capture_output=True, timeout=30)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_shared: SlurmCluster | None = None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """One cluster for the whole session, whichever test module asks first (import this fixture
    into a test module: `from slurm_cluster import slurm_cluster`)."""
    global _shared
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    owner = _shared is None
    if owner:
        _shared = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield _shared
    finally:
        if owner:
            _shared.stop()
            _shared = None

"""A real one-node SLURM cluster under a temp dir, for testing the sbatch scripts (``tests/slurm``).

munged (own key, socket, pid file), ``slurmctld -D`` and ``slurmd -D`` run as children of the test
process with ``SLURM_CONF`` pointing into the temp dir; no systemd, cgroups or accounting. Two partitions
on the one node: ``low`` (default) whose jobs ``high`` preempts by requeueing them (partition_prio,
PreemptMode=REQUEUE). The settings follow shared/ENVIRONMENT.md ("A real SLURM cluster on localhost").
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def missing_binaries() -> List[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=sfdtest{tag}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=3600
JobRequeue=1
SchedulerParameters=sched_interval=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=low Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=high Nodes={host} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


class LocalSlurm:
    """Start with :meth:`start`, always :meth:`stop` (kills the daemons, removes the dir)."""

    def __init__(self, cpus: Optional[int] = None):
        self.root = Path(tempfile.mkdtemp(prefix="sfd_slurm_", dir="/tmp"))  # short: the munge socket path
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.procs: Dict[str, subprocess.Popen] = {}
        self.cwd: Optional[str] = None  # where sbatch runs (the jobs' SLURM_SUBMIT_DIR)
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in list(self.env):  # a test session run inside a SLURM job must not leak its job's variables
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [_which("munged"), "-F", "--force", f"--key-file={key}",
                               f"--socket={self.root}/munge.sock", f"--pid-file={self.root}/munged.pid",
                               f"--log-file={self.root}/munged.log", f"--seed-file={self.root}/munged.seed"])
        self._wait_for(lambda: (self.root / "munge.sock").exists(), timeout, "munged socket")
        self.conf.write_text(SLURM_CONF.format(root=self.root, host=self.host, cpus=self.cpus, tag=os.getpid(),
                                               ctld_port=_free_port(), slurmd_port=_free_port()))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.host, "-f", str(self.conf)])
        self._wait_for(self._node_idle, timeout, "node idle")
        return self

    def stop(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--state=RUNNING"], env=self.env, capture_output=True, timeout=10)
        for name in ("slurmd", "slurmctld", "munged"):  # slurmd first: it kills the job steps it runs
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self._kill_leftover_steps()
        shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self, name: str, cmd: List[str]) -> None:
        out = open(self.root / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        out.close()

    def _kill_leftover_steps(self) -> None:
        """slurmstepd processes outlive slurmd; kill those of this cluster (their command line names our dir
        only through the environment, so match on SLURM_CONF in /proc/PID/environ)."""
        me = f"SLURM_CONF={self.conf}".encode()
        for pid_dir in Path("/proc").glob("[0-9]*"):
            try:
                if me in (pid_dir / "environ").read_bytes().split(b"\0") and int(pid_dir.name) != os.getpid():
                    os.kill(int(pid_dir.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                       + self.daemon_logs())
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"SLURM test cluster: no {what} after {timeout:.0f}s:\n" + self.daemon_logs())

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.strip().startswith("idle")

    def daemon_logs(self, tail: int = 30) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            lines = f.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    # ------------------------------------------------------------------------------------------ jobs
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=60, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}{r.stderr}")
        return r

    def sbatch(self, *args: str, cwd: Optional[str] = None, env: Optional[dict] = None) -> str:
        """Submit; returns the job id (``--parsable``)."""
        r = self.run("sbatch", "--parsable", *args, cwd=cwd or self.cwd, env=env or self.env)
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` fields of one job (the first record: an array's first task)."""
        r = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout.splitlines()[0]))

    def jobs(self, job_id: str) -> List[Dict[str, str]]:
        """One record per job (every task of an array)."""
        r = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in r.stdout.splitlines() if line.strip()]

    def wait(self, job_id: str, states: Iterable[str] = ("COMPLETED",), timeout: float = 120.0,
             log: Optional[Path] = None) -> Dict[str, str]:
        """Wait until every record of ``job_id`` is in one of ``states``; a final state outside them fails."""
        states = set(states)
        deadline = time.monotonic() + timeout
        recs: List[Dict[str, str]] = []
        while time.monotonic() < deadline:
            recs = self.jobs(job_id)
            got = [r.get("JobState") for r in recs]
            if recs and all(s in states for s in got):
                return recs[0]
            if any(s in FINAL and s not in states for s in got):
                break
            time.sleep(0.5)
        raise AssertionError(f"job {job_id}: states {[r.get('JobState') for r in recs]}, wanted {sorted(states)}"
                             + (f"\n--- {log}\n{self.read(log)}" if log else "") + "\n" + self.daemon_logs(10))

    def wait_for_text(self, path: Path, pattern: str, timeout: float = 120.0, job_id: Optional[str] = None) -> str:
        """Wait until ``path`` contains a match of ``pattern`` (a regex); returns the file's text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.read(path)
            if re.search(pattern, text):
                return text
            if job_id and self.job(job_id).get("JobState") in FINAL:
                break
            time.sleep(0.3)
        raise AssertionError(f"{pattern!r} not in {path} (job {job_id}: {self.job(job_id) if job_id else ''}):\n"
                             + self.read(path))

    @staticmethod
    def read(path: Path) -> str:
        try:
            return Path(path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, job_id: str, sig: str = "USR1", batch: bool = True) -> None:
        """``scancel --signal=SIG [--batch] JOB``: to the batch shell only (``--batch``) or to every step."""
        self.run("scancel", f"--signal={sig}", *(["--batch"] if batch else []), job_id)

    def cancel(self, job_id: str) -> None:
        self.run("scancel", job_id, check=False)

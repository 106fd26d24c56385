"""A real SLURM cluster under a temp dir, for testing the sbatch scripts (``tests/slurm``): one node on
localhost, or several "nodes" on this machine, each a set of namespaces of its own (``netns.py``).

munged (own key, socket, pid file), ``slurmctld -D`` and ``slurmd -D`` run as children of the test
process with ``SLURM_CONF`` pointing into the temp dir; no systemd, cgroups or accounting. Two partitions
over all nodes: ``low`` (default) whose jobs ``high`` preempts by requeueing them (partition_prio,
PreemptMode=REQUEUE). The settings follow shared/ENVIRONMENT.md ("A real SLURM cluster on localhost").

Several nodes (``LocalSlurm(nodes=2)``): node ``vnodeK`` has its own address, host name, ``/dev/shm``,
``TMPDIR`` contents (``<root>/vnodeK/tmp`` mounted at ``<root>/tmp``) and munged (its own daemon and socket:
``<root>/vnodeK/munge`` mounted at ``<root>/munge``, the path slurm.conf names); its slurmd runs inside it.
All munged daemons read one key, as on a real cluster (munge authenticates a credential only with the key
that made it). slurmctld, a munged for it and the test's SLURM clients stay in the root namespace, on the
nodes' network. Everything else (the repository, the tests' temp dirs) is one shared file system.
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

from .netns import VirtualHosts

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
SlurmctldHost={host}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
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
SlurmdParameters=config_overrides
{node_lines}
PartitionName=low Nodes={node_list} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE \
GraceTime=10
PartitionName=high Nodes={node_list} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
"""


def _kill_processes_of(conf: Path) -> None:
    """SIGKILL every process started for the cluster of ``conf`` (daemons, job steps): their command lines name
    its dir only through the environment, so match on SLURM_CONF in /proc/PID/environ."""
    me = f"SLURM_CONF={conf}".encode()
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if me in (pid_dir / "environ").read_bytes().split(b"\0") and int(pid_dir.name) != os.getpid():
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def reclaim_dead_clusters() -> None:
    """The daemons and dirs of clusters whose test process was killed (``/tmp/sfd_slurm_pid<pid>_*``, pid gone);
    their namespaced nodes go in ``netns.reclaim_stale``."""
    for root in Path("/tmp").glob("sfd_slurm_pid*_*"):
        m = re.match(r"sfd_slurm_pid(\d+)_", root.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _kill_processes_of(root / "slurm.conf")
            shutil.rmtree(root, ignore_errors=True)


class LocalSlurm:
    """Start with :meth:`start`, always :meth:`stop` (kills the daemons, removes the dir). ``nodes=0``: one node,
    this host on 127.0.0.1; ``nodes=N``: N namespaced nodes ``vnode1..N``. Each node has ``cpus`` CPUs (default:
    this machine's), more than it has if asked (``config_overrides``: SLURM then believes slurm.conf)."""

    def __init__(self, cpus: Optional[int] = None, nodes: int = 0):
        # short (the munge socket path), and naming this process: a later run removes what a killed one left
        self.root = Path(tempfile.mkdtemp(prefix=f"sfd_slurm_pid{os.getpid()}_", dir="/tmp"))
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.tmp = self.root / "tmp"  # the jobs' TMPDIR (node-local contents on namespaced nodes)
        self.hosts = VirtualHosts([f"vnode{k}" for k in range(1, nodes + 1)], self.root, self.host) if nodes else None
        self.nodes = self.hosts.names if self.hosts else [self.host]
        self.procs: Dict[str, subprocess.Popen] = {}
        self.cwd: Optional[str] = None  # where sbatch runs (the jobs' SLURM_SUBMIT_DIR)
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in list(self.env):  # a test session run inside a SLURM job must not leak its job's variables
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF":
                del self.env[k]

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        reclaim_dead_clusters()
        for d in ["state", "munge", "tmp"] + [f"spool/{n}" for n in self.nodes]:
            (self.root / d).mkdir(parents=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._start_munged("munged", [], self.root / "munge")
        if self.hosts is not None:
            binds = {n: [(self.root / n / "munge", self.root / "munge"), (self.root / n / "tmp", self.tmp)]
                     for n in self.nodes}
            for n in self.nodes:
                for what, _ in binds[n]:
                    what.mkdir(parents=True)
            self.hosts.start(binds)
            for n in self.nodes:  # each node's own munged, serving <root>/munge/munge.sock inside the node
                self._start_munged(f"munged-{n}", self.hosts.enter(n), self.root / n / "munge")
        ctld_addr = self.hosts.root_addr if self.hosts else "127.0.0.1"
        node_lines = "\n".join(f"NodeName={n} NodeAddr={self.hosts.addr(n) if self.hosts else '127.0.0.1'} "
                               f"CPUs={self.cpus} State=UNKNOWN" for n in self.nodes)
        self.conf.write_text(SLURM_CONF.format(root=self.root, host=self.host, ctld_addr=ctld_addr, tag=os.getpid(),
                                               ctld_port=_free_port(), slurmd_port=_free_port(),
                                               node_lines=node_lines, node_list=",".join(self.nodes)))
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for n in self.nodes:
            enter = self.hosts.enter(n) if self.hosts else []
            self._spawn(f"slurmd-{n}", enter + [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, timeout, "nodes idle")
        return self

    def _start_munged(self, name: str, enter: List[str], socket_dir: Path, timeout: float = 30.0) -> None:
        """A munged whose socket appears in ``socket_dir`` (as seen from here) and is ``<root>/munge/munge.sock``
        where it runs."""
        self._spawn(name, enter + [_which("munged"), "-F", "--force", f"--key-file={self.root}/munge.key",
                                   f"--socket={self.root}/munge/munge.sock", f"--pid-file={self.root}/{name}.pid",
                                   f"--log-file={self.root}/{name}.log", f"--seed-file={self.root}/{name}.seed"])
        self._wait_for(lambda: (socket_dir / "munge.sock").exists(), timeout, f"{name} socket")

    def stop(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--state=RUNNING"], env=self.env, capture_output=True, timeout=10)
        daemons = [f"slurmd-{n}" for n in self.nodes] + ["slurmctld"] + [f"munged-{n}" for n in self.nodes]
        for name in daemons + ["munged"]:  # slurmds first: they kill the job steps they run
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.hosts is not None:
            self.hosts.stop()  # whatever still runs inside the nodes, their /dev/shm, the namespaces
        self._kill_leftover_steps()
        shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self, name: str, cmd: List[str]) -> None:
        out = open(self.root / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        out.close()

    def _kill_leftover_steps(self) -> None:
        """slurmstepd processes outlive slurmd; kill those of this cluster."""
        _kill_processes_of(self.conf)

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

    def _nodes_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        idle = {line.split()[0] for line in r.stdout.splitlines() if line.split()[1:2] == ["idle"]}
        return r.returncode == 0 and idle >= set(self.nodes)

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

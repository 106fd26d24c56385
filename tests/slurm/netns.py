"""Several "hosts" on one machine, for the multi-node SLURM rehearsal (``tests/slurm/test_multinode.py``).

Each host is a set of Linux namespaces held open by a ``sleep`` process:
- a network namespace with its own address (``10.213.X.k/24`` on ``eth0``) and loopback, cabled by a veth
  pair to a bridge. The bridge lives in a namespace of its own (the "switch"), whose empty packet filter
  cannot drop what the root namespace's firewall (Docker's FORWARD policy, br_netfilter) might; one more
  veth pair connects the root namespace (``10.213.X.254``, where slurmctld and the test's SLURM clients
  run). Traffic stays between these namespaces: no route leads elsewhere.
- a UTS namespace with its own host name;
- a mount namespace with a private tmpfs on ``/dev/shm`` (what a node's processes share with each other and
  with no other node: streaming's shared memory, our leases), its own ``/etc/hosts`` (every host's name and
  address) and bind mounts the caller asks for (node-local directories at shared paths).
Daemons and checks run inside a host through ``nsenter`` (``enter``). Every name carries the test process's
pid (``sfd<pid>n1``, ``sfd<pid>sw``, ``sfd<pid>r``): what a killed earlier run left is found and removed at
the next start (``reclaim_stale``), and runs side by side do not collide (each picks a free subnet).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

TOOLS = ("ip", "unshare", "nsenter", "sleep")
NAME = re.compile(r"^sfd(\d+)(sw|r|n\d+|probe)$")  # our namespaces and root-side links: sfd<pid><role>
SUBNETS = "10.213.{}."
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts the namespaces it names
Bind = Tuple[Path, Path]  # (what, where): mounted over ``where`` inside one host


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} -> {r.returncode}: {r.stderr.strip()}")
    return r


def _pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def unavailable() -> Optional[str]:
    """Why namespaced hosts cannot be made here (None when they can): a probe namespace, veth pair and bridge."""
    if not Path("/proc/self/ns/net").exists():
        return "no Linux network namespaces (/proc/self/ns/net missing)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (Debian: apt-get install iproute2 util-linux)"
    probe = f"sfd{os.getpid()}probe"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "name", "vetha", "type", "veth", "peer", "name", "vethb")
        r = subprocess.run(["nsenter", f"--net={NETNS_DIR / probe}", "unshare", "--uts", "--mount", "--propagation",
                            "private", "--", "sh", "-c", "hostname probe && mount -t tmpfs probe /dev/shm"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"cannot give a namespace its own host name and /dev/shm: {r.stderr.strip()}"
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        return f"cannot create a network namespace with a bridge and a veth pair: {err}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def reclaim_stale() -> List[str]:
    """Remove the namespaces and root-side links of runs whose process is gone (killed test sessions), with
    every process still inside them; returns their names."""
    removed = []
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _kill_inside(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for name in re.findall(r"^\d+: ([^:@]+)", _ip("-o", "link", "show").stdout, re.M):
        m = NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def _kill_inside(netns: str) -> None:
    """SIGKILL every process in a network namespace (daemons, job steps, their tasks) and wait until gone."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", netns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _free_subnet() -> str:
    """``10.213.X.`` with an X no address of the root namespace uses (other runs, stale or alive)."""
    used = _ip("-o", "-4", "addr", "show").stdout
    start = os.getpid() % 200
    for k in range(250):
        prefix = SUBNETS.format((start + k) % 250 + 1)
        if f" {prefix}" not in used:
            return prefix
    raise RuntimeError("no free 10.213.X.0/24 subnet for the test hosts")


class VirtualHosts:
    """``hosts = VirtualHosts(["vnode1", "vnode2"], workdir, root_name); hosts.start(binds); ...; hosts.stop()``.
    ``root_name``: the root namespace's host name, which every host's /etc/hosts maps to ``root_addr``."""

    def __init__(self, names: Sequence[str], workdir: Path, root_name: str):
        self.names, self.workdir, self.root_name = list(names), Path(workdir), root_name
        self.tag = f"sfd{os.getpid()}"
        self.subnet = ""
        self.holders: Dict[str, subprocess.Popen] = {}
        self.created: List[str] = []  # namespaces made so far (stop removes exactly these)
        self.uplink: Optional[str] = None  # the root namespace's end of the cable to the switch

    def netns(self, name: str) -> str:
        return f"{self.tag}n{self.names.index(name) + 1}"

    def addr(self, name: str) -> str:
        return f"{self.subnet}{self.names.index(name) + 1}"

    @property
    def root_addr(self) -> str:
        """The root namespace's address on the hosts' network (slurmctld listens there)."""
        return f"{self.subnet}254"

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback",
                 f"{self.root_addr} {self.root_name}"]
        return "\n".join(lines + [f"{self.addr(n)} {n}" for n in self.names]) + "\n"

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self, binds: Optional[Dict[str, List[Bind]]] = None, timeout: float = 30.0) -> "VirtualHosts":
        reclaim_stale()
        self.subnet = _free_subnet()
        switch = f"{self.tag}sw"
        self._add_netns(switch)
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        uplink = f"{self.tag}r"
        _ip("link", "add", uplink, "type", "veth", "peer", "name", "root", "netns", switch)
        self.uplink = uplink
        _ip("-n", switch, "link", "set", "root", "master", "br0", "up")
        _ip("addr", "add", f"{self.root_addr}/24", "dev", uplink)
        _ip("link", "set", uplink, "up")
        for k, name in enumerate(self.names, 1):
            ns = self.netns(name)
            self._add_netns(ns)
            _ip("-n", switch, "link", "add", f"n{k}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", switch, "link", "set", f"n{k}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(name)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self._start_holder(name, (binds or {}).get(name, []))
        deadline = time.monotonic() + timeout
        while not all((self.workdir / n / "ready").exists() for n in self.names):
            dead = [n for n, p in self.holders.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"host(s) {dead or self.names} failed to set up: "
                                   + " ".join((self.workdir / n / "holder.out").read_text() for n in self.names))
            time.sleep(0.05)
        return self

    def _add_netns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _start_holder(self, name: str, binds: List[Bind]) -> None:
        """The process that holds the host's namespaces: sets the host name and mounts, then sleeps."""
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts").write_text(self.hosts_file())
        setup = [f"hostname {name}", "mount -t tmpfs -o size=256m,mode=1777 sfd-shm /dev/shm",
                 f"mount --bind {shlex.quote(str(d / 'hosts'))} /etc/hosts"]
        setup += [f"mount --bind {shlex.quote(str(what))} {shlex.quote(str(where))}" for what, where in binds]
        setup += [f"touch {shlex.quote(str(d / 'ready'))}", "exec sleep infinity"]
        # nsenter, unshare and sh all exec: the Popen's pid is the sleep that holds the namespaces. Not `ip netns
        # exec`: it mounts a fresh /sys, without the /sys/fs/cgroup that slurmd needs.
        cmd = ["nsenter", f"--net={NETNS_DIR / self.netns(name)}", "unshare", "--uts", "--mount", "--propagation",
               "private", "--", "sh", "-ec", " && ".join(setup)]
        with open(d / "holder.out", "wb") as out:
            self.holders[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def enter(self, name: str) -> List[str]:
        """Command prefix that runs a command inside host ``name`` (its network, host name and mounts)."""
        return ["nsenter", "-t", str(self.holders[name].pid), "--net", "--uts", "--mount", "--"]

    def run(self, name: str, *cmd: str) -> str:
        """A short command inside host ``name``; its stdout (fails on a non-zero status)."""
        r = subprocess.run(self.enter(name) + list(cmd), capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} on {name} -> {r.returncode}: {r.stderr.strip()}")
        return r.stdout

    def pids(self, name: str) -> List[int]:
        """The processes running inside host ``name`` (its network namespace)."""
        return [int(p) for p in _ip("netns", "pids", self.netns(name), check=False).stdout.split()]

    def stop(self) -> None:
        """Kill everything inside the hosts (daemons, job steps, tasks: their /dev/shm goes with the last of
        them), delete the namespaces and the root-side link. Safe to call after a partial start."""
        for ns in reversed(self.created):
            if ns.startswith(f"{self.tag}n"):
                _kill_inside(ns)
        for p in self.holders.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        for ns in reversed(self.created):
            _ip("netns", "del", ns, check=False)
        if self.uplink:  # goes with the switch's namespace too, but only once the kernel has freed that
            _ip("link", "del", self.uplink, check=False)
        self.created, self.uplink = [], None

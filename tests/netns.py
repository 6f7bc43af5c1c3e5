"""Hosts on one machine: network namespaces on a bridge (``ip netns``, veth pairs), each with its own address,
processes run inside them with ``ip netns exec``, and the names a host resolves from its own ``/etc/hosts``.

``ip netns exec <name>`` runs the command in the namespace's network stack and a new mount namespace where
``/etc/netns/<name>/hosts`` is bind-mounted over ``/etc/hosts`` (iproute2 ``ip/ipnetns.c`` ``bind_etc``): a
host's names are that file, rewritten in place (same inode) as they change. The bridge's own address is the
machine's side of the network, where servers the hosts use (S3, MLflow) listen. Needs root and iproute2 (CI
runs as root; ``.ci/run`` installs iproute2 when it is missing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loomcfm_core.processes import descendants

IFACE = "lceth0"  # a host's end of its veth pair, the same name inside each namespace
ETC_NETNS = Path("/etc/netns")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def require_ip_netns() -> None:
    if shutil.which("ip") is None:
        pytest.fail("this test needs the `ip` command (Debian package iproute2; `.ci/run` installs it as root)")
    if os.geteuid() != 0:
        pytest.fail("this test creates network namespaces (`ip netns add`) and must run as root, as CI does")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


class Network:
    """A bridge ``<tag>br`` on ``<subnet>.254`` and the hosts added to it (``<subnet>.<n>``, n from 1)."""

    def __init__(self, tag: str | None = None) -> None:
        pid = os.getpid()
        self.tag = tag or f"lc{pid % 100000}"
        self.subnet = f"10.{100 + pid % 150}.{pid // 150 % 250}"
        self.bridge_ip = f"{self.subnet}.254"
        self.hosts: dict[str, str] = {}  # namespace -> address
        self.procs: list[subprocess.Popen] = []
        self._next = 1

    def up(self) -> Network:
        ip("link", "add", f"{self.tag}br", "type", "bridge")
        ip("addr", "add", f"{self.bridge_ip}/24", "dev", f"{self.tag}br")
        ip("link", "set", f"{self.tag}br", "up")
        return self

    def add(self, suffix: str, hosts: str = "") -> tuple[str, str]:
        """A new host: (namespace, address); ``hosts`` is its /etc/hosts."""
        ns, address = f"{self.tag}{suffix}", f"{self.subnet}.{self._next}"
        self._next += 1
        outer, inner = f"{ns}0", f"{ns}1"
        ip("netns", "add", ns)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", ns)
        ip("link", "set", outer, "master", f"{self.tag}br")
        ip("link", "set", outer, "up")
        for args in (("link", "set", inner, "name", IFACE), ("addr", "add", f"{address}/24", "dev", IFACE),
                     ("link", "set", IFACE, "up"), ("link", "set", "lo", "up"),
                     ("route", "add", "default", "via", self.bridge_ip)):
            ip("-n", ns, *args)
        self.hosts[ns] = address
        self.write_hosts(ns, hosts)
        return ns, address

    def write_hosts(self, ns: str, text: str) -> None:
        """The host's /etc/hosts, rewritten in place (a running process sees the new names)."""
        path = ETC_NETNS / ns / "hosts"
        path.parent.mkdir(parents=True, exist_ok=True)
        content = f"127.0.0.1 localhost\n{text}"
        if not path.exists() or path.read_text() != content:
            with open(path, "w") as handle:
                handle.write(content)

    def pids(self, ns: str) -> list[int]:
        """The live (not zombie) processes in a host's namespace."""
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if _state(int(p)) not in ("Z", "X", "")]

    def kill(self, ns: str, timeout: float = 20.0) -> None:
        """SIGKILL every process in the host (all started by the test), again until none is left: a dying
        process may still have started another."""
        deadline = time.monotonic() + timeout
        while (pids := self.pids(ns)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def remove(self, ns: str) -> None:
        self.kill(ns)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{ns}0"], capture_output=True)
        shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        self.hosts.pop(ns, None)

    def run(self, ns: str, args: list[str], env: dict[str, str], **popen) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], env=env, **popen)
        self.procs.append(proc)
        return proc

    def down(self) -> None:
        for ns in list(self.hosts):
            self.remove(ns)
        for proc in self.procs:
            if proc.poll() is None:
                for pid in descendants(proc.pid):  # a server's own workers (`mlflow server`'s uvicorn) go too
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
            proc.wait()
        subprocess.run(["ip", "link", "del", f"{self.tag}br"], capture_output=True)

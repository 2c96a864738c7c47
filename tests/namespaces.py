"""Machines made of Linux network namespaces: each host a namespace with one veth link to a
switch (a bridge in a namespace of its own), on addresses in 10.77.0.0/24. Nothing is made in
the root namespace, so runs side by side do not clash, and deleting the namespaces removes
every link with them. Needs root and iproute2.

The suite's own process reaches into a host with `inside(host)`: sockets made there stay
there (a server listening on the host, a client calling from it) after the thread comes back.
"""

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

NETWORK = "10.77.0"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def why_namespaces_cannot_be_made() -> str | None:
    """None where this process can make namespaces, else the reason (for a skip)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"pb{os.getpid()}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], check=False)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Run the block with this thread in the namespace's network (setns affects one thread)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


@dataclass
class Network:
    """A switch and the hosts linked to it; names unique to this process."""

    prefix: str = field(default_factory=lambda: f"pb{os.getpid()}")
    hosts: dict[str, str] = field(default_factory=dict)  # host name -> its address

    @property
    def switch(self) -> str:
        return f"{self.prefix}-switch"

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def start(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, host: str, number: int) -> str:
        """A host on the switch at 10.77.0.<number>: its address."""
        namespace, address = self.namespace(host), f"{NETWORK}.{number}"
        self.hosts[host] = address  # before it exists: stop() deletes a half-made one too
        ip("netns", "add", namespace)
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", f"to-{host}", "type", "veth", "peer", "name", "eth0", "netns", namespace)
        ip("-n", self.switch, "link", "set", f"to-{host}", "master", "br0", "up")
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        return address

    def unplug(self, host: str) -> None:
        """The host's cable pulled: its link down at the switch (nothing gets in or out)."""
        ip("-n", self.switch, "link", "set", f"to-{host}", "down")

    def plug(self, host: str) -> None:
        ip("-n", self.switch, "link", "set", f"to-{host}", "up")

    def run(self, host: str, argv: list[str]) -> list[str]:
        """argv as run on the host."""
        return ["ip", "netns", "exec", self.namespace(host), *argv]

    def stop(self) -> None:
        """Delete every namespace (their links go with them); safe to call on a half-made one."""
        for namespace in [*(self.namespace(host) for host in self.hosts), self.switch]:
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False)

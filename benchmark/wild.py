"""The `wild` scenario's world: many receivers on many loopback addresses and ports, some over
HTTPS behind a CA of the run's own, some reached by name through a DNS server of the run's own,
latencies drawn per host from a log-normal, a few dead hosts.

Linux routes all of 127.0.0.0/8 to the loopback interface, so 127.S.x.y needs no setup; S is
drawn per run so that two runs on one machine do not meet. A host is an address:port, as the
product counts destinations; two ports share each address.

Names: delivery resolves them with getaddrinfo, which reads /etc/resolv.conf. The workers are
started in a private mount namespace where the run's own resolv.conf (naming the run's DNS
server, on port 53 of 127.S.255.53) is bind-mounted over /etc/resolv.conf; the machine's own
file is never touched. That needs root and a kernel that lets us unshare: the world checks it
by resolving a name in such a namespace before the service starts, and runs without names
(every host by address) when it cannot, saying why.
"""

import math
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trustme

from benchmark.baselines import receiver_ceiling
from benchmark.destinations import StartContext
from benchmark.dns import DnsServer
from benchmark.metrics import percentiles
from benchmark.receiver import Behaviour, Listener, Receipt, Receiver
from benchmark.service import ServiceExtras

DOMAIN = "wild.test"
PORTS_PER_ADDRESS = 2
HOSTS_PER_OCTET = 250
DNS_OCTET = 255  # the DNS server's address: 127.S.255.53
# Mount the run's resolv.conf over the machine's, in a mount namespace of the command's own.
NAMESPACE_SCRIPT = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
CEILING_CLIENTS = 256
PROBE_SCRIPT = "import socket, sys; print(socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)[0][4][0])"


@dataclass(frozen=True)
class WildOptions:
    hosts: int = 1000
    latency_median_ms: float = 200.0
    latency_p99_ms: float = 2000.0
    latency_max_ms: float = 4000.0  # draws are capped here: below the scenario's read timeout
    tls_share: float = 0.2
    dns_share: float = 0.3
    dns_delay_ms: float = 50.0
    error_rate: float = 0.01
    refusing_hosts: int = 3  # nothing listens: connections are refused
    silent_hosts: int = 2  # accept and never answer: the first over HTTPS (no handshake), the next plain
    seed: int = 1


@dataclass(frozen=True)
class HostPlan:
    """One host as drawn, before any socket exists."""

    index: int
    address: str
    scheme: str  # http, https
    named: bool
    latency_ms: float
    kind: str  # live, refusing, silent

    @property
    def name(self) -> str:
        return f"h{self.index:04d}.{DOMAIN}"


@dataclass(frozen=True)
class Host:
    """A host once its port is known: where postbacks for it are sent."""

    plan: HostPlan
    port: int
    by_name: bool

    @property
    def base(self) -> str:
        """The URL up to the path, e.g. https://h0042.wild.test:40123."""
        host = self.plan.name if self.by_name else self.plan.address
        return f"{self.plan.scheme}://{host}:{self.port}"


Z_99 = statistics.NormalDist().inv_cdf(0.99)


def lognormal_sigma(median_ms: float, p99_ms: float) -> float:
    """The log-normal's sigma whose median and 99th percentile are these."""
    return math.log(p99_ms / median_ms) / Z_99 if p99_ms > median_ms else 0.0


def host_latencies(count: int, options: WildOptions, rng: random.Random) -> list[float]:
    """One latency per host, from the log-normal, capped at latency_max_ms."""
    mu, sigma = math.log(options.latency_median_ms), lognormal_sigma(options.latency_median_ms, options.latency_p99_ms)
    return [min(options.latency_max_ms, round(rng.lognormvariate(mu, sigma), 1)) for _ in range(count)]


def address_of(subnet: int, slot: int) -> str:
    """The address of a slot: PORTS_PER_ADDRESS hosts share each."""
    number = slot // PORTS_PER_ADDRESS
    return f"127.{subnet}.{number // HOSTS_PER_OCTET}.{number % HOSTS_PER_OCTET + 1}"


def plan_hosts(options: WildOptions, subnet: int) -> list[HostPlan]:
    """Every host of the world: live ones first, then the dead (drawn from the seed alone)."""
    rng = random.Random(options.seed)
    live = options.hosts
    latencies = host_latencies(live, options, rng)
    over_tls = set(rng.sample(range(live), round(live * options.tls_share)))
    named = set(rng.sample(range(live), round(live * options.dns_share)))
    plans = [
        HostPlan(i, address_of(subnet, i), "https" if i in over_tls else "http", i in named, latencies[i], "live")
        for i in range(live)
    ]
    dead = ["silent"] * options.silent_hosts + ["refusing"] * options.refusing_hosts
    for number, kind in enumerate(dead):
        # The first silent host is HTTPS (it never answers the handshake); the others alternate.
        scheme = "https" if number % 2 == 0 else "http"
        plans.append(HostPlan(live + number, address_of(subnet, live + number), scheme, False, 0, kind))
    return plans


def free_subnet() -> int:
    """A second octet for this run's addresses, from 64 to 254 (127.0.x.y stays the machine's)."""
    return 64 + secrets.randbelow(191)


def namespace_prefix(resolv_conf: Path) -> list[str]:
    """The command prefix that runs a command with resolv_conf as its /etc/resolv.conf."""
    unshare = shutil.which("unshare") or "unshare"
    return [unshare, "--mount", "--propagation", "private", "sh", "-c", NAMESPACE_SCRIPT, "sh", str(resolv_conf)]


def probe_names(prefix: list[str], name: str, address: str) -> str | None:
    """None when a process started with prefix resolves name to address; else why not."""
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-c", PROBE_SCRIPT, name], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the resolver check could not run: {exc}"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"a private mount namespace with our resolv.conf could not be made or used: {last}"
    if done.stdout.strip() != address:
        return f"{name} resolved to {done.stdout.strip()!r} in the namespace, not {address}"
    return None


@dataclass
class WildWorld:
    """The hosts, their receivers, CA, DNS server and dead sockets, for one scenario."""

    options: WildOptions
    workdir: Path
    processes: int = 2
    names_wanted: bool = True  # False: by address only (a service the tool did not start)
    tls_wanted: bool = True
    subnet: int = field(default_factory=free_subnet)
    hosts: list[Host] = field(default_factory=list)
    receiver: Receiver | None = None
    dns: DnsServer | None = None
    names_off_because: str | None = None
    tls_off_because: str | None = None
    ca_bundle: Path | None = None
    resolv_conf: Path | None = None
    _refusing: list[socket.socket] = field(default_factory=list)
    _certificates: dict[int, str] = field(default_factory=dict)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        plans = plan_hosts(self.options, self.subnet)
        if not self.tls_wanted:
            self.tls_off_because = "the service was not started by the tool: it does not trust the run's CA"
            plans = [replace(plan, scheme="http") for plan in plans]
        self._issue_certificates(plans)
        try:
            ports = self._start_receivers(plans)
            ports.update(self._hold_refusing(plans))
            by_name = self._start_names(plans, ports)
        except BaseException:
            self.stop()
            raise
        self.hosts = [Host(plan, ports[plan.index], plan.index in by_name) for plan in plans]

    # --- setting up ------------------------------------------------------------------------

    def _issue_certificates(self, plans: Sequence[HostPlan]) -> None:
        """A CA of the run's own; each HTTPS host a certificate for its address and its name."""
        serving = [plan for plan in plans if plan.scheme == "https" and plan.kind == "live"]
        if not serving:
            return
        ca = trustme.CA()
        self.ca_bundle = self.workdir / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_bundle))
        folder = self.workdir / "certificates"
        folder.mkdir(exist_ok=True)
        for plan in serving:
            path = folder / f"{plan.index}.pem"
            ca.issue_cert(plan.address, plan.name).private_key_and_cert_chain_pem.write_to_path(str(path))
            self._certificates[plan.index] = str(path)

    def listeners(self, plans: Sequence[HostPlan]) -> list[Listener]:
        """The listeners of the live and silent hosts (refusing hosts have none)."""
        listeners = []
        for plan in plans:
            if plan.kind == "silent":
                listeners.append(Listener(plan.address, 0, Behaviour(silent=True)))
            elif plan.kind == "live":
                behaviour = Behaviour(latency_ms=plan.latency_ms, error_rate=self.options.error_rate)
                listeners.append(Listener(plan.address, 0, behaviour, self._certificates.get(plan.index)))
        return listeners

    def ceiling_listeners(self) -> list[Listener]:
        """The live hosts' addresses and certificates on fresh ports, answering at once: what
        the receivers can take in this layout, TLS included."""
        live = [host.plan for host in self.hosts if host.plan.kind == "live"]
        return [Listener(plan.address, 0, Behaviour(), self._certificates.get(plan.index)) for plan in live]

    def _start_receivers(self, plans: Sequence[HostPlan]) -> dict[int, int]:
        served = [plan for plan in plans if plan.kind != "refusing"]
        self.receiver = Receiver("wild", self.listeners(served), self.processes)
        self.receiver.start()
        return {plan.index: listener.port for plan, listener in zip(served, self.receiver.listeners, strict=True)}

    def _hold_refusing(self, plans: Sequence[HostPlan]) -> dict[int, int]:
        """A bound socket that never listens: the port stays ours, and connections are refused."""
        ports = {}
        for plan in plans:
            if plan.kind == "refusing":
                sock = socket.socket()
                sock.bind((plan.address, 0))
                self._refusing.append(sock)
                ports[plan.index] = int(sock.getsockname()[1])
        return ports

    def _start_names(self, plans: Sequence[HostPlan], ports: dict[int, int]) -> set[int]:
        """Start the DNS server and check that workers will use it; the hosts reached by name."""
        named = {plan.index: plan for plan in plans if plan.named}
        if not named:
            return set()
        if not self.names_wanted:
            self.names_off_because = "the service was not started by the tool: its workers use their own resolver"
            return set()
        address = f"127.{self.subnet}.{DNS_OCTET}.53"
        self.dns = DnsServer(address, {plan.name: plan.address for plan in named.values()}, self.options.dns_delay_ms)
        try:
            self.dns.start()
        except RuntimeError as exc:
            self.dns = None
            self.names_off_because = str(exc)
            return set()
        self.resolv_conf = self.workdir / "resolv.conf"
        # One server, two tries of 2 s: a lost datagram on loopback is not expected.
        self.resolv_conf.write_text(f"nameserver {address}\noptions timeout:2 attempts:2\n")
        first = next(iter(named.values()))
        self.names_off_because = probe_names(namespace_prefix(self.resolv_conf), first.name, first.address)
        if self.names_off_because:
            self.dns.stop()
            self.dns = None
            return set()
        return set(named)

    # --- what the run needs ------------------------------------------------------------------

    def bases(self, kind: str) -> list[str]:
        """URL bases of the live hosts (in an order mixed by the seed), or of the dead ones."""
        if kind == "live":
            live = [host.base for host in self.hosts if host.plan.kind == "live"]
            random.Random(self.options.seed + 1).shuffle(live)
            return live
        return [host.base for host in self.hosts if host.plan.kind != "live"]

    def service_extras(self) -> ServiceExtras:
        """The workers trust the run's CA, and resolve names with the run's DNS server."""
        return ServiceExtras(
            environment={"DELIVERY_CA_BUNDLE": str(self.ca_bundle)} if self.ca_bundle else {},
            worker_prefix=namespace_prefix(self.resolv_conf) if self.dns and self.resolv_conf else [],
        )

    def pids(self) -> dict[str, int]:
        pids = {f"receiver-wild/{index}": pid for index, pid in enumerate(self.receiver.pids if self.receiver else [])}
        if self.dns and self.dns.pid:
            pids["dns"] = self.dns.pid
        return pids

    def in_flight(self) -> int:
        return self.receiver.in_flight() if self.receiver else 0

    def ceiling(self, seconds: float) -> dict[str, float]:
        """What the same number of receiver processes answer in this layout (every live host's
        address, HTTPS where the host has it) to 256 clients: over kept-alive connections, then
        with a new connection (and TLS handshake) for every request, the worst a sender can do."""
        measured: dict[str, float] = {}
        ca_bundle = str(self.ca_bundle) if self.ca_bundle else None
        for fresh, prefix in ((False, "wild_receivers"), (True, "wild_receivers_new_connections")):
            figures = receiver_ceiling(
                self.ceiling_listeners(), self.processes, CEILING_CLIENTS, seconds, ca_bundle, new_connections=fresh
            )
            measured[f"{prefix}_requests_per_second"] = figures["receiver_ceiling_requests_per_second"]
            measured[f"{prefix}_cpu_us_per_request"] = figures["receiver_cpu_us_per_request"]
        return measured

    def describe(self) -> dict[str, Any]:
        kinds = [host.plan for host in self.hosts]
        live = [plan for plan in kinds if plan.kind == "live"]
        return {
            "hosts": len(live),
            "over_tls": sum(1 for plan in live if plan.scheme == "https"),
            "tls_off_because": self.tls_off_because,
            "by_name": sum(1 for host in self.hosts if host.by_name),
            "names": self.dns is not None,
            "names_off_because": self.names_off_because,
            "dns_delay_ms": self.options.dns_delay_ms if self.dns else None,
            "dns_queries": self.dns_queries(),
            "requests": self.receiver.received() if self.receiver else None,
            "connections": self.receiver.connections() if self.receiver else None,
            "refusing": sum(1 for plan in kinds if plan.kind == "refusing"),
            "silent": [f"{plan.scheme}" for plan in kinds if plan.kind == "silent"],
            "latency_median_ms": self.options.latency_median_ms,
            "latency_p99_ms": self.options.latency_p99_ms,
            "host_latency_ms": percentiles(plan.latency_ms for plan in live),
            "error_rate": self.options.error_rate,
            "addresses": f"127.{self.subnet}.0.0/16",
            "receiver_processes": self.processes,
            "seed": self.options.seed,
        }

    def dns_queries(self) -> dict[str, int] | None:
        if self.dns is None:
            return None
        answered, found = self.dns.queries()
        return {"answered": answered, "found": found}

    def stop(self) -> dict[str, list[Receipt]]:
        receipts = self.receiver.stop() if self.receiver else []
        if self.dns:
            self.dns.stop()
        for sock in self._refusing:
            sock.close()
        self._refusing.clear()
        return {"wild": receipts}


@dataclass(frozen=True)
class WildHosts:
    """The spec: a world of these options, started for one scenario."""

    options: WildOptions
    default_processes: int = 2

    def start(self, context: StartContext) -> WildWorld:
        world = WildWorld(
            self.options,
            context.workdir / "wild",
            processes=context.receiver_processes or self.default_processes,
            names_wanted=context.local_service,
            tls_wanted=context.local_service,
        )
        world.start()
        return world

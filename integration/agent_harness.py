"""A simulated node running the long-lived agent (`kproxy run`) against the test API server.

    AgentNode
      node namespace:  kproxy run --kubeconfig ... (a child process, JSON log to a file)
                       ApiServer, in this process, its socket bound to 127.0.0.1 in the node ns
      pod namespaces:  servers (integration.traffic) and clients (Poller threads)

The API server runs in the test process so a test drives it directly (create, update, stop for an
outage, force a 410), yet the agent reaches it on the node's loopback as a real node reaches its
API server. That works because a network namespace is a property of each thread: a worker thread
enters the node namespace with setns(2) and creates the listening socket there (the serving
threads it starts inherit that namespace, and sockets keep the namespace they were made in). The
same trick lets clients probe from inside pod namespaces as plain threads of the test, with
timestamps on the test's own clock. The test's main thread never changes namespace.

Everything is torn down unconditionally: agents (their whole process group), pollers, the API
server, the worker threads, then the namespaces (integration.netns).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import http.client
import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml

from integration.apiserver import ApiServer
from integration.iptables_backend import iptables_tool, mode_backend, save_tool
from integration.manifests import NODE_NAME, REMOTE_NODE
from integration.netns import Namespace, Pod, Topology, kproxy_path, topology
from integration.real_node import DEFAULT_KUBELET
from integration.traffic import start_server

T = TypeVar("T")
JSON = dict[str, Any]

OTHER_NODE = REMOTE_NODE
HEALTHZ_PORT = 10256
METRICS_PORT = 10249
_CLONE_NEWNET = 0x40000000
_AGENT_STOP_SECONDS = 10.0
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy")
_libc = ctypes.CDLL(None, use_errno=True)


# --- threads inside network namespaces --------------------------------------------------------


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into the named network namespace."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsWorker:
    """A thread living in one network namespace that runs the callables it is given."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future[Any]] | None] = queue.Queue()
        self._entered: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name=f"netns-{ns}", daemon=True)
        self._thread.start()
        self._entered.result(timeout=10)

    def _run(self) -> None:
        try:
            enter_netns(self.ns)
        except OSError as exc:
            self._entered.set_exception(exc)
            return
        self._entered.set_result(None)
        while (job := self._jobs.get()) is not None:
            fn, future = job
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def call(self, fn: Callable[[], T], timeout: float = 60.0) -> T:
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future.result(timeout=timeout)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something truthy or `timeout` seconds pass; returns its
    last value (falsy on timeout), so the caller asserts on it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# --- Kubernetes objects -----------------------------------------------------------------------


def rfc3339(ts: float | None = None) -> str:
    """`2025-01-02T03:04:05.678901Z`, as the EndpointSlice controller writes trigger times."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def slice_object(
    service: str,
    addresses: Sequence[str],
    port: int,
    protocol: str = "TCP",
    namespace: str = "default",
    node_name: str = NODE_NAME,
    trigger_time: str | None = None,
    name: str | None = None,
) -> JSON:
    """An EndpointSlice of `service` with every address ready on `node_name`."""
    metadata: JSON = {
        "name": name or f"{service}-abcde",
        "namespace": namespace,
        "labels": {
            "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            "kubernetes.io/service-name": service,
        },
    }
    if trigger_time is not None:
        metadata["annotations"] = {"endpoints.kubernetes.io/last-change-trigger-time": trigger_time}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": metadata,
        "addressType": "IPv4",
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": True, "serving": True, "terminating": False},
                "nodeName": node_name,
            }
            for address in addresses
        ],
        "ports": [{"name": "p", "port": port, "protocol": protocol}],
    }


def node_object(name: str = NODE_NAME, address: str = "172.31.0.2") -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDR": "192.168.0.0/16", "podCIDRs": ["192.168.0.0/16"]},
        "status": {"addresses": [{"type": "InternalIP", "address": address}]},
    }


# --- clients ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One connection (TCP) or datagram exchange (UDP): when it started and ended (monotonic
    clock of this process) and who answered, or how it failed."""

    started: float
    ended: float
    outcome: str
    ok: bool


def _parse_answer(data: bytes) -> str:
    words = data.decode(errors="replace").split()
    if len(words) != 2:
        raise ValueError(f"unexpected answer {data!r}")
    return words[0]


def _failure(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


def tcp_exchange(target: str, port: int, timeout: float) -> Attempt:
    """One TCP connection to target:port (from the calling thread's namespace)."""
    started = time.monotonic()
    try:
        with socket.create_connection((target, port), timeout=timeout) as sock:
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        name = _parse_answer(data)
    except (OSError, ValueError) as exc:
        return Attempt(started, time.monotonic(), _failure(exc), False)
    return Attempt(started, time.monotonic(), name, True)


def udp_exchange(sock: socket.socket) -> Attempt:
    """One datagram and its answer on a connected UDP socket (one conntrack flow for all)."""
    started = time.monotonic()
    try:
        sock.send(b"probe\n")
        name = _parse_answer(sock.recv(4096))
    except (OSError, ValueError) as exc:
        return Attempt(started, time.monotonic(), _failure(exc), False)
    return Attempt(started, time.monotonic(), name, True)


class Poller:
    """Probes target:port in a loop from inside a namespace until stopped, recording every attempt.

    TCP: a new connection per attempt. UDP: one socket bound to `source_port` and connected to the
    target, so every datagram belongs to the same conntrack flow (as a long-lived DNS client)."""

    def __init__(
        self,
        ns: str,
        target: str,
        port: int,
        proto: str = "tcp",
        interval: float = 0.02,
        timeout: float = 1.0,
        source_port: int | None = None,
    ) -> None:
        self.ns, self.target, self.port, self.proto = ns, target, port, proto
        self.interval, self.timeout, self.source_port = interval, timeout, source_port
        self._attempts: list[Attempt] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"poller-{ns}", daemon=True)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            enter_netns(self.ns)
            if self.proto == "udp":
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("0.0.0.0", self.source_port or 0))
                    sock.connect((self.target, self.port))
                    sock.settimeout(self.timeout)
                    self._loop(lambda: udp_exchange(sock))
            else:
                self._loop(lambda: tcp_exchange(self.target, self.port, self.timeout))
        except BaseException as exc:
            self._error = exc

    def _loop(self, exchange: Callable[[], Attempt]) -> None:
        while not self._stop.is_set():
            attempt = exchange()
            with self._lock:
                self._attempts.append(attempt)
            self._stop.wait(self.interval)

    def attempts(self, since: float = 0.0) -> list[Attempt]:
        with self._lock:
            return [a for a in self._attempts if a.started >= since]

    def first(
        self, predicate: Callable[[Attempt], bool], since: float, timeout: float
    ) -> Attempt | None:
        """The first attempt started after `since` that satisfies `predicate`, waiting for it up
        to `timeout` seconds."""

        def found() -> Attempt | None:
            return next((a for a in self.attempts(since) if predicate(a)), None)

        return wait_until(found, timeout, interval=0.01)

    def settled_on(self, names: set[str], since: float, streak: int, timeout: float) -> float:
        """Wait until the last `streak` attempts were all answered by `names`; returns when the
        first of that streak started (inf on timeout)."""

        def check() -> float:
            recent = self.attempts(since)[-streak:]
            if len(recent) == streak and all(a.ok and a.outcome in names for a in recent):
                return recent[0].started
            return 0.0

        return wait_until(check, timeout, interval=0.02) or float("inf")

    def stop(self) -> list[Attempt]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._error is not None:
            raise RuntimeError(f"poller in {self.ns} crashed: {self._error!r}") from self._error
        return self.attempts()


def answered_by(name: str) -> Callable[[Attempt], bool]:
    """A predicate for Poller.first: the attempt was answered by backend `name`."""
    return lambda attempt: attempt.ok and attempt.outcome == name


def summarize(attempts: Sequence[Attempt]) -> dict[str, int]:
    """Outcome -> count, for assertion messages."""
    counts: dict[str, int] = {}
    for a in attempts:
        counts[a.outcome] = counts.get(a.outcome, 0) + 1
    return counts


# --- the agent --------------------------------------------------------------------------------


@dataclass
class Agent:
    """One `kproxy run` process in the node namespace; its JSON log goes to `log_path`."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, name: str | None = None) -> list[JSON]:
        """The agent's log events so far (of one name, or all)."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict) and (name is None or event.get("event") == name):
                    found.append(event)
        return found

    def wait_for_event(self, name: str, count: int = 1, timeout: float = 30.0) -> list[JSON]:
        """Wait until the log holds `count` events called `name`; raises with the log if the
        agent dies or the events do not come within `timeout` seconds."""

        def enough() -> list[JSON]:
            events = self.events(name)
            if len(events) >= count:
                return events
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log_tail()}")
            return []

        events = wait_until(enough, timeout, interval=0.05)
        if not events:
            raise RuntimeError(f"no {count}x {name} within {timeout:g}s:\n{self.log_tail()}")
        return events

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def syncs(self) -> list[JSON]:
        return self.events("sync_completed")

    def signal_group(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def terminate(self) -> int | None:
        """SIGTERM to the agent alone (as the kubelet stops a container); its exit status, or
        None if it did not exit within the grace period."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=_AGENT_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL to the agent and every process it started (its process group). Only while
        the agent is not yet reaped, so its pid (and group id) cannot belong to anyone else;
        anything left in the node namespace is killed when the topology closes."""
        if self.proc.poll() is not None:
            return
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=_AGENT_STOP_SECONDS)


def agent_config(
    sync_period: str = "2s",
    min_sync_period: str = "0s",
    extra: JSON | None = None,
    mode: str = "iptables",
) -> JSON:
    # The nftables mode reads its sync periods from `nftables:`, the others from `iptables:`.
    section = "nftables" if mode == "nftables" else "iptables"
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": mode,
        "healthzBindAddress": f"0.0.0.0:{HEALTHZ_PORT}",
        "metricsBindAddress": f"0.0.0.0:{METRICS_PORT}",
        section: {"syncPeriod": sync_period, "minSyncPeriod": min_sync_period},
        **(extra or {}),
    }


class AgentNode:
    """A node namespace with the API server on its loopback and the agent next to it."""

    def __init__(self, topo: Topology, workdir: Path, mode: str = "iptables") -> None:
        self.topo = topo
        self.node: Namespace = topo.node
        self.workdir = workdir
        self.mode = mode  # the proxy mode configure() writes
        self.lock_file = workdir / "xtables.lock"
        self.kubeconfig = workdir / "kubeconfig.yaml"
        self.config_file = workdir / "kube-proxy-config.yaml"
        self.agents: list[Agent] = []
        self._pollers: list[Poller] = []
        self._workers: dict[str, NetnsWorker] = {}
        self.api = ApiServer("127.0.0.1", 0, bookmark_interval=1.0)
        self.configure()

    # --- set-up

    def worker(self, ns: Namespace) -> NetnsWorker:
        """The (one) worker thread living in `ns`."""
        if ns.name not in self._workers:
            self._workers[ns.name] = NetnsWorker(ns.name)
        return self._workers[ns.name]

    def start_api(self) -> None:
        """Listen (again, on the same port after an outage) inside the node namespace."""
        self.worker(self.node).call(self.api.start)
        self.api.write_kubeconfig(self.kubeconfig)

    def configure(self, sync_period: str = "2s", min_sync_period: str = "0s") -> None:
        doc = agent_config(sync_period, min_sync_period, mode=self.mode)
        self.config_file.write_text(yaml.safe_dump(doc))

    def backend(self, name: str, ip: str, port: int, proto: str = "tcp") -> Pod:
        pod = self.topo.add_pod(name, ip)
        start_server(self.topo, pod.ns, name, port, proto)
        return pod

    def client(self, name: str, ip: str) -> Pod:
        return self.topo.add_pod(name, ip)

    # --- the agent

    def start_agent(self, *source: str, wait: bool = True) -> Agent:
        """`kproxy run` in the node namespace, from the API (default) or `source` flags
        (e.g. `--manifests DIR`); waits for its first successful sync."""
        if not source:
            source = ("--kubeconfig", str(self.kubeconfig))
        log_path = self.workdir / f"agent-{len(self.agents)}.log"
        argv = self.node.argv(
            str(kproxy_path()),
            "--log-level",
            "info",
            "run",
            *source,
            "--hostname-override",
            NODE_NAME,
            "--config",
            str(self.config_file),
        )
        env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARIABLES}
        env.update({"XTABLES_LOCKFILE": str(self.lock_file), "NO_PROXY": "*", "no_proxy": "*"})
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        agent = Agent(proc, log_path)
        self.agents.append(agent)
        if wait:
            agent.wait_for_event("sync_completed", timeout=60.0)
        return agent

    # --- looking at the node

    def save(self) -> str:
        """All IPv4 tables of the node (iptables-legacy-save) with comments dropped and chain
        counters zeroed: equal text means equal rules."""
        text = self.node.run(save_tool(mode_backend(self.topo, self.mode))).stdout
        lines = [line for line in text.splitlines() if not line.startswith("#")]
        return "\n".join(re.sub(r"\[\d+:\d+\]$", "[0:0]", line) for line in lines) + "\n"

    def rules(self) -> str:
        """What the proxy mode wrote for IPv4, as comparable text: save() in the iptables mode,
        kproxy's `ip kube-proxy` table in the nftables mode (empty when it is gone; the node's
        other tables hold counters that traffic changes)."""
        if self.mode == "nftables":
            return self.node.run("nft", "list", "table", "ip", "kube-proxy", check=False).stdout
        return self.save()

    def dnat_to(self, ip: str, port: int) -> str:
        """How the mode's rules print a DNAT to ip:port (to wait for with wait_for_nat)."""
        if self.mode == "nftables":
            return f"dnat to {ip}:{port}"
        return f"--to-destination {ip}:{port}"

    def iptables(self, *args: str, lock_file: Path | None = None) -> None:
        lock = str(lock_file or self.lock_file)
        tool = iptables_tool(mode_backend(self.topo, self.mode))
        self.node.run(tool, "-w", *args, env={"XTABLES_LOCKFILE": lock})

    def http_get(self, port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET http://127.0.0.1:PORT/PATH from inside the node namespace."""

        def get() -> tuple[int, str]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                return response.status, response.read().decode()
            finally:
                conn.close()

        return self.worker(self.node).call(get, timeout=timeout + 5)

    def conntrack_udp(self) -> list[dict[str, str]]:
        """The node's UDP conntrack entries: orig_src/orig_dst/orig_sport/orig_dport and
        reply_src/reply_dst/reply_sport/reply_dport of each."""
        out = self.node.run("conntrack", "-L", "-p", "udp", check=False).stdout
        entries = []
        for line in out.splitlines():
            pairs = re.findall(r"(src|dst|sport|dport)=(\S+)", line)
            if len(pairs) < 8:
                continue
            entry = {f"orig_{k}": v for k, v in pairs[:4]}
            entry.update({f"reply_{k}": v for k, v in pairs[4:8]})
            entries.append(entry)
        return entries

    # --- clients

    def poller(self, client: Pod, target: str, port: int, **kwargs: Any) -> Poller:
        poller = Poller(client.ns.name, target, port, **kwargs).start()
        self._pollers.append(poller)
        return poller

    def exchange(self, client: Pod, target: str, port: int, timeout: float = 1.0) -> Attempt:
        """One TCP connection from `client` to target:port."""
        return self.worker(client.ns).call(lambda: tcp_exchange(target, port, timeout))

    def probe(self, client: Pod, target: str, port: int, count: int) -> dict[str, int]:
        """`count` TCP connections from `client`; outcome -> count."""
        return summarize([self.exchange(client, target, port) for _ in range(count)])

    # --- teardown

    def close(self) -> None:
        """Stop everything started here (the namespaces are the topology's); every step is
        attempted whatever happened before."""
        for poller in self._pollers:
            with contextlib.suppress(Exception):
                poller.stop()
        for agent in self.agents:
            agent.kill()
        self.api.stop()
        for worker in self._workers.values():
            worker.close()


@contextlib.contextmanager
def agent_node(
    label: str,
    workdir: Path,
    with_api: bool = True,
    mode: str = "iptables",
    kubelet: str = DEFAULT_KUBELET,
) -> Iterator[AgentNode]:
    """A fresh node (namespaces `kpt-<label>-<random>-*`) with the API server listening on its
    loopback and holding this node's Node object, its agent configured for proxy `mode`; all of
    it removed on exit."""
    with topology(label, kubelet=kubelet) as topo:
        node = AgentNode(topo, workdir, mode)
        try:
            if with_api:
                node.start_api()
                node.api.create("Node", node_object())
            yield node
        finally:
            node.close()


@contextlib.contextmanager
def holding_lock(path: Path) -> Iterator[None]:
    """Hold the xtables lock file as another iptables writer would."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def median_and_max(values: Sequence[float]) -> tuple[float, float]:
    return statistics.median(values), max(values)


def nat_rules(node: AgentNode) -> str:
    """The node's IPv4 nat rules: the nat table in the iptables mode, kproxy's whole `ip`
    table in the nftables mode (its nat and filter chains live in one table)."""
    if node.mode == "nftables":
        return node.node.run("nft", "list", "table", "ip", "kube-proxy", check=False).stdout
    return node.node.run(save_tool(mode_backend(node.topo, node.mode)), "-t", "nat").stdout


def wait_for_nat(node: AgentNode, text: str, present: bool = True, timeout: float = 15.0) -> bool:
    """Wait until `text` appears in (or, present=False, vanishes from) the node's nat rules
    (nat_rules); node.dnat_to(ip, port) is the text of a DNAT in the node's mode."""
    return wait_until(lambda: (text in nat_rules(node)) == present, timeout, interval=0.1)


def wall_time(monotonic: float) -> float:
    """A time of this process's monotonic clock on the wall clock (the agent logs wall time)."""
    return time.time() - (time.monotonic() - monotonic)


def log_time(event: JSON) -> float:
    """The wall-clock time of an agent log event."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()

"""A simulated Kubernetes node built from network namespaces and veth pairs.

    outside 172.31.0.1 ==veth== 172.31.0.2 node ==veth== pod (its pod IP/32), one pair per pod
                                 172.31.1.2 node ==veth== 172.31.1.1 far  (optional, add_outside)

The node routes each pod IP to that pod's veth and answers ARP on it for every other address
(proxy_arp), as routed CNI plugins do; a pod sends everything out of its eth0. The node's default
route points at the outside namespace, so Service VIPs are routable as on a real node, and the
outside namespace stands for a client beyond the node; its default route points at the node, so
externalIPs and load-balancer IPs reach the node as a router in front of it would send them.
`add_outside()` adds another client beyond the node on a link of its own, which also gives the
node a second address.

`enable_ipv6()` makes the node and the outside namespace dual-stack (fd00:31::/64 on the link
between them); pods added with `ip6=` then hold that address too and route IPv6 through the
link-local gateway fe80::1, which the node holds on each pod veth.

Nothing here touches the root network namespace: every link is created inside the namespaces
(`ip -n NODE link add ... peer ... netns POD`), every sysctl is written inside them, and `close()`
kills every process started here and deletes every namespace, whatever happened before.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from integration.real_node import DEFAULT_KUBELET, ForeignRules

PREFIX = "kpt-"
NODE_IP = "172.31.0.2"
OUTSIDE_IP = "172.31.0.1"
NODE_IP6 = "fd00:31::2"
OUTSIDE_IP6 = "fd00:31::1"
_LINK_PREFIX = 24
_LINK_PREFIX6 = 64
# The node's address on every pod veth: link-local, so each pair can use the same one.
POD_GATEWAY6 = "fe80::1"
# Booted with ipv6.disable=1, the kernel has no IPv6 sysctls in any namespace.
_KERNEL_HAS_IPV6 = Path("/proc/sys/net/ipv6").exists()
_STOP_GRACE_SECONDS = 3.0


class CommandError(RuntimeError):
    """A command failed; the message carries its argv, exit status and output."""

    def __init__(self, argv: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"`{' '.join(argv)}` exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
        self.argv = list(argv)
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; raise CommandError (with its output) if it fails."""
    proc = subprocess.run(
        list(argv),
        input=input,
        env=None if env is None else {**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc)
    return proc


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of the existing network namespaces that start with `prefix`."""
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def _proc_sys(key: str) -> str:
    """`net.ipv4.conf.vp0.proxy_arp` -> `/proc/sys/net/ipv4/conf/vp0/proxy_arp`."""
    return "/proc/sys/" + key.replace(".", "/")


@dataclass(frozen=True)
class Namespace:
    """A named network namespace (`ip netns`)."""

    name: str

    def argv(self, *args: str) -> list[str]:
        """`args` wrapped to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self,
        *args: str,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        return run(self.argv(*args), input=input, env=env, check=check, timeout=timeout)

    def ip(self, *args: str) -> None:
        run(["ip", "-n", self.name, *args])

    def sysctl(self, settings: Mapping[str, str]) -> None:
        """Write `net.ipv4...` settings in this namespace (through /proc/sys, which shows the
        writer's own namespace; the `sysctl` tool is not installed everywhere)."""
        args = [arg for key, value in settings.items() for arg in (_proc_sys(key), value)]
        script = 'while [ "$#" -gt 0 ]; do printf %s "$2" > "$1" || exit 1; shift 2; done'
        self.run("sh", "-c", script, "sh", *args)


@dataclass(frozen=True)
class Pod:
    """A pod: its own namespace, `ip` on its eth0, attached to the node through `node_link`."""

    name: str
    ip: str
    ns: Namespace
    node_link: str
    ip6: str | None = None


@dataclass
class Topology:
    """One node, one outside client and any number of pods. Build with `topology()`."""

    prefix: str
    node: Namespace = field(init=False)
    outside: Namespace = field(init=False)
    pods: dict[str, Pod] = field(default_factory=dict)
    # Clients beyond the node added by add_outside(), by name.
    outsides: dict[str, Namespace] = field(default_factory=dict)
    ipv6: bool = False
    # The neighbours' rules build() seeds into the node (see real_node.py); None on a clean node.
    foreign: ForeignRules | None = None
    _namespaces: list[Namespace] = field(default_factory=list)
    _processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node = Namespace(f"{self.prefix}-node")
        self.outside = Namespace(f"{self.prefix}-outside")

    def _add_namespace(self, ns: Namespace) -> None:
        run(["ip", "netns", "add", ns.name])
        self._namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        if _KERNEL_HAS_IPV6:
            # No duplicate address detection on the links made later (a veth moved into a
            # namespace takes that namespace's defaults): while its link-local address is
            # tentative, a pod's first IPv6 packet waits about 2 s.
            ns.sysctl(
                {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}
            )

    def build(self, real_node: bool = True, kubelet: str = DEFAULT_KUBELET) -> None:
        """The node, the outside namespace and the link between them; with `real_node`, the
        node starts with kubelet's, a CNI's, Docker's and a firewall's rules in it."""
        node, outside = self.node, self.outside
        self._add_namespace(node)
        self._add_namespace(outside)
        node.ip(
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", outside.name
        )
        for ns, address in ((node, NODE_IP), (outside, OUTSIDE_IP)):
            ns.ip("addr", "add", f"{address}/{_LINK_PREFIX}", "dev", "eth0")
            ns.ip("link", "set", "eth0", "up")
        node.ip("route", "add", "default", "via", OUTSIDE_IP)
        outside.ip("route", "add", "default", "via", NODE_IP)
        node.sysctl(
            {
                "net.ipv4.ip_forward": "1",
                # REJECT answers every probe; the default per-peer ICMP rate limit would turn
                # some refusals into timeouts.
                "net.ipv4.icmp_ratelimit": "0",
                "net.ipv4.conf.all.rp_filter": "0",
                "net.ipv4.conf.default.rp_filter": "0",
            }
        )
        if real_node:
            self.foreign = ForeignRules(node, Path(f"/tmp/{self.prefix}.xtables.lock"), kubelet)
            self.foreign.seed()

    def enable_ipv6(self) -> None:
        """IPv6 on the node and outside namespaces (NODE_IP6, OUTSIDE_IP6), default routes both
        ways, and IPv6 forwarding on the node. Addresses skip duplicate address detection, which
        would keep them unusable for a second or more."""
        node, outside = self.node, self.outside
        for ns, address in ((node, NODE_IP6), (outside, OUTSIDE_IP6)):
            ns.ip("-6", "addr", "add", f"{address}/{_LINK_PREFIX6}", "dev", "eth0", "nodad")
        node.ip("-6", "route", "add", "default", "via", OUTSIDE_IP6)
        outside.ip("-6", "route", "add", "default", "via", NODE_IP6)
        # As for IPv4 in build(): no ICMP rate limit, so every REJECT is answered.
        node.sysctl({"net.ipv6.conf.all.forwarding": "1", "net.ipv6.icmp.ratelimit": "0"})
        self.ipv6 = True

    def add_outside(self, name: str, ip: str, node_ip: str) -> Namespace:
        """Another client beyond the node, on a link of its own: `ip` in the new namespace,
        `node_ip` (a second node address) on the node's side, both /24; its default route points
        at the node."""
        if name in self.outsides:
            raise ValueError(f"outside namespace {name} already exists")
        ns = Namespace(f"{self.prefix}-{name}")
        link = f"eth{len(self.outsides) + 1}"
        self._add_namespace(ns)
        self.node.ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        ns.ip("addr", "add", f"{ip}/{_LINK_PREFIX}", "dev", "eth0")
        self.node.ip("addr", "add", f"{node_ip}/{_LINK_PREFIX}", "dev", link)
        ns.ip("link", "set", "eth0", "up")
        self.node.ip("link", "set", link, "up")
        ns.ip("route", "add", "default", "via", node_ip)
        self.outsides[name] = ns
        return ns

    def pod_namespace(self, name: str, link_prefix: str) -> tuple[Namespace, str]:
        """A new pod's namespace (deleted by close()) and the node-side name of the veth pair
        joining it to the node (`eth0` inside the pod); addresses and routes are the caller's."""
        if name in self.pods:
            raise ValueError(f"pod {name} already exists")
        ns = Namespace(f"{self.prefix}-{name}")
        link = f"{link_prefix}{len(self.pods)}"
        self._add_namespace(ns)
        self.node.ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
        return ns, link

    def add_pod(self, name: str, ip: str, ip6: str | None = None) -> Pod:
        """A pod namespace holding `ip` (and `ip6`, after enable_ipv6()), routed by the node
        through its own veth."""
        ns, link = self.pod_namespace(name, "vp")
        ns.ip("addr", "add", f"{ip}/32", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        ns.ip("route", "add", "default", "dev", "eth0")
        self.node.ip("link", "set", link, "up")
        self.node.ip("route", "add", f"{ip}/32", "dev", link)
        self.node.sysctl(
            {
                f"net.ipv4.conf.{link}.proxy_arp": "1",
                f"net.ipv4.conf.{link}.rp_filter": "0",
                # Without this the node delays proxy ARP answers by up to 0.8 s.
                f"net.ipv4.neigh.{link}.proxy_delay": "0",
            }
        )
        if ip6 is not None:
            self._add_pod_ipv6(ns, link, ip6)
        pod = Pod(name, ip, ns, link, ip6)
        self.pods[name] = pod
        return pod

    def _add_pod_ipv6(self, ns: Namespace, link: str, ip6: str) -> None:
        if not self.ipv6:
            raise ValueError("call enable_ipv6() before adding a pod with an IPv6 address")
        ns.ip("-6", "addr", "add", f"{ip6}/128", "dev", "eth0", "nodad")
        self.node.ip("-6", "addr", "add", f"{POD_GATEWAY6}/64", "dev", link, "nodad")
        ns.ip("-6", "route", "add", "default", "via", POD_GATEWAY6, "dev", "eth0")
        self.node.ip("-6", "route", "add", f"{ip6}/128", "dev", link)

    def spawn(
        self, ns: Namespace, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Start a long-running process in `ns`; `close()` kills it."""
        proc = subprocess.Popen(
            ns.argv(*argv),
            env=None if env is None else {**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, so stop() reaches its children too
        )
        self._processes.append(proc)
        return proc

    def close(self) -> None:
        """Kill every process started here, then delete every namespace. Never raises early:
        everything is attempted, and the first error is raised at the end."""
        errors: list[BaseException] = []
        for proc in reversed(self._processes):
            try:
                stop(proc)
            except Exception as exc:
                errors.append(exc)
        self._processes.clear()
        for ns in reversed(self._namespaces):
            try:
                _kill_remaining(ns)
                run(["ip", "netns", "del", ns.name])
            except Exception as exc:
                errors.append(exc)
        self._namespaces.clear()
        if self.foreign is not None:
            self.foreign.lock_file.unlink(missing_ok=True)
        if errors:
            raise errors[0]


def stop(proc: subprocess.Popen[str]) -> str:
    """Terminate a process started by `Topology.spawn` (and its process group), killing it if it
    does not exit within a few seconds. Returns what it wrote to stderr."""
    if proc.poll() is None:
        for sig, wait in ((signal.SIGTERM, _STOP_GRACE_SECONDS), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    if proc.stdout is not None and proc.stdout.closed:
        return ""  # stopped before
    _, err = proc.communicate()  # also closes the pipes
    return err or ""


def _kill_remaining(ns: Namespace) -> None:
    """Kill whatever still runs inside one of our namespaces (a process a test started some other
    way); a namespace with processes in it outlives `ip netns del`."""
    out = run(["ip", "netns", "pids", ns.name], check=False).stdout
    for pid in (int(p) for p in out.split()):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line `proc` prints on stdout (later lines may sit in the reader's buffer, out of
    the selector's sight); raises if it exits or stays silent for `timeout` seconds (a bound on
    waiting, not an assertion about speed)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                line = proc.stdout.readline()
                if line:
                    return line.rstrip("\n")
                break  # EOF: the process is gone
    err = stop(proc)
    raise RuntimeError(
        f"`{proc.args!r}` printed nothing within {timeout:g}s "
        f"(exit status {proc.returncode}); stderr:\n{err}"
    )


def unique_prefix(label: str = "") -> str:
    """A fresh namespace-name prefix: `kpt-<label>-<random>`."""
    return f"{PREFIX}{label + '-' if label else ''}{secrets.token_hex(3)}"


@contextmanager
def topology(
    label: str = "", real_node: bool = True, kubelet: str = DEFAULT_KUBELET
) -> Iterator[Topology]:
    """A node and an outside namespace, torn down unconditionally on exit. With `real_node` (the
    default) the node starts with its neighbours' rules (real_node.py), kubelet's and the CNI's
    in the `kubelet` backend, and a test that ends normally fails if any of them changed."""
    topo = Topology(unique_prefix(label))
    try:
        topo.build(real_node, kubelet)
        yield topo
        if topo.foreign is not None and (changes := topo.foreign.changes()):
            raise AssertionError(
                "kproxy changed rules that belong to other programs:\n" + "\n".join(changes)
            )
    finally:
        topo.close()


# --- the program under test -------------------------------------------------------------------


def kproxy_path() -> Path:
    """The venv's `kproxy` script, next to the running interpreter (not resolved: the venv's
    python is a symlink and the script lives beside the link)."""
    return Path(sys.executable).parent / "kproxy"


def run_kproxy(
    ns: Namespace, *args: str, lock_file: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`kproxy ARGS` inside `ns`, with its own xtables lock file: namespaces do not share tables,
    so they need not wait on each other's (or the host's) /run/xtables.lock."""
    path = kproxy_path()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `make venv` first")
    return ns.run(str(path), *args, env={"XTABLES_LOCKFILE": str(lock_file)}, check=check)


def nft_listing(ns: Namespace, family: str) -> list[dict[str, Any]]:
    """`nft -j list table FAMILY kube-proxy` without handles, objects by kind and name (a
    chain's rules in their order): two namespaces' tables compare equal when they hold the same."""
    doc = json.loads(ns.run("nft", "-j", "list", "table", family, "kube-proxy").stdout)
    items = []
    for item in doc["nftables"]:
        ((kind, body),) = item.items()
        if kind == "metainfo":
            continue
        body = {k: v for k, v in body.items() if k != "handle"}
        if isinstance(body.get("elem"), list):
            body["elem"] = sorted(body["elem"], key=json.dumps)
        items.append({kind: body})
    # Objects by kind and name; a chain's rules keep their order (the sort is stable).
    return sorted(
        items,
        key=lambda i: (
            next(iter(i)),
            json.dumps(next(iter(i.values())).get("chain", next(iter(i.values())).get("name"))),
        ),
    )

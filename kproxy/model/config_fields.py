"""The one table of KubeProxyConfiguration fields kproxy reads. It drives parsing, kube-proxy's
command-line flags, the warning for every other field, and the table of fields in
docs/configuration.md."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kproxy.model.config_values import (
    DEFAULT_MODE,
    MODE_SECTIONS,
    Parser,
    expect,
    feature_gates_flag,
    one_of,
    or_list,
    parse_bit,
    parse_bool,
    parse_cidr_list,
    parse_cidrs,
    parse_conntrack_count,
    parse_conntrack_timeout,
    parse_duration,
    parse_feature_gates,
    parse_listen_address,
    parse_mode,
    parse_node_ip,
    parse_node_port_addresses,
    parse_oom_score_adj,
    parse_port_range,
    parse_text,
)

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"
DETECT_LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")
SYNC_PERIOD = 30.0
IPTABLES_BACKENDS = ("auto", "legacy", "nft")


def is_null(value: Any) -> bool:
    return value is None


def is_empty(value: Any) -> bool:
    return not value


def never(value: Any) -> bool:
    return False


def comma_list(value: Any) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _sync_period(value: Any, field: str) -> float:
    # 0s is what kubeadm writes for "unset"; upstream's defaulting makes it 30s.
    return parse_duration(value, field) or SYNC_PERIOD


@dataclass(frozen=True, slots=True)
class Field:
    """One field: where it is in the document, where it goes, and how it is documented."""

    path: str  # dotted, e.g. `iptables.masqueradeBit`
    attr: str | None  # ProxyConfig attribute (`conntrack.min` for ConntrackConfig); None: checked
    parse: Parser
    default: str  # as docs/configuration.md shows it
    doc: str  # docs/configuration.md's "what kproxy does with it"
    flag: str | None = None  # kube-proxy's flag for it
    help: str = ""  # the flag's help text
    flag_type: type = str  # str, int or bool: what the command line gives
    # Values that leave the default in place: null, or (upstream's defaulting) empty values.
    keeps_default: Callable[[Any], bool] = is_null
    flag_value: Callable[[Any], Any] = lambda value: value  # command line -> document value
    # A flag upstream applies in every mode: it sets this field in the section the mode reads.
    flag_every_mode: bool = False

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes that read this field: a mode section's fields only in the modes reading it."""
        section = self.path.split(".")[0] if "." in self.path else ""
        if section not in MODE_SECTIONS.values():
            return tuple(MODE_SECTIONS)
        return tuple(mode for mode, reads in MODE_SECTIONS.items() if reads == section)

    def flag_path(self, mode: str) -> str:
        """Where this field's flag lands in the document in `mode`."""
        if not self.flag_every_mode:
            return self.path
        section = MODE_SECTIONS.get(mode, MODE_SECTIONS[DEFAULT_MODE])
        return f"{section}.{self.path.rsplit('.', 1)[1]}"

    @property
    def help_path(self) -> str:
        """The field a flag sets, as its --help names it."""
        if not self.flag_every_mode:
            return self.path
        leaf = self.path.rsplit(".", 1)[1]
        return f"{self.path}; nftables.{leaf} in the nftables mode"


FIELDS: tuple[Field, ...] = (
    Field("apiVersion", None, expect(API_VERSION), f"`{API_VERSION}`", "the only one accepted"),
    Field("kind", None, expect(KIND), f"`{KIND}`", "the only one accepted"),
    Field(
        "mode", "mode", parse_mode, f"`{DEFAULT_MODE}`",
        "`\"\"` and `iptables` (netfilter DNAT), `nftables` (one nftables table per family, "
        "written over netlink) or `userspace` (kproxy relays each connection); `ipvs` and "
        "`kernelspace` are refused",
        "--proxy-mode", f"{or_list(MODE_SECTIONS)}.", keeps_default=is_empty,
    ),
    Field(
        "iptablesBackend", "iptables_backend", one_of(IPTABLES_BACKENDS), "`auto`",
        "kproxy's own (not kube-proxy's): which x_tables the iptables mode writes: `auto` (the "
        "backend kubelet uses, by its KUBE-IPTABLES-HINT chain, as upstream's image decides), "
        "`legacy` (x_tables, a whole-table replace) or `nft` (iptables-nft)",
        "--iptables-backend", "auto, legacy or nft.", keeps_default=is_empty,
    ),
    Field(
        "portRange", "port_range", parse_port_range, "none",
        "userspace mode: the ports its listeners bind (`begin-end` or `begin+size`); empty lets "
        "the kernel choose",
        "--proxy-port-range", "Ports the userspace listeners use.", keeps_default=is_empty,
    ),
    Field(
        "udpIdleTimeout", "udp_idle_timeout", parse_duration, "`250ms`",
        "userspace mode: how long a UDP client mapping lives without traffic",
        "--udp-timeout", "Idle time of a userspace UDP mapping.", keeps_default=is_empty,
    ),
    Field(
        "clusterCIDR", "cluster_cidrs", parse_cidrs, "none",
        "the pod network, comma-separated for dual stack; with `detectLocalMode: ClusterCIDR`, "
        "traffic to a ClusterIP from outside it is masqueraded, as kube-proxy does",
        "--cluster-cidr", "Pod network CIDR(s), comma-separated.", keeps_default=is_empty,
    ),
    Field(
        "hostnameOverride", "hostname_override", parse_text, "the host name",
        "the Node name; `--hostname-override` wins over it",
        "--hostname-override", "The node name, instead of the host's name.",
        keeps_default=is_empty,
    ),
    Field(
        "detectLocalMode", "detect_local_mode", one_of(DETECT_LOCAL_MODES), "`ClusterCIDR`",
        "how rules tell pod traffic from other traffic: `ClusterCIDR`, `NodeCIDR` (the Node's "
        "`spec.podCIDRs`), `BridgeInterface`, `InterfaceNamePrefix`",
        "--detect-local-mode", "How pod traffic is recognised.", keeps_default=is_empty,
    ),
    Field(
        "detectLocal.bridgeInterface", "bridge_interface", parse_text, "none",
        "required by `BridgeInterface`", keeps_default=is_empty,
    ),
    Field(
        "detectLocal.interfaceNamePrefix", "interface_name_prefix", parse_text, "none",
        "required by `InterfaceNamePrefix`", keeps_default=is_empty,
    ),
    Field(
        "nodePortAddresses", "node_port_addresses", parse_node_port_addresses,
        "all local addresses",
        "CIDRs and/or `primary` (the Node's `InternalIP` addresses) that NodePorts answer on",
        "--nodeport-addresses", "CIDRs or 'primary', comma-separated.",
        keeps_default=is_empty, flag_value=comma_list,
    ),
    Field(
        "featureGates", "feature_gates", parse_feature_gates, "none",
        "nftables mode: `KubeProxyNFTablesLocalhostNodePorts: true` (alpha, off by default, "
        "as upstream) answers TCP NodePorts on `127.0.0.1` and `::1` through the relay; other "
        "gates are reported as ignored",
        "--feature-gates", "Gates, e.g. KubeProxyNFTablesLocalhostNodePorts=true.",
        keeps_default=is_empty, flag_value=feature_gates_flag,
    ),
    Field(
        "allowedExternalIPCIDRs", "allowed_external_ip_cidrs", parse_cidr_list, "any address",
        "kproxy's own (not kube-proxy's): the only CIDRs a Service's `externalIPs` and "
        "load-balancer ingress IPs may be in; any other gets no rule (one warning naming the "
        "Service and field), and `[]` allows none. Closes CVE-2020-8554 at the node",
    ),
    Field(
        "iptables.masqueradeAll", "masquerade_all", parse_bool, "`false`",
        "masquerade all Service traffic",
        "--masquerade-all", "Masquerade all Service traffic.", flag_type=bool,
        flag_every_mode=True,
    ),
    Field(
        "iptables.masqueradeBit", "masquerade_bit", parse_bit, "`14` (mark `0x4000`)",
        "the packet-mark bit of `KUBE-MARK-MASQ`, 0 to 31",
        "--iptables-masquerade-bit", "fwmark bit for SNAT, 0-31.", flag_type=int,
    ),
    Field(
        "iptables.syncPeriod", "sync_period", _sync_period, "`30s`",
        "the longest time between two syncs; also the retry delay, and half of the health "
        "timeout; kubeadm's `0s` means 30s",
        "--iptables-sync-period", "Longest wait between syncs.", keeps_default=is_empty,
        flag_every_mode=True,
    ),
    Field(
        "iptables.minSyncPeriod", "min_sync_period", parse_duration, "`1s`",
        "the shortest time from the end of one sync to the start of the next; changes in "
        "between are coalesced (`0s` is an explicit zero)",
        "--iptables-min-sync-period", "Shortest wait between syncs.", keeps_default=is_empty,
        flag_every_mode=True,
    ),
    Field(
        "iptables.localhostNodePorts", "localhost_nodeports", parse_bool, "`true`",
        "IPv4 NodePorts also answer on 127.0.0.1; when they do, kproxy sets "
        "`net.ipv4.conf.all.route_localnet=1`",
        "--iptables-localhost-nodeports", "NodePorts on 127.0.0.1.", flag_type=bool,
    ),
    Field(
        "nftables.masqueradeAll", "masquerade_all", parse_bool, "`false`",
        "masquerade all Service traffic",
    ),
    Field(
        "nftables.masqueradeBit", "masquerade_bit", parse_bit, "`14` (mark `0x4000`)",
        "the packet-mark bit set by the `mark-for-masquerade` chain, 0 to 31",
    ),
    Field(
        "nftables.syncPeriod", "sync_period", _sync_period, "`30s`",
        "as `iptables.syncPeriod`", keeps_default=is_empty,
    ),
    Field(
        "nftables.minSyncPeriod", "min_sync_period", parse_duration, "`1s`",
        "as `iptables.minSyncPeriod`", keeps_default=is_empty,
    ),
    Field(
        "healthzBindAddress", "healthz_bind_address", parse_listen_address, "`0.0.0.0:10256`",
        "`/healthz` and `/livez`",
        "--healthz-bind-address", "host:port of /healthz and /livez.", keeps_default=is_empty,
    ),
    Field(
        "metricsBindAddress", "metrics_bind_address", parse_listen_address, "`127.0.0.1:10249`",
        "`/metrics` and `/statusz`; set `0.0.0.0:10249` to scrape it from another host (then "
        "`/statusz`, which names objects and the API server, is readable from there too)",
        "--metrics-bind-address", "host:port of /metrics and /statusz.", keeps_default=is_empty,
    ),
    Field(
        "bindAddress", "bind_address", parse_node_ip, "`0.0.0.0`",
        "a specific address is the node's IP where the Node object gives none (for "
        "`loadBalancerSourceRanges` that contain the node)",
        "--bind-address", "The node's IP when the Node object gives none.",
        keeps_default=is_empty,
    ),
    Field(
        "clientConnection.kubeconfig", "kubeconfig", parse_text, "none",
        "the kubeconfig `kproxy run` uses when `--kubeconfig` is not given",
        keeps_default=is_empty,
    ),
    Field(
        "conntrack.maxPerCore", "conntrack.max_per_core", parse_conntrack_count, "`32768`",
        "at start, `nf_conntrack_max` is raised to `max(maxPerCore x CPUs, min)`, only from the "
        "host's network namespace (it is host-wide); `0` leaves the node's value",
    ),
    Field(
        "conntrack.min", "conntrack.min", parse_conntrack_count, "`131072`",
        "see `maxPerCore`; `0` leaves the node's value",
    ),
    Field(
        "conntrack.tcpEstablishedTimeout", "conntrack.tcp_established_timeout",
        parse_conntrack_timeout, "`24h`",
        "set at start (`nf_conntrack_tcp_timeout_established`); `0s` leaves the node's value",
    ),
    Field(
        "conntrack.tcpCloseWaitTimeout", "conntrack.tcp_close_wait_timeout",
        parse_conntrack_timeout, "`1h`",
        "set at start (`nf_conntrack_tcp_timeout_close_wait`); `0s` leaves the node's value",
    ),
    Field(
        "conntrack.udpTimeout", "conntrack.udp_timeout", parse_conntrack_timeout, "unset",
        "set at start when given (`nf_conntrack_udp_timeout`)",
    ),
    Field(
        "conntrack.udpStreamTimeout", "conntrack.udp_stream_timeout", parse_conntrack_timeout,
        "unset", "set at start when given (`nf_conntrack_udp_timeout_stream`)",
    ),
    Field(
        "oomScoreAdj", "oom_score_adj", parse_oom_score_adj, "`-999`",
        "the agent's OOM score; `null` leaves the process's own",
        "--oom-score-adj", "OOM score of the process.", flag_type=int, keeps_default=never,
    ),
)  # fmt: skip

BY_FLAG = {f.flag: f for f in FIELDS if f.flag}
BY_PATH = {f.path: f for f in FIELDS}
# Top-level keys holding a mapping of fields (`iptables`, `conntrack`, ...).
SECTIONS = tuple(dict.fromkeys(f.path.split(".")[0] for f in FIELDS if "." in f.path))


def known_names(section: str | None) -> tuple[str, ...]:
    """The field names kproxy reads directly under `section` (None: the top level)."""
    if section is None:
        return tuple(f.path for f in FIELDS if "." not in f.path) + SECTIONS
    prefix = f"{section}."
    return tuple(f.path[len(prefix) :] for f in FIELDS if f.path.startswith(prefix))


def suggest_field(path: str) -> str | None:
    """The field an ignored one was probably meant to be: the same name in another case or at
    another level (`masqueradeAll` for `iptables.masqueradeAll`), else a near spelling."""
    section, _, name = path.rpartition(".")
    by_lower = {f.path.lower(): f.path for f in FIELDS} | {s.lower(): s for s in SECTIONS}
    if path.lower() in by_lower:
        return by_lower[path.lower()]
    by_leaf = {f.path.rsplit(".", 1)[-1].lower(): f.path for f in reversed(FIELDS)}
    if name.lower() in by_leaf:
        return by_leaf[name.lower()]
    close = difflib.get_close_matches(name, known_names(section or None), n=1, cutoff=0.8)
    return f"{section}.{close[0]}" if close and section else (close[0] if close else None)


def render_field_table() -> str:
    """The README's table of fields, one row per field of FIELDS."""
    rows = [
        "| field | flag | default | modes | what kproxy does with it |",
        "|---|---|---|---|---|",
    ]
    for f in FIELDS:
        flag = f"`{f.flag}`" if f.flag else ""
        modes = "all" if f.modes == tuple(MODE_SECTIONS) else ", ".join(f.modes)
        rows.append(f"| `{f.path}` | {flag} | {f.default} | {modes} | {f.doc} |")
    return "\n".join(rows) + "\n"

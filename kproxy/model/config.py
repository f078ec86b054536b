"""kproxy's configuration: the subset of kube-proxy's KubeProxyConfiguration kproxy acts on.

Which fields exist, how each is parsed, which flag sets it and which modes read it is the table
in config_fields. As upstream, the nftables mode reads the `nftables:` section's masquerade and
sync settings and ignores the `iptables:` section's; the other modes the reverse."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.errors import ConfigError
from kproxy.model.config_fields import (
    API_VERSION,
    BY_FLAG,
    BY_PATH,
    DETECT_LOCAL_MODES,
    FIELDS,
    KIND,
    SECTIONS,
    SYNC_PERIOD,
    known_names,
)
from kproxy.model.config_values import (
    DEFAULT_MODE,
    FEATURE_GATES,
    parse_bind_address,
    parse_duration,
)

__all__ = [
    "API_VERSION",
    "DETECT_LOCAL_MODES",
    "KIND",
    "ConntrackConfig",
    "ProxyConfig",
    "parse_bind_address",
    "parse_config",
    "parse_duration",
    "with_flags",
]


@dataclass(frozen=True, slots=True)
class ConntrackConfig:
    """kube-proxy's conntrack sysctls; None leaves the kernel's value."""

    max_per_core: int | None = 32768
    min: int | None = 131072
    tcp_established_timeout: float | None = 86400.0
    tcp_close_wait_timeout: float | None = 3600.0
    udp_timeout: float | None = None
    udp_stream_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    cluster_cidrs: tuple[str, ...] = ()
    hostname_override: str = ""
    masquerade_all: bool = False
    masquerade_bit: int = 14
    sync_period: float = SYNC_PERIOD
    min_sync_period: float = 1.0
    localhost_nodeports: bool = True
    # CIDRs and the keyword `primary`; empty means every local address.
    node_port_addresses: tuple[str, ...] = ()
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    detect_local_mode: str = "ClusterCIDR"
    mode: str = DEFAULT_MODE  # or another of MODE_SECTIONS
    # kproxy's extension: where the iptables mode writes: "auto" (as kubelet), "legacy", "nft".
    iptables_backend: str = "auto"
    port_range: str = ""  # userspace listeners: "begin-end", or "" for any port
    udp_idle_timeout: float = 0.25
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    # The node's IP when the Node object does not say (kube-proxy's bindAddress); "" for none.
    bind_address: str = ""
    kubeconfig: str = ""  # clientConnection.kubeconfig
    oom_score_adj: int | None = -999
    # kproxy's extension: externalIPs and ingress IPs must be in one of these; None allows all.
    allowed_external_ip_cidrs: tuple[str, ...] | None = None
    conntrack: ConntrackConfig = field(default_factory=lambda: ConntrackConfig())
    # The gates kproxy knows that the config names, (name, enabled), sorted.
    feature_gates: tuple[tuple[str, bool], ...] = ()

    def feature_enabled(self, gate: str) -> bool:
        """A feature gate's value: the config's, else its default."""
        return dict(self.feature_gates).get(gate, FEATURE_GATES[gate])

    @property
    def masquerade_mark(self) -> str:
        """The mark/mask pair as the kernel reports it, e.g. `0x4000/0x4000`."""
        return f"{1 << self.masquerade_bit:#x}/{1 << self.masquerade_bit:#x}"

    @property
    def masquerade_value(self) -> str:
        return f"{1 << self.masquerade_bit:#x}"


def _sections(doc: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    found: dict[str, Mapping[str, Any]] = {}
    for name in SECTIONS:
        section = doc.get(name) or {}
        if not isinstance(section, Mapping):
            raise ConfigError("expected a mapping", name)
        found[name] = section
    return found


def _ignored(doc: Mapping[str, Any], sections: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every field of the document kproxy does not read, as a dotted path."""
    ignored = [str(key) for key in doc if key not in known_names(None)]
    gates = doc.get("featureGates")
    if isinstance(gates, Mapping):
        ignored.extend(f"featureGates.{name}" for name in gates if name not in FEATURE_GATES)
    for name, section in sections.items():
        known = known_names(name)
        ignored.extend(f"{name}.{key}" for key in section if key not in known)
    return sorted(ignored)


def _check_detect_local(values: Mapping[str, Any]) -> None:
    mode = values.get("detect_local_mode")
    for needs, attr, path in (
        ("BridgeInterface", "bridge_interface", "detectLocal.bridgeInterface"),
        ("InterfaceNamePrefix", "interface_name_prefix", "detectLocal.interfaceNamePrefix"),
    ):
        if mode == needs and not values.get(attr):
            raise ConfigError(f"required by {needs}", path)


def _mode(doc: Mapping[str, Any]) -> str:
    """The document's mode: the other mode's section is then not read (as upstream)."""
    f = BY_PATH["mode"]
    value = doc.get("mode")
    return "iptables" if f.keeps_default(value) else str(f.parse(value, f.path))


def parse_config(doc: Mapping[str, Any]) -> tuple[ProxyConfig, list[str]]:
    """Read a KubeProxyConfiguration document. Returns the config and the paths of every field
    kproxy does not act on. Raises ConfigError (naming the field) for a value it cannot accept."""
    if not isinstance(doc, Mapping):
        raise ConfigError("expected a KubeProxyConfiguration mapping")
    sections = _sections(doc)
    mode = _mode(doc)
    values: dict[str, Any] = {}
    for f in FIELDS:
        section, _, name = f.path.rpartition(".")
        holder = sections[section] if section else doc
        if name not in holder or f.keeps_default(holder[name]) or mode not in f.modes:
            continue
        value = f.parse(holder[name], f.path)
        if f.attr is not None:
            values[f.attr] = value
    _check_detect_local(values)
    conntrack = {attr.split(".", 1)[1]: values.pop(attr) for attr in list(values) if "." in attr}
    return ProxyConfig(**values, conntrack=ConntrackConfig(**conntrack)), _ignored(doc, sections)


def with_flags(doc: Mapping[str, Any], flags: Mapping[str, Any]) -> tuple[ProxyConfig, list[str]]:
    """Parse a KubeProxyConfiguration with command-line flags (kube-proxy's names) laid over it:
    a flag given on the command line wins over the file. Errors name the flag."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in doc.items()}
    by_path: dict[str, str] = {}
    mode_flag = BY_PATH["mode"].flag or ""
    mode = str(flags.get(mode_flag) or doc.get("mode") or DEFAULT_MODE)  # parse_config checks it
    for flag, value in flags.items():
        f = BY_FLAG[flag]
        *parents, leaf = f.flag_path(mode).split(".")
        target = merged
        for parent in parents:
            target = target.setdefault(parent, {})
        given, before = f.flag_value(value), target.get(leaf)
        if isinstance(given, Mapping) and isinstance(before, Mapping):
            given = {**before, **given}  # --feature-gates adds to the file's, as upstream's
        target[leaf] = given
        by_path[f.flag_path(mode)] = flag
    try:
        return parse_config(merged)
    except ConfigError as exc:
        flag_path = (exc.field or "").split("[")[0]  # nodePortAddresses[1] came from the flag
        if flag_path in by_path:
            raise ConfigError(exc.problem, exc.field, where=by_path[flag_path]) from exc
        raise

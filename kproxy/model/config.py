"""kproxy's configuration: the iptables-mode subset of kube-proxy's KubeProxyConfiguration."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kproxy.errors import ConfigError

API_VERSION = "kubeproxy.config.k8s.io/v1alpha1"
KIND = "KubeProxyConfiguration"


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
    sync_period: float = 30.0
    min_sync_period: float = 1.0
    localhost_nodeports: bool = True
    # CIDRs and the keyword `primary`; empty means every local address.
    node_port_addresses: tuple[str, ...] = ()
    healthz_bind_address: str = "0.0.0.0:10256"
    metrics_bind_address: str = "127.0.0.1:10249"
    detect_local_mode: str = "ClusterCIDR"
    bridge_interface: str = ""
    interface_name_prefix: str = ""
    # The node's IP when the Node object does not say (kube-proxy's bindAddress); "" for none.
    bind_address: str = ""
    kubeconfig: str = ""  # clientConnection.kubeconfig
    oom_score_adj: int | None = -999
    conntrack: ConntrackConfig = field(default_factory=lambda: ConntrackConfig())

    @property
    def masquerade_mark(self) -> str:
        """The mark/mask pair as the kernel reports it, e.g. `0x4000/0x4000`."""
        return f"{1 << self.masquerade_bit:#x}/{1 << self.masquerade_bit:#x}"

    @property
    def masquerade_value(self) -> str:
        return f"{1 << self.masquerade_bit:#x}"


# Fields kproxy reads. Everything else in a KubeProxyConfiguration is reported as ignored.
_TOP_LEVEL = {
    "apiVersion",
    "kind",
    "clusterCIDR",
    "hostnameOverride",
    "mode",
    "iptables",
    "nodePortAddresses",
    "detectLocalMode",
    "detectLocal",
    "healthzBindAddress",
    "metricsBindAddress",
    "bindAddress",
    "conntrack",
    "clientConnection",
    "oomScoreAdj",
}
_CONNTRACK = {
    "maxPerCore": "max_per_core",
    "min": "min",
    "tcpEstablishedTimeout": "tcp_established_timeout",
    "tcpCloseWaitTimeout": "tcp_close_wait_timeout",
    "udpTimeout": "udp_timeout",
    "udpStreamTimeout": "udp_stream_timeout",
}
_IPTABLES = {"masqueradeAll", "masqueradeBit", "syncPeriod", "minSyncPeriod", "localhostNodePorts"}
DETECT_LOCAL_MODES = ("ClusterCIDR", "NodeCIDR", "BridgeInterface", "InterfaceNamePrefix")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: Any, field: str) -> float:
    """A Go duration string (`30s`, `1m0s`, `500ms`) in seconds."""
    text = str(value).strip()
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ConfigError(f"config field {field}: {value!r} is not a duration such as 30s or 1m0s")
    return total


def _parse_cidrs(value: Any, field: str) -> tuple[str, ...]:
    cidrs = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            cidrs.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError as exc:
            raise ConfigError(f"config field {field}: {part!r} is not a CIDR ({exc})") from exc
    return tuple(cidrs)


def _parse_bit(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 31:
        raise ConfigError(f"config field {field}: {value!r} must be an integer from 0 to 31")
    return value


def _parse_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config field {field}: {value!r} must be true or false")
    return value


def parse_config(doc: Mapping[str, Any]) -> tuple[ProxyConfig, list[str]]:
    """Read a KubeProxyConfiguration document. Returns the config and warnings naming every field
    kproxy does not act on. Raises ConfigError for a value it cannot accept."""
    if not isinstance(doc, Mapping):
        raise ConfigError("config: expected a KubeProxyConfiguration mapping")
    warnings: list[str] = []
    if doc.get("kind", KIND) != KIND:
        raise ConfigError(f"config field kind: {doc.get('kind')!r}, expected {KIND}")
    if doc.get("apiVersion", API_VERSION) != API_VERSION:
        raise ConfigError(
            f"config field apiVersion: {doc.get('apiVersion')!r}, expected {API_VERSION}"
        )
    mode = doc.get("mode") or "iptables"
    if mode != "iptables":
        raise ConfigError(
            f"config field mode: {mode!r} is not supported; kproxy implements iptables mode"
        )
    cfg = ProxyConfig()
    if doc.get("clusterCIDR"):
        cfg = replace(cfg, cluster_cidrs=_parse_cidrs(doc["clusterCIDR"], "clusterCIDR"))
    if doc.get("hostnameOverride"):
        cfg = replace(cfg, hostname_override=str(doc["hostnameOverride"]))
    ipt = doc.get("iptables") or {}
    if not isinstance(ipt, Mapping):
        raise ConfigError("config field iptables: expected a mapping")
    if ipt.get("masqueradeAll") is not None:
        cfg = replace(
            cfg, masquerade_all=_parse_bool(ipt["masqueradeAll"], "iptables.masqueradeAll")
        )
    if ipt.get("masqueradeBit") is not None:
        cfg = replace(
            cfg, masquerade_bit=_parse_bit(ipt["masqueradeBit"], "iptables.masqueradeBit")
        )
    if ipt.get("syncPeriod"):
        # 0s is what kubeadm writes for "unset"; upstream's defaulting makes it 30s.
        period = parse_duration(ipt["syncPeriod"], "iptables.syncPeriod")
        cfg = replace(cfg, sync_period=period or cfg.sync_period)
    if ipt.get("minSyncPeriod"):
        cfg = replace(
            cfg, min_sync_period=parse_duration(ipt["minSyncPeriod"], "iptables.minSyncPeriod")
        )
    if ipt.get("localhostNodePorts") is not None:
        cfg = replace(
            cfg,
            localhost_nodeports=_parse_bool(
                ipt["localhostNodePorts"], "iptables.localhostNodePorts"
            ),
        )
    if doc.get("nodePortAddresses"):
        cfg = replace(cfg, node_port_addresses=_parse_node_port_addresses(doc["nodePortAddresses"]))
    cfg = _parse_detect_local(doc, cfg)
    if doc.get("healthzBindAddress"):
        healthz = str(doc["healthzBindAddress"])
        parse_bind_address(healthz, "healthzBindAddress")
        cfg = replace(cfg, healthz_bind_address=healthz)
    if doc.get("metricsBindAddress"):
        metrics = str(doc["metricsBindAddress"])
        parse_bind_address(metrics, "metricsBindAddress")
        cfg = replace(cfg, metrics_bind_address=metrics)
    cfg = _parse_node_facts(doc, cfg)
    conntrack = doc.get("conntrack") or {}
    if not isinstance(conntrack, Mapping):
        raise ConfigError("config field conntrack: expected a mapping")
    cfg = replace(cfg, conntrack=_parse_conntrack(conntrack))
    client = doc.get("clientConnection") or {}
    if not isinstance(client, Mapping):
        raise ConfigError("config field clientConnection: expected a mapping")
    if client.get("kubeconfig"):
        cfg = replace(cfg, kubeconfig=str(client["kubeconfig"]))
    warnings.extend(f"conntrack.{key}" for key in sorted(set(conntrack) - set(_CONNTRACK)))
    warnings.extend(f"clientConnection.{key}" for key in sorted(set(client) - {"kubeconfig"}))
    warnings.extend(f"{key}" for key in sorted(set(doc) - _TOP_LEVEL))
    warnings.extend(f"iptables.{key}" for key in sorted(set(ipt) - _IPTABLES))
    return cfg, warnings


def _parse_node_port_addresses(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError("config field nodePortAddresses: expected a list of CIDRs or 'primary'")
    result = []
    for i, item in enumerate(value):
        if item == "primary":
            result.append("primary")
        else:
            result.extend(_parse_cidrs(item, f"nodePortAddresses[{i}]"))
    return tuple(result)


def _parse_detect_local(doc: Mapping[str, Any], cfg: ProxyConfig) -> ProxyConfig:
    mode = doc.get("detectLocalMode") or "ClusterCIDR"
    if mode not in DETECT_LOCAL_MODES:
        raise ConfigError(
            f"config field detectLocalMode: {mode!r} is not one of {', '.join(DETECT_LOCAL_MODES)}"
        )
    detect = doc.get("detectLocal") or {}
    if not isinstance(detect, Mapping):
        raise ConfigError("config field detectLocal: expected a mapping")
    bridge = str(detect.get("bridgeInterface") or "")
    prefix = str(detect.get("interfaceNamePrefix") or "")
    if mode == "BridgeInterface" and not bridge:
        raise ConfigError("config field detectLocal.bridgeInterface: required by BridgeInterface")
    if mode == "InterfaceNamePrefix" and not prefix:
        raise ConfigError(
            "config field detectLocal.interfaceNamePrefix: required by InterfaceNamePrefix"
        )
    return replace(
        cfg, detect_local_mode=mode, bridge_interface=bridge, interface_name_prefix=prefix
    )


def parse_bind_address(value: str, field: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port`, or `:port` for all addresses) as (host, port)."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 <= number <= 65535:
        raise ConfigError(f"config field {field}: {value!r} is not an address:port")
    return host, number


def _parse_node_facts(doc: Mapping[str, Any], cfg: ProxyConfig) -> ProxyConfig:
    bind = str(doc.get("bindAddress") or "")
    if bind:
        try:
            address = ipaddress.ip_address(bind)
        except ValueError:
            raise ConfigError(f"config field bindAddress: {bind!r} is not an IP address") from None
        cfg = replace(cfg, bind_address="" if address.is_unspecified else str(address))
    if "oomScoreAdj" in doc:
        value = doc["oomScoreAdj"]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not -1000 <= value <= 1000
        ):
            raise ConfigError(f"config field oomScoreAdj: {value!r} must be -1000..1000")
        cfg = replace(cfg, oom_score_adj=value)
    return cfg


def _parse_conntrack(doc: Mapping[str, Any]) -> ConntrackConfig:
    conntrack = ConntrackConfig()
    for key, attr in _CONNTRACK.items():
        if key not in doc:
            continue
        value = doc[key]
        field_name = f"conntrack.{key}"
        if value is None:
            continue  # null is "unset": kube-proxy's default applies
        parsed: float | int | None
        if attr in ("max_per_core", "min"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"config field {field_name}: {value!r} must be an integer >= 0")
            parsed = value or None  # 0 leaves the kernel's value, as upstream
        else:
            parsed = parse_duration(value, field_name) or None
        conntrack = replace(conntrack, **{attr: parsed})  # type: ignore[arg-type]
    return conntrack


# kube-proxy's command-line flags and the KubeProxyConfiguration field each sets.
FLAG_FIELDS = {
    "--cluster-cidr": ("clusterCIDR",),
    "--hostname-override": ("hostnameOverride",),
    "--masquerade-all": ("iptables", "masqueradeAll"),
    "--iptables-sync-period": ("iptables", "syncPeriod"),
    "--iptables-min-sync-period": ("iptables", "minSyncPeriod"),
    "--iptables-masquerade-bit": ("iptables", "masqueradeBit"),
    "--iptables-localhost-nodeports": ("iptables", "localhostNodePorts"),
    "--nodeport-addresses": ("nodePortAddresses",),
    "--healthz-bind-address": ("healthzBindAddress",),
    "--metrics-bind-address": ("metricsBindAddress",),
    "--bind-address": ("bindAddress",),
    "--detect-local-mode": ("detectLocalMode",),
    "--proxy-mode": ("mode",),
    "--oom-score-adj": ("oomScoreAdj",),
}


def with_flags(doc: Mapping[str, Any], flags: Mapping[str, Any]) -> tuple[ProxyConfig, list[str]]:
    """Parse a KubeProxyConfiguration with command-line flags (kube-proxy's names) laid over it:
    a flag given on the command line wins over the file. Errors name the flag."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in doc.items()}
    for flag, value in flags.items():
        *parents, leaf = FLAG_FIELDS[flag]
        target = merged
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    try:
        return parse_config(merged)
    except ConfigError as exc:
        for flag in flags:
            if f"config field {'.'.join(FLAG_FIELDS[flag])}:" in str(exc):
                raise ConfigError(f"{flag}: {str(exc).split(': ', 1)[1]}") from exc
        raise

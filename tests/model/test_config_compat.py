"""docs/configuration.md's compatibility table: every field of upstream's v1alpha1
KubeProxyConfiguration (and kproxy's own) has a row, and each mode's cell says what
kproxy.model.config_fields.FIELDS does with it; a field kproxy does not read is warned about."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kproxy.model.config import parse_config
from kproxy.model.config_fields import FIELDS

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
MODES = ("iptables", "nftables", "userspace")
# staging/src/k8s.io/kube-proxy/config/v1alpha1/types.go (1.34), leaves of every struct.
UPSTREAM_FIELDS = [
    "apiVersion",
    "kind",
    "featureGates",
    "clientConnection.kubeconfig",
    "clientConnection.acceptContentTypes",
    "clientConnection.contentType",
    "clientConnection.qps",
    "clientConnection.burst",
    "logging.format",
    "logging.flushFrequency",
    "logging.verbosity",
    "logging.vmodule",
    "logging.options",
    "hostnameOverride",
    "bindAddress",
    "healthzBindAddress",
    "metricsBindAddress",
    "bindAddressHardFail",
    "enableProfiling",
    "showHiddenMetricsForVersion",
    "serviceProxyName",
    "mode",
    "iptables.masqueradeBit",
    "iptables.masqueradeAll",
    "iptables.localhostNodePorts",
    "iptables.syncPeriod",
    "iptables.minSyncPeriod",
    "ipvs.syncPeriod",
    "ipvs.minSyncPeriod",
    "ipvs.scheduler",
    "ipvs.excludeCIDRs",
    "ipvs.strictARP",
    "ipvs.tcpTimeout",
    "ipvs.tcpFinTimeout",
    "ipvs.udpTimeout",
    "nftables.masqueradeBit",
    "nftables.masqueradeAll",
    "nftables.syncPeriod",
    "nftables.minSyncPeriod",
    "nftables.tableName",
    "winkernel.networkName",
    "winkernel.sourceVip",
    "winkernel.enableDSR",
    "winkernel.rootHnsEndpointName",
    "winkernel.forwardHealthCheckVip",
    "detectLocalMode",
    "detectLocal.bridgeInterface",
    "detectLocal.interfaceNamePrefix",
    "clusterCIDR",
    "nodePortAddresses",
    "oomScoreAdj",
    "conntrack.maxPerCore",
    "conntrack.min",
    "conntrack.tcpEstablishedTimeout",
    "conntrack.tcpCloseWaitTimeout",
    "conntrack.tcpBeLiberal",
    "conntrack.udpTimeout",
    "conntrack.udpStreamTimeout",
    "configSyncPeriod",
    "portRange",
]
READ = {"honoured", "no effect", "hand-over"}


def _rows() -> dict[str, dict[str, str]]:
    text = DOC.read_text()
    begin = text.index("<!-- compatibility table")
    end = text.index("<!-- end of compatibility table -->")
    rows: dict[str, dict[str, str]] = {}
    for line in text[begin:end].splitlines()[3:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(MODES, cells[1:4], strict=True))
    return rows


def test_every_upstream_field_and_every_field_kproxy_reads_has_one_row() -> None:
    rows = _rows()
    expected = set(UPSTREAM_FIELDS) | {f.path for f in FIELDS}
    assert set(rows) == expected


@pytest.mark.parametrize("mode", MODES)
def test_each_cell_says_what_kproxy_does_in_that_mode(mode: str) -> None:
    fields = {f.path: f for f in FIELDS}
    for name, cells in _rows().items():
        field = fields.get(name)
        read = field is not None and mode in field.modes
        assert (cells[mode] in READ) == read, (name, mode, cells[mode])
        assert cells[mode] in (READ if read else {"ignored"}), (name, mode, cells[mode])


def _document(path: str) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    *sections, leaf = path.split(".")
    into = doc
    for section in sections:
        into = into.setdefault(section, {})
    into[leaf] = {"A": True} if leaf == "featureGates" else "x"
    return doc


def test_a_field_kproxy_does_not_read_is_named_in_a_warning() -> None:
    fields = {f.path for f in FIELDS}
    for name in UPSTREAM_FIELDS:
        if name in fields:
            continue
        _, ignored = parse_config(_document(name))
        section = name.split(".")[0]
        assert name in ignored or section in ignored, (name, ignored)

import re
import weakref
from pathlib import Path
from typing import Any, cast

from kproxy.dataplane.iptables.node import IptablesNode
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.model.config import ProxyConfig
from kproxy.model.node import NodeInfo
from kproxy.sync.modes import MODES
from kproxy.sync.once import once_loop, sync_once
from kproxy.watch.manifests import load_manifests, state_from_manifests

ONE_SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
- addresses: [10.244.1.6]
  conditions: {ready: false}
"""


def _sync(tmp_path: Path, dataplane: FakeDataplane) -> str:
    path = tmp_path / "m.yaml"
    path.write_text(ONE_SERVICE)
    state = state_from_manifests(load_manifests(path), lambda exc: None)
    node = IptablesNode({4: dataplane}, write_sysctls=lambda sysctls: None)
    report = sync_once(
        once_loop(state, NodeInfo(name="node-1"), ProxyConfig(), MODES["iptables"], node)
    )
    text = report.summary()
    assert text.endswith(f"in {report.seconds:.2f}s")  # the time its sync_completed log gives
    assert report.summary(report.seconds + 1.0).endswith(
        f"in {report.seconds:.2f}s ({report.seconds + 1.0:.2f}s with start-up)"
    )
    return text


def test_summary_counts_ready_endpoints_in_the_singular_and_names_the_not_ready(
    tmp_path: Path,
) -> None:
    dataplane = FakeDataplane()
    first = _sync(tmp_path, dataplane)
    assert first.startswith(
        "synced 1 service (1 port), 1 ready endpoint (1 address), 1 not ready: wrote "
    ), first
    second = _sync(tmp_path, dataplane)
    assert re.match(r"synced 1 service .*: no changes, \d+ chains already up to date", second)


def test_state_from_manifests_lets_go_of_the_documents(tmp_path: Path) -> None:
    """The documents outweigh the state built from them; nothing reads them after, so they must
    not stay alive through the sync (bench/memory_profile.py: 86 MB at 10,000 services)."""
    path = tmp_path / "m.yaml"
    path.write_text(ONE_SERVICE)
    manifests = load_manifests(path)
    state = state_from_manifests(manifests, lambda exc: None)
    assert state.service_keys()
    assert manifests.services == [] and manifests.endpoint_slices == []


class _WatchedApply:
    """The dataplane, with what is still alive of the sync's inputs noted as it applies."""

    def __init__(self, dataplane: IptablesNode, watched: dict[str, weakref.ref[Any]]) -> None:
        self._dataplane = dataplane
        self._watched = watched
        self.alive_at_apply: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dataplane, name)

    def apply(self, plan: Any, full: bool = True) -> Any:
        self.alive_at_apply = {name for name, ref in self._watched.items() if ref() is not None}
        return self._dataplane.apply(plan, full)


def test_sync_once_lets_go_of_its_inputs_before_the_apply(tmp_path: Path) -> None:
    """The apply's table blob is sync --once's peak: the state, the snapshot's maps and the
    planner's caches (44 MB at 10,000 services x 5 endpoints) must be gone by then, and the
    summary still counts what was synced."""
    path = tmp_path / "m.yaml"
    path.write_text(ONE_SERVICE)
    state = state_from_manifests(load_manifests(path), lambda exc: None)
    node = IptablesNode({4: FakeDataplane()}, write_sysctls=lambda sysctls: None)
    watched: dict[str, weakref.ref[Any]] = {"state": weakref.ref(state)}
    dataplane = _WatchedApply(node, watched)
    loop = once_loop(
        state, NodeInfo(name="node-1"), ProxyConfig(), MODES["iptables"], cast(Any, dataplane)
    )
    watched["planner"] = weakref.ref(loop.planner)
    del state
    report = sync_once(loop)
    assert dataplane.alive_at_apply == set()
    assert report.summary().startswith(
        "synced 1 service (1 port), 1 ready endpoint (1 address), 1 not ready: wrote "
    )

"""Issue 9: valid Services, EndpointSlices and Nodes with any field (at any path) replaced by an
arbitrary JSON value, or a string with control characters and surrogates spliced in.

The converter must raise nothing but InvalidObjectError (with a printable message), and planning
and rendering whatever survives must give iptables-save text that parse_save reads back
identically, with nothing unparsed and no sync left to do. Examples are derandomized (a fixed seed
per test) and run without a kernel; 10,000 in all.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.errors import InvalidObjectError
from kproxy.model.config import ProxyConfig
from kproxy.model.convert import build_endpoint_slice, build_node, build_service_ports
from kproxy.model.node import NodeInfo
from kproxy.plan.iptables.planner import IptablesPlanner
from kproxy.rules.ir import BUILTIN_CHAINS
from kproxy.rules.render import render_rule, render_ruleset
from kproxy.rules.saved import parse_save
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import update_endpoint_slice, update_service

Obj = dict[str, Any]
Path = tuple[str | int, ...]

SERVICE: Obj = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {
        "type": "LoadBalancer",
        "clusterIP": "10.96.0.10",
        "clusterIPs": ["10.96.0.10", "fd00:96::10"],
        "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080},
            {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
        ],
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}},
        "externalIPs": ["192.0.2.10", "2001:db8::10"],
        "externalTrafficPolicy": "Local",
        "internalTrafficPolicy": "Cluster",
        "healthCheckNodePort": 30999,
        "loadBalancerSourceRanges": ["203.0.113.0/24", "2001:db8:1::/48"],
    },
    "status": {
        "loadBalancer": {
            "ingress": [
                {"ip": "198.51.100.7", "ipMode": "VIP"},
                {"ip": "2001:db8::7", "ipMode": "VIP"},
                {"hostname": "lb.example"},
            ]
        }
    },
}
SLICE: Obj = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "web-abc12",
        "namespace": "shop",
        "labels": {"kubernetes.io/service-name": "web"},
        "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2024-01-01T00:00:00Z"},
    },
    "addressType": "IPv4",
    "ports": [
        {"name": "http", "port": 8080, "protocol": "TCP"},
        {"name": "dns", "port": 5353, "protocol": "UDP"},
    ],
    "endpoints": [
        {
            "addresses": ["10.244.1.5"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": "node-a",
            "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]},
        },
        {
            "addresses": ["10.244.2.6"],
            "conditions": {"ready": False, "serving": True, "terminating": True},
            "nodeName": "node-b",
        },
    ],
}
SLICE6: Obj = {
    **copy.deepcopy(SLICE),
    "metadata": {
        "name": "web-v6",
        "namespace": "shop",
        "labels": {"kubernetes.io/service-name": "web"},
    },
    "addressType": "IPv6",
    "endpoints": [{"addresses": ["fd00:244::5"], "nodeName": "node-a"}],
}
NODE_OBJ: Obj = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
    "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"], "taints": [{"key": "x"}]},
    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]},
}
NODE = NodeInfo("node-a", labels={"topology.kubernetes.io/zone": "z1"})
CONFIG = ProxyConfig(cluster_cidrs=("10.244.0.0/16", "fd00:244::/48"))


def _paths(value: Any, prefix: Path = ()) -> Iterator[Path]:
    """Every field path in `value`, containers included."""
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


DELETE = object()
# Strings the API server would refuse, or once broke kproxy (issue 9).
NASTY = [
    "zone-a",
    ["zone-a"],
    "true",
    "false",
    0,
    1,
    "None",
    "",
    "Local",
    "Sometimes",
    "ClientIP",
    "fe80::1%lo",
    "::ffff:10.0.0.1",
    "::10.0.0.1",
    "127.0.0.1",
    "0.0.0.0",
    "169.254.169.254",
    "ff02::1",
    "10.0.0.0/255.0.0.0",
    " 203.0.113.0/25",
    "010.096.000.010",
    "239.1.2.3",
    "a\nb",
    "a\rb",
    "web\x00",
    "\udc80",
    "web\u2028",
    "http",
    "Web",
    "-web",
    "x" * 64,
]
SPLICED = st.sampled_from(
    [
        *("\n", "\r", "\x0b", "\x0c", "\x85", "\u2028", "\u2029", "\x00", "\udcff", "\ud800"),
        *('"', "\\", " ", "'", "%lo", "é", "A", "-", ".", "/", ":"),
    ]
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(st.characters(exclude_categories=()), max_size=12)
    | st.sampled_from(NASTY)
)
JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _get(obj: Any, path: Path) -> Any:
    for key in path:
        obj = obj[key]
    return obj


@st.composite
def mutated(draw: st.DrawFn, seed: Obj) -> Obj:
    """A deep copy of `seed` with one to three fields replaced, deleted or spliced into."""
    obj = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(obj))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _get(obj, path[:-1]), path[-1]
        old = parent[key]
        how = draw(
            st.sampled_from(
                ["replace", "delete", "splice"] if isinstance(old, str) else ["replace", "delete"]
            )
        )
        if how == "delete":
            del parent[key]
        elif how == "splice":
            at = draw(st.integers(0, len(old)))
            parent[key] = old[:at] + draw(SPLICED) + old[at:]
        else:
            parent[key] = copy.deepcopy(draw(JSON))  # NASTY's list must stay as it is
    return obj


def _convert(build: Any, obj: Obj) -> Any:
    """The converter's result, or None when it refused the object (the only error it may raise)."""
    try:
        return build(obj)
    except InvalidObjectError as exc:
        text = str(exc)
        assert text.isprintable() and text.isascii(), text  # safe to log anywhere
        return None


_CHECKED: set[object] = set()
_render = functools.lru_cache(maxsize=1 << 16)(render_rule)


def _check_plan(state: ClusterState, node: NodeInfo) -> None:
    """Both families plan, render only printable text, and read back identically: nothing
    unparsed, the built-in chains' jumps in place and no change left to make. A state checked
    before (most mutations leave the same model values) is not checked again."""
    services, endpoints = state.services_map(), state.endpoints_map()
    key = (frozenset(services.items()), frozenset(endpoints.items()), node)
    if key in _CHECKED:
        return
    plan = IptablesPlanner(CONFIG).plan(services, endpoints, node, (4, 6))
    for family in (4, 6):
        ruleset = plan.kernel[family]
        text = render_ruleset(ruleset)
        assert all(line.isprintable() for line in text.split("\n")), text
        saved = parse_save(text)
        for table in ruleset.tables:
            got = saved[table.name]
            assert got.unparsed == []
            # What plan_table_changes compares, with rendering cached across examples.
            for chain in table.chains:
                assert got.chains[chain.name] == [_render(chain.name, r) for r in chain.rules]
            builtins = BUILTIN_CHAINS.get(table.name, ())
            for builtin in builtins:
                jumps = [j for j in reversed(table.jumps) if j.chain == builtin]
                assert got.chains.get(builtin, []) == [_render(j.chain, j.rule) for j in jumps]
            assert set(got.chains) - set(builtins) == {c.name for c in table.chains}
            comments = (r.comment or "" for c in table.chains for r in c.rules)
            assert all(len(c.encode()) <= 255 for c in comments)  # the kernel's limit
    _CHECKED.add(key)


def _state(services: list[Obj], slices: list[Obj]) -> ClusterState:
    state = ClusterState()
    for obj in services:
        with contextlib.suppress(InvalidObjectError):
            update_service(state, obj)
    for obj in slices:
        try:
            for skipped in update_endpoint_slice(state, obj):
                assert str(skipped).isprintable()
        except InvalidObjectError:
            pass
    return state


FUZZ = settings(
    max_examples=4000,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@FUZZ
@given(mutated(SERVICE))
def test_any_mutated_service(obj: Obj) -> None:
    _convert(build_service_ports, obj)
    _check_plan(_state([obj], [SLICE, SLICE6]), NODE)


@FUZZ
@given(st.sampled_from([SLICE, SLICE6]).flatmap(mutated))
def test_any_mutated_endpoint_slice(obj: Obj) -> None:
    _convert(build_endpoint_slice, obj)
    _check_plan(_state([SERVICE], [obj]), NODE)


@settings(FUZZ, max_examples=2000)
@given(mutated(NODE_OBJ))
def test_any_mutated_node(obj: Obj) -> None:
    node = _convert(build_node, obj)
    _check_plan(_state([SERVICE], [SLICE, SLICE6]), node or NODE)


def test_the_seeds_are_valid_and_programmed() -> None:
    state = _state([SERVICE], [SLICE, SLICE6])
    assert len(state.services_map()) == 2
    assert sum(len(eps) for eps in state.endpoints_map().values()) == 6
    assert build_node(NODE_OBJ).pod_cidrs == ("10.244.1.0/24",)

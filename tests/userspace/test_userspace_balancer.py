"""The userspace mode's endpoint choice and proxy port allocator (no sockets)."""

from __future__ import annotations

import random

import pytest

from kproxy.dataplane.relay.balancer import LoadBalancerRR, NoEndpointsError
from kproxy.dataplane.relay.ports import PortAllocator, PortsExhaustedError, parse_port_range
from kproxy.errors import ConfigError

A, B, C = ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_cycles_through_every_endpoint_in_order() -> None:
    lb = LoadBalancerRR(random.Random(1))
    lb.set_endpoints([A, B, C])
    order = lb.endpoints
    picks = [lb.next_endpoint("192.0.2.1") for _ in range(6)]
    assert picks == order + order
    assert sorted(order) == [A, B, C]


def test_a_changed_set_is_reshuffled_and_an_unchanged_one_keeps_its_position() -> None:
    lb = LoadBalancerRR(random.Random(7))
    lb.set_endpoints([A, B, C])
    first = lb.next_endpoint("c")
    assert lb.set_endpoints([C, B, A]) is False
    assert lb.next_endpoint("c") != first  # the rotation went on
    orders = set()
    for seed in range(20):
        other = LoadBalancerRR(random.Random(seed))
        other.set_endpoints([A, B, C])
        orders.add(tuple(other.endpoints))
    assert len(orders) > 1
    assert lb.set_endpoints([A, B]) is True
    assert sorted(lb.endpoints) == [A, B]


def test_the_same_seed_gives_the_same_order() -> None:
    one, two = LoadBalancerRR(random.Random(3)), LoadBalancerRR(random.Random(3))
    one.set_endpoints([A, B, C])
    two.set_endpoints([C, A, B])
    assert one.endpoints == two.endpoints


def test_no_endpoints_is_an_error() -> None:
    lb = LoadBalancerRR()
    with pytest.raises(NoEndpointsError):
        lb.next_endpoint("c")
    lb.set_endpoints([A])
    lb.set_endpoints([])
    with pytest.raises(NoEndpointsError):
        lb.next_endpoint("c")


def test_client_ip_affinity_sticks_until_the_ttl_then_moves_on() -> None:
    clock = FakeClock()
    lb = LoadBalancerRR(random.Random(1), clock)
    lb.set_endpoints([A, B, C], affinity_seconds=10)
    first = lb.next_endpoint("192.0.2.1")
    clock.now += 9.9
    assert all(lb.next_endpoint("192.0.2.1") == first for _ in range(5))
    assert lb.next_endpoint("192.0.2.2") != first  # another client goes round robin
    clock.now += 10.0
    assert lb.next_endpoint("192.0.2.1") != first


def test_reset_bypasses_affinity_and_moves_the_record() -> None:
    lb = LoadBalancerRR(random.Random(1), FakeClock())
    lb.set_endpoints([A, B], affinity_seconds=100)
    first = lb.next_endpoint("c")
    moved = lb.next_endpoint("c", reset=True)
    assert moved != first
    assert lb.next_endpoint("c") == moved


def test_affinity_to_a_removed_endpoint_is_dropped_and_sweep_expires_records() -> None:
    clock = FakeClock()
    lb = LoadBalancerRR(random.Random(1), clock)
    lb.set_endpoints([A, B], affinity_seconds=10)
    first = lb.next_endpoint("c")
    lb.set_endpoints([e for e in (A, B, C) if e != first], affinity_seconds=10)
    assert lb.next_endpoint("c") != first
    clock.now += 11
    assert lb.sweep_affinity() == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", None),
        ("0", None),
        ("0-0", None),
        ("30000-30100", (30000, 30100)),
        ("30000+100", (30000, 30100)),
        ("31000", (31000, 31000)),
    ],
)
def test_port_range_formats(text: str, expected: tuple[int, int] | None) -> None:
    assert parse_port_range(text) == expected


@pytest.mark.parametrize("text", ["abc", "20-10", "0-70000", "1-x"])
def test_bad_port_ranges_name_the_field(text: str) -> None:
    with pytest.raises(ConfigError, match="portRange"):
        parse_port_range(text)


def test_allocator_hands_out_each_port_once_then_refuses_and_reuses_released() -> None:
    ports = PortAllocator("40000-40004", random.Random(5))
    got = {ports.allocate() for _ in range(5)}
    assert got == set(range(40000, 40005))
    with pytest.raises(PortsExhaustedError):
        ports.allocate()
    ports.release(40002)
    assert ports.allocate() == 40002


def test_allocator_without_a_range_lets_the_kernel_pick() -> None:
    ports = PortAllocator("")
    assert ports.allocate() == 0
    ports.release(0)

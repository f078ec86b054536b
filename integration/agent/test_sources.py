"""Sources never die silently (issue 9): `kproxy run --manifests DIR` in a node namespace keeps
following file edits after a manifest that once killed its watcher, and `/livez` fails while the
manifests cannot be read at all (so the kubelet would restart the agent), then recovers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from integration.agent_harness import (
    HEALTHZ_PORT,
    Agent,
    AgentNode,
    agent_node,
    slice_object,
    summarize,
    wait_for_nat,
    wait_until,
)
from integration.manifests import service_manifest
from integration.netns import Pod

VIP = "10.96.0.10"
PORT = 80
TARGET = 8080
CHANGE_BOUND = 10.0  # generous upper bound on a file edit reaching traffic (syncPeriod is 2 s)
STALE_BOUND = 15.0  # the health timeout is 2 x syncPeriod = 4 s; polls back off up to 10 s


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AgentNode]:
    with agent_node("srcs", tmp_path, with_api=False) as built:
        yield built


def write(path: Path, *docs: dict[str, Any]) -> None:
    """Through a temporary name and a rename, as a ConfigMap volume or an editor updates it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.rename(path)


def web(path: Path, pod_ip: str) -> None:
    write(path, service_manifest("web", VIP, PORT, TARGET), slice_object("web", [pod_ip], TARGET))


def livez(node: AgentNode) -> tuple[int, dict[str, Any]]:
    status, body = node.http_get(HEALTHZ_PORT, "/livez")
    return status, json.loads(body)


def web_agent(node: AgentNode, tmp_path: Path) -> tuple[Pod, Pod, Path, Agent]:
    """Two backends and a client; `kproxy run --manifests DIR` serving web from web-a. Returns
    web-b (for the edit), the client, the manifest directory and the agent."""
    a = node.backend("web-a", "192.168.1.10", TARGET)
    b = node.backend("web-b", "192.168.2.10", TARGET)
    client = node.client("client", "192.168.9.9")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    web(manifests / "web.yaml", a.ip)
    agent = node.start_agent("--manifests", str(manifests))
    assert wait_for_nat(node, f"--to-destination {a.ip}:{TARGET}")
    return b, client, manifests, agent


def test_watcher_survives_a_slice_that_crashed_it_and_later_edits_reach_traffic(
    node: AgentNode, tmp_path: Path
) -> None:
    b, client, manifests, agent = web_agent(node, tmp_path)

    # `conditions: "true"`: a string where a mapping belongs, which made the converter raise.
    crashing = slice_object("other", ["192.168.3.10"], TARGET)
    crashing["endpoints"][0]["conditions"] = "true"
    write(manifests / "other.yaml", service_manifest("other", "10.96.0.11", PORT, TARGET), crashing)
    time.sleep(3.0)  # a few polls: long enough for the old watcher to read it and die

    poller = node.poller(client, VIP, PORT, interval=0.02, timeout=0.5)
    assert poller.settled_on({"web-a"}, 0.0, streak=10, timeout=10) < float("inf")
    edited = time.monotonic()
    web(manifests / "web.yaml", b.ip)
    settled = poller.settled_on({"web-b"}, edited, streak=20, timeout=CHANGE_BOUND + 5)
    attempts = poller.stop()
    assert settled - edited < CHANGE_BOUND, (summarize(attempts), agent.log_tail())
    assert all(x.ok for x in attempts), summarize(attempts)
    assert node.probe(client, VIP, PORT, 20) == {"web-b": 20}
    assert livez(node)[0] == 200, agent.log_tail()
    # The bad slice cost only itself: its Service is programmed (without endpoints).
    assert wait_until(lambda: "default/other:p has no endpoints" in node.save(), 5.0)


def test_livez_fails_while_the_manifests_cannot_be_read_and_recovers(
    node: AgentNode, tmp_path: Path
) -> None:
    b, client, manifests, agent = web_agent(node, tmp_path)
    assert livez(node)[0] == 200

    # The directory goes away (an unmounted volume): every poll fails from now on.
    away = tmp_path / "away"
    manifests.rename(away)
    gone = time.monotonic()
    stale = wait_until(lambda: livez(node)[0] == 503, STALE_BOUND, interval=0.2)
    assert stale, agent.log_tail()
    print(f"\nmanifests gone -> /livez 503 after {time.monotonic() - gone:.1f} s")
    status, body = livez(node)
    assert status == 503 and body["healthy"] is False
    problems = body["sources"]["problems"]
    assert len(problems) == 1 and problems[0].startswith("source files: not current"), body
    assert "no such file or directory" in problems[0]
    assert node.http_get(HEALTHZ_PORT, "/healthz")[0] == 503
    assert agent.events("manifests_unreadable"), agent.log_tail()
    # The rules stay as they were meanwhile.
    assert node.probe(client, VIP, PORT, 10) == {"web-a": 10}

    away.rename(manifests)
    web(manifests / "web.yaml", b.ip)
    assert wait_for_nat(node, f"--to-destination {b.ip}:{TARGET}", timeout=STALE_BOUND)
    assert wait_until(lambda: livez(node)[0] == 200, STALE_BOUND, interval=0.2), agent.log_tail()
    assert node.probe(client, VIP, PORT, 10) == {"web-b": 10}
    assert agent.proc.poll() is None

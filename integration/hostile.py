"""Helpers for tests and benches that play a hostile neighbour: HTTP from any namespace, the
agent's thread count and RSS, and the flood client (flood.py) started off the node."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from integration.agent_harness import AgentNode
from integration.netns import NODE_IP, Namespace, read_line

FLOOD = Path(__file__).with_name("flood.py")


def get(node: AgentNode, ns: Namespace, host: str, port: int, path: str) -> tuple[int, Any]:
    """GET http://host:port/path from inside `ns`: status and JSON body (or text)."""

    def fetch() -> tuple[int, Any]:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            text = response.read().decode()
        finally:
            conn.close()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    return node.worker(ns).call(fetch, timeout=30)


def timed_get(node: AgentNode, ns: Namespace, host: str, port: int, path: str) -> tuple[int, float]:
    started = time.monotonic()
    status, _ = get(node, ns, host, port, path)
    return status, time.monotonic() - started


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def threads(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def start_flood(node: AgentNode, port: int, count: int) -> tuple[subprocess.Popen[str], str]:
    """The flood client (integration/flood.py) in the outside namespace, holding `count`
    half-sent requests to the node's `port`; returns it with its `connected N failed M`."""
    proc = node.topo.spawn(
        node.topo.outside, [sys.executable, str(FLOOD), NODE_IP, str(port), str(count)]
    )
    return proc, read_line(proc, timeout=90)

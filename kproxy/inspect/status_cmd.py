"""`kproxy status`: ask the running agent (GET /statusz on its metrics address) and print one
screen."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from kproxy.errors import KproxyError
from kproxy.inspect.inputs import load_config_file
from kproxy.model.config_values import parse_bind_address

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


class AgentUnreachableError(KproxyError):
    """No agent answered on the metrics address."""


def status_url(address: str) -> str:
    """`0.0.0.0:10249` -> http://127.0.0.1:10249/statusz (a wildcard is asked on loopback)."""
    host, port = parse_bind_address(address, "metricsBindAddress")
    host = _WILDCARDS.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/statusz"


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AgentUnreachableError(
            f"no kproxy agent answered at {url} ({reason}); is `kproxy run` running in this "
            "network namespace? Give its metrics address with --address or --config"
        ) from None
    if not isinstance(body, dict):
        raise AgentUnreachableError(f"{url} answered something other than kproxy's status")
    return body


def _seconds(value: object) -> str:
    return f"{value * 1000:.1f} ms" if isinstance(value, int | float) else "-"


def _last_sync(body: dict[str, Any]) -> list[str]:
    last = body.get("lastSync")
    if not last:
        return ["last sync:   none yet"]
    kind = "full" if last.get("full") else "partial"
    if last.get("changed"):
        what = (
            f"wrote {last.get('chainsWritten')} chains ({last.get('rulesWritten')} rules), "
            f"removed {last.get('chainsRemoved')}"
        )
    else:
        what = "no change to the tables"
    return [
        f"last sync:   {last.get('at')}, {kind}, {_seconds(last.get('seconds'))}, "
        f"{last.get('changedServices')} services changed: {what}"
    ]


def _sources(body: dict[str, Any]) -> list[str]:
    lines = ["sources:"]
    for s in body.get("sources") or []:
        state = s.get("problem") or "current"
        lines.append(
            f"  {s.get('name')}: {state}; last current {s.get('secondsSinceCurrent')} s ago, "
            f"{s.get('restarts')} reconnects, {s.get('failures')} failures"
            + (f", last error: {s['lastError']}" if s.get("lastError") else "")
        )
    return lines if len(lines) > 1 else ["sources:     none reported"]


def render_status(body: dict[str, Any]) -> str:
    syncs = body.get("syncs") or {}
    programmed = body.get("programmed") or {}
    rules = programmed.get("rules") or {}
    rule_text = ", ".join(f"{n} {table}" for table, n in sorted(rules.items())) or "-"
    lines = [
        f"mode:        {body.get('mode')} ({', '.join(body.get('families') or [])})"
        + (f", {backend} backend" if (backend := body.get("iptablesBackend")) else ""),
        f"healthy:     {'yes' if body.get('healthy') else 'NO (see /healthz)'}",
        f"started:     {body.get('startedAt')}",
        *_last_sync(body),
        f"syncs:       {syncs.get('count', 0)} ok, {syncs.get('failures', 0)} failed; "
        f"p50 {_seconds(syncs.get('p50Seconds'))}, p99 {_seconds(syncs.get('p99Seconds'))}",
        f"programmed:  {programmed.get('services', 0)} services "
        f"({programmed.get('servicePorts', 0)} ports), {programmed.get('endpoints', 0)} ready "
        f"endpoints, rules: {rule_text}",
    ]
    error = body.get("lastError")
    lines.append(
        f"last error:  {error.get('at')}: {error.get('error')}" if error else "last error:  none"
    )
    skipped = body.get("skipped") or []
    lines.append(f"skipped:     {len(skipped)} objects" + (":" if skipped else ""))
    lines += [f"  {s.get('object')}: {s.get('field')}: {s.get('problem')}" for s in skipped]
    lines += _sources(body)
    return "\n".join(lines) + "\n"


def show_status(address: str | None, output: str, config_path: str | None) -> str:
    """`kproxy status`: the agent's /statusz, asked at --address or the config's metrics address."""
    config = load_config_file(config_path)
    body = fetch_status(status_url(address or config.metrics_bind_address))
    return json.dumps(body, indent=2) + "\n" if output == "json" else render_status(body)

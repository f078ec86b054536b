"""Which x_tables backend the iptables mode writes: legacy (libiptc) or nft (iptables-nft).

As upstream's iptables-wrapper decides: kubelet (1.17 and later) leaves `KUBE-IPTABLES-HINT` or
`KUBE-KUBELET-CANARY` in the mangle table of the backend it uses; iptables-nft's are looked at
first (a read that creates nothing), then the legacy tables (read whole: `-t mangle` would create
that table). Without a hint, the backend holding more rules wins, and nft on a tie (the default of
every current distribution). `iptablesBackend: legacy|nft` skips the guess.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

BACKENDS = ("auto", "legacy", "nft")
HINT_CHAINS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
_HINT = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY) ", re.MULTILINE)
_RULE = re.compile(r"^-A ", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class BackendChoice:
    backend: str  # "legacy" or "nft"
    reason: str  # for the log line, `kproxy status` and `kproxy doctor`


def save_command(backend: str, family: int, restore: bool = False) -> str:
    """`iptables-nft-save`, `ip6tables-legacy-restore`, ..."""
    prefix = "iptables" if family == 4 else "ip6tables"
    return f"{prefix}-{backend}-{'restore' if restore else 'save'}"


def _save(backend: str, family: int, *args: str) -> str:
    """The command's output; "" when it is missing or fails (detection is best effort)."""
    try:
        proc = subprocess.run(
            [save_command(backend, family), *args],
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError:
        return ""
    return proc.stdout if proc.returncode == 0 else ""


@dataclass(frozen=True, slots=True)
class BackendFacts:
    """What each backend shows: kubelet's hint chains, and how many rules it holds."""

    nft_hints: frozenset[str]
    legacy_hints: frozenset[str]
    nft_rules: int
    legacy_rules: int


def read_backend_facts() -> BackendFacts:
    nft_mangle = _save("nft", 4, "-t", "mangle") + _save("nft", 6, "-t", "mangle")
    legacy = _save("legacy", 4) + _save("legacy", 6)
    nft_hints = frozenset(_HINT.findall(nft_mangle))
    legacy_hints = frozenset(_HINT.findall(legacy))
    nft_rules = legacy_rules = 0
    if not nft_hints and not legacy_hints:  # only then are the rules counted
        nft_rules = len(_RULE.findall(_save("nft", 4) + _save("nft", 6)))
        legacy_rules = len(_RULE.findall(legacy))
    return BackendFacts(nft_hints, legacy_hints, nft_rules, legacy_rules)


def decide_backend(configured: str, facts: BackendFacts | None) -> BackendChoice:
    """Pure: the backend for `configured` (auto|legacy|nft) given what the node shows."""
    if configured in ("legacy", "nft"):
        return BackendChoice(configured, f"iptablesBackend: {configured} in the config")
    assert facts is not None
    if facts.nft_hints:
        return BackendChoice("nft", f"kubelet's {', '.join(sorted(facts.nft_hints))} in nft mangle")
    if facts.legacy_hints:
        hints = ", ".join(sorted(facts.legacy_hints))
        return BackendChoice("legacy", f"kubelet's {hints} in legacy mangle")
    counts = f"{facts.legacy_rules} legacy rules, {facts.nft_rules} nft rules"
    if facts.legacy_rules > facts.nft_rules:
        return BackendChoice("legacy", f"no kubelet hint; {counts}")
    return BackendChoice("nft", f"no kubelet hint; {counts} (nft unless legacy holds more)")


def detect_backend(configured: str = "auto") -> BackendChoice:
    """The backend to write, reading the node only when `configured` is auto."""
    facts = None if configured in ("legacy", "nft") else read_backend_facts()
    return decide_backend(configured, facts)

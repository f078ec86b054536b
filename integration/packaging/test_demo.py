"""`make demo` works, shows both pictures (userspace mode, then iptables mode) and the ingress hop
(nginx in the controller pod, configured from the Ingress), and cleans up after itself."""

from __future__ import annotations

import re
import subprocess
import sys

from integration.netns import NODE_IP, PREFIX, list_namespaces
from integration.real_node import DEFAULT_KUBELET
from integration.traffic import REPO_ROOT

DEMO_PREFIX = f"{PREFIX}demo-"  # other tests' namespaces may come and go meanwhile
NGINX_PODS = (("my-nginx-1", "192.168.183.140"), ("my-nginx-2", "192.168.224.7"))
CLIENT_IP = "192.168.1.50"
CONTROLLER_IP = "192.168.235.20"
USERSPACE = "=== picture 1 of 2: the userspace mode"
IPTABLES = "=== picture 2 of 2: the iptables mode"


def _tallies(section: str) -> dict[str, tuple[int, str]]:
    """my-nginx pod -> (answers of 20, the source addresses it saw) in one section's tally."""
    found = {}
    for pod, ip in NGINX_PODS:
        tally = re.search(rf"{pod} \({re.escape(ip)}:80\): (\d+) of 20, saw (\S+)", section)
        assert tally, section
        found[pod] = (int(tally.group(1)), tally.group(2))
    return found


def _dns_sources(section: str) -> dict[str, str]:
    """Protocol -> the source address coredns-1 saw, from one section's kube-dns lines."""
    line = r"== (UDP|TCP) 10\.96\.0\.10:53 \(kube-system/kube-dns\): "
    line += r"answered by coredns-1, which saw (\S+)"
    return dict(re.findall(line, section))


def test_demo_shows_both_pictures_and_leaves_no_namespace() -> None:
    before = set(list_namespaces(DEMO_PREFIX))

    demo = subprocess.Popen(
        [sys.executable, "-m", "integration.demo"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = demo.communicate(timeout=180)
    finally:
        if demo.poll() is None:
            demo.terminate()  # the demo removes its namespaces on SIGTERM
            out, err = demo.communicate()

    assert demo.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    _, _, rest = out.partition(USERSPACE)
    userspace, _, rest = rest.partition(IPTABLES)
    iptables, _, via_ingress = rest.partition("(via the ingress)")
    assert userspace and iptables and via_ingress, out

    # The relay: strict round robin, and every endpoint saw the node.
    assert _tallies(userspace) == {pod: (10, NODE_IP) for pod, _ in NGINX_PODS}, userspace
    assert "round robin" in userspace
    assert _dns_sources(userspace) == {"UDP": NODE_IP, "TCP": NODE_IP}, userspace
    # netfilter: a random split (each got some), and every endpoint saw the client itself.
    tallies = _tallies(iptables)
    assert all(n > 0 and saw == CLIENT_IP for n, saw in tallies.values()), iptables
    assert "at random" in iptables
    assert _dns_sources(iptables) == {"UDP": CLIENT_IP, "TCP": CLIENT_IP}, iptables
    # What the demo says agrees with what kproxy printed: the relay's hand-over as it stopped
    # wrote the iptables mode's rules into legacy iptables. On a legacy node that mode's sync
    # finds nothing to change; on the demo's default node kubelet writes iptables-nft, so the
    # sync writes the rules there and removes the hand-over's legacy chains.
    lines = iptables.splitlines()
    command = next(i for i, line in enumerate(lines) if line.startswith("$ kproxy sync"))
    summary = lines[command + 1]
    if DEFAULT_KUBELET == "legacy":
        assert "no changes" in summary, summary
    else:
        assert re.search(r"wrote \d+ chains .*removed (\d+) chains \(\1 of another mode\)", summary)
    assert "hand-over left its rules in legacy iptables" in lines[command], lines[command]
    assert "handed the node over to the iptables mode's rules" in userspace, userspace
    # Through the ingress, after the switch.
    assert all(n > 0 for n, _ in _tallies(via_ingress).values()), via_ingress
    assert "to http://172.31.0.2:30189/testpath" in iptables, out
    assert f"my-nginx saw the requests coming from {CONTROLLER_IP}" in via_ingress, out
    # Every hop real: nginx behind the NodePort, configured from the Ingress.
    assert "(nginx), serving:\n    /testpath (Prefix, rewrite-target /) -> 10.104.164.89:80" in out
    assert "KUBE-SVC-" in via_ingress and "KUBE-PORTALS-" not in via_ingress, via_ingress
    leftover = set(list_namespaces(DEMO_PREFIX)) - before
    assert not leftover, f"the demo left namespaces behind: {sorted(leftover)}"

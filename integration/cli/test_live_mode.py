"""`kproxy dump`, `trace` and `dump --diff` without `--config` read the mode the node's kernel
shows (an nftables-mode node's `kube-proxy` table, not the empty legacy chains) and say which
one they read; `sync --once` of an empty input refuses to remove every rule unless asked, and
its "with start-up" figure is the whole process's time."""

from __future__ import annotations

import json
import re
import sys

import pytest

from integration.conftest import Cluster
from integration.manifests import NODE_NAME
from integration.netns import run_kproxy
from integration.userspace.test_userspace import userspace_proxy

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
CLIENT = "192.168.9.9"


def _kproxy(cluster: Cluster, *args: str, check: bool = True) -> tuple[int, str, str]:
    proc = run_kproxy(cluster.node, *args, lock_file=cluster.lock_file, check=check)
    return proc.returncode, proc.stdout, proc.stderr


def _web(cluster: Cluster) -> None:
    backends = [cluster.backend(f"web-{i}", f"192.168.{i}.10", TARGET) for i in (1, 2)]
    cluster.pod("client", CLIENT)
    cluster.service("web", VIP, PORT, backends, TARGET)
    cluster.sync()


@pytest.mark.parametrize("proxy_mode", ["nftables"], indirect=True)
def test_nftables_node_is_read_as_nftables_without_config(cluster: Cluster) -> None:
    _web(cluster)  # with a config of the defaults but the mode: so is `dump --diff`'s plan

    _, dumped, said = _kproxy(cluster, "dump")
    assert "table ip kube-proxy" in dumped, dumped
    assert VIP in dumped
    assert "reading the nftables mode's rules (no --config: nftables table" in said, said

    _, traced, said = _kproxy(cluster, "trace", "tcp", f"{VIP}:{PORT}", "--output", "json")
    doc = json.loads(traced)
    assert doc["outcome"] != "not_a_service", doc
    assert doc["service"].startswith("default/web"), doc
    assert "nftables mode" in said, said

    manifests = ["--manifests", str(cluster.manifests), "--hostname-override", NODE_NAME]
    code, diff, said = _kproxy(cluster, "dump", "--diff", "--family", "4", *manifests, check=False)
    assert code == 0, diff  # the nftables plan matches the table; the iptables one would not
    assert "nftables mode" in said, said


@pytest.mark.parametrize("proxy_mode", ["iptables"], indirect=True)
def test_userspace_node_is_read_as_userspace_without_config(cluster: Cluster) -> None:
    backends = [cluster.backend("web-1", "192.168.1.10", TARGET)]
    cluster.service("web", VIP, PORT, backends, TARGET)
    with userspace_proxy(cluster):
        # (What `dump` prints of a userspace node is the mode's read_live's business.)
        _, _, said = _kproxy(cluster, "dump")
        _, traced, _ = _kproxy(cluster, "trace", "tcp", f"{VIP}:{PORT}", "--output", "json")
    assert "reading the userspace mode's rules (no --config: nat chain KUBE-PORTALS-" in said
    assert json.loads(traced)["outcome"] == "relayed", traced


@pytest.mark.parametrize("proxy_mode", ["iptables"], indirect=True)
def test_iptables_node_says_which_chain_decided(cluster: Cluster) -> None:
    _web(cluster)
    _, dumped, said = _kproxy(cluster, "dump")
    assert ":KUBE-SERVICES" in dumped
    assert "reading the iptables mode's rules (no --config: nat chain KUBE-SERVICES found)" in said

    cluster.configure()  # with --config, the config's mode, and nothing said about it
    _, _, said = _kproxy(cluster, "dump", *cluster.config_args())
    assert "reading the" not in said


@pytest.mark.parametrize("proxy_mode", ["iptables", "nftables"], indirect=True)
def test_sync_of_an_empty_input_keeps_the_rules_unless_allowed(cluster: Cluster) -> None:
    _web(cluster)
    before = cluster.rules()
    assert VIP in before
    for path in cluster.manifests.iterdir():
        path.unlink()
    args = ["sync", "--once", "--manifests", str(cluster.manifests), *cluster.config_args()]

    code, out, said = _kproxy(cluster, *args, check=False)
    assert code == 1, out
    assert "manifests_empty" in said
    assert "holds no Service" in said and "--allow-empty" in said
    assert cluster.rules() == before  # nothing removed

    _kproxy(cluster, *args, "--allow-empty")
    assert VIP not in cluster.rules()


@pytest.mark.parametrize("proxy_mode", ["iptables"], indirect=True)
def test_start_up_figure_is_the_whole_process(cluster: Cluster) -> None:
    # A process that spends a second before kproxy's code runs (as a slow interpreter start or
    # import would): the "with start-up" figure counts it. A lower bound only, never timed.
    backends = [cluster.backend("web-1", "192.168.1.10", TARGET)]
    cluster.service("web", VIP, PORT, backends, TARGET)
    argv = ["sync", "--once", "--manifests", str(cluster.manifests)]
    code = (
        "import sys, time; time.sleep(1.0); from kproxy.cli import main; "
        f"sys.argv = ['kproxy', *{argv!r}]; main()"
    )
    proc = cluster.node.run(
        sys.executable, "-P", "-c", code, env={"XTABLES_LOCKFILE": str(cluster.lock_file)}
    )
    found = re.search(r"\(([0-9.]+)s with start-up\)", proc.stdout)
    assert found, proc.stdout
    assert float(found.group(1)) >= 1.0, proc.stdout

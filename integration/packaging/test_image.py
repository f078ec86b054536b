"""The container image, built from the repository's Dockerfile (integration/image.py) and run as
the DaemonSet runs it: privileged, on the node's network. The node is a network namespace this
test builds (netns.py) with the seed scenario's endpoint pods and a client pod, and the container
joins it (`podman run --network ns:/run/netns/NODE`), never the root namespace. In each of the
three modes the image programs the node from integration/scenarios/demo (mounted in), and the
client's connections to my-nginx reach both of its endpoints.

Needs root, podman, runc and mmdebstrap (`make image-deps`); without them it fails, never skips.
The first run builds the base and the image (minutes); later runs reuse podman's cached layers.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml

from integration import image
from integration.demo import (
    CLIENT_IP,
    NGINX,
    NODE_NAME,
    SCENARIO,
    read_backends,
    start_backends,
)
from integration.netns import Namespace, Topology, read_line, stop, topology
from integration.traffic import probe

REQUESTS = 20
MANIFESTS = "/etc/kproxy-test/manifests"
CONFIG_DIR = "/etc/kproxy-test/config"
SYNC = ["sync", "--once", "--manifests", MANIFESTS, "--hostname-override", NODE_NAME]
SYNC += ["--config", f"{CONFIG_DIR}/config.conf"]


@pytest.fixture(scope="module")
def built_image() -> str:
    missing = image.missing_tools()
    if missing:
        pytest.fail(
            f"missing {', '.join(missing)}: `make image-deps` installs them; the image test is "
            "never skipped",
            pytrace=False,
        )
    image.build()
    return image.IMAGE


@pytest.fixture
def node(built_image: str) -> Iterator[Topology]:
    """A node namespace with the seed scenario's endpoint pods serving, and a client pod."""
    with topology("img", kubelet="nft") as topo:  # kubelet's chains in iptables-nft
        start_backends(topo, read_backends(SCENARIO))
        topo.add_pod("client", CLIENT_IP)
        yield topo


def _mounts(config: Path) -> Mapping[Path, str]:
    return {SCENARIO: MANIFESTS, config.parent: CONFIG_DIR}


def _config(tmp_path: Path, mode: str) -> Path:
    """Each mode's defaults: nothing but `mode`."""
    path = tmp_path / "config.conf"
    doc = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}
    path.write_text(yaml.safe_dump({**doc, "mode": mode}))
    return path


def run_image(
    topo: Topology, *args: str, mounts: Mapping[Path, str] = {}
) -> subprocess.CompletedProcess[str]:
    argv = image.run_argv(topo.node.name, args, mounts)
    return subprocess.run(
        argv, env=image.podman_env(), capture_output=True, text=True, timeout=300, check=False
    )


def assert_both_nginx_endpoints_answer(client: Namespace) -> None:
    _, vip, port = NGINX
    nginx = {b.name for b in read_backends(SCENARIO) if (port, "TCP") in b.ports}
    result = probe(client, vip, port, "tcp", count=REQUESTS, http=True)
    assert result.failed == 0, result
    assert set(result.answers) == nginx, result


def test_help(node: Topology) -> None:
    proc = run_image(node, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Usage: kproxy" in proc.stdout
    for command in ("sync", "run", "doctor"):
        assert f"  {command} " in proc.stdout, proc.stdout


def test_doctor_judges_the_node(node: Topology, tmp_path: Path) -> None:
    """The node is an iptables-nft one (kubelet's chains, real_node.py): the nftables mode fits
    it, and so does the iptables mode, which writes iptables-nft there as kubelet does."""
    config = _config(tmp_path, "nftables")
    in_image = f"{CONFIG_DIR}/{config.name}"
    fits = run_image(node, "doctor", "--config", in_image, mounts=_mounts(config))
    assert fits.returncode == 0, fits.stdout + fits.stderr
    assert "ok    proxy-mode" in fits.stdout, fits.stdout

    iptables = run_image(node, "doctor")
    assert "ok    iptables-backend" in iptables.stdout, iptables.stdout
    assert "(iptables-nft)" in iptables.stdout, iptables.stdout
    assert "ok    proxy-mode" in iptables.stdout, iptables.stdout


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_sync_once_sends_a_pods_connections_to_both_endpoints(
    node: Topology, tmp_path: Path, mode: str
) -> None:
    config = _config(tmp_path, mode)
    proc = run_image(node, *SYNC, mounts=_mounts(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_both_nginx_endpoints_answer(node.pods["client"].ns)


def test_userspace_relays_a_pods_connections_to_both_endpoints(
    node: Topology, tmp_path: Path
) -> None:
    """In userspace mode `sync --once` programs the portals and then relays in the foreground;
    the container runs until it is stopped."""
    config = _config(tmp_path, "userspace")
    name = f"{node.prefix}-userspace"
    argv = image.run_argv(node.node.name, ["--log-level", "warning", *SYNC], _mounts(config), name)
    relay = subprocess.Popen(
        argv,
        env=image.podman_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        read_line(relay, timeout=120.0)  # the sync's summary: the portals are in place
        assert_both_nginx_endpoints_answer(node.pods["client"].ns)
    finally:
        stop(relay)  # SIGTERM, which podman passes on to kproxy
        image.podman("rm", "--force", "--ignore", name)

"""Which mode `dump`/`trace` read without --config, and what the commands say about their input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kproxy.cli import cli
from kproxy.inspect.live_mode import decide_live_mode, describe_mode

USERSPACE = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.30, ports: [{port: 80, targetPort: 8080}]}
"""


@pytest.mark.parametrize(
    ("tables", "chains", "mode", "found"),
    [
        ({"kube-proxy"}, {"KUBE-SERVICES"}, "nftables", "nftables table 'kube-proxy'"),
        ({"firewalld"}, {"KUBE-PORTALS-CONTAINER", "KUBE-SERVICES"}, "userspace", "PORTALS"),
        (set(), {"KUBE-PORTALS-HOST"}, "userspace", "KUBE-PORTALS-HOST"),
        (set(), {"KUBE-SERVICES", "DOCKER"}, "iptables", "KUBE-SERVICES"),
        ({"filter"}, {"DOCKER"}, "iptables", "no kproxy rules found"),
    ],
)
def test_live_mode_follows_what_the_kernel_holds(
    tables: set[str], chains: set[str], mode: str, found: str
) -> None:
    live = decide_live_mode(tables, chains)
    assert live.mode == mode
    assert found in live.found


def test_the_line_says_why_that_mode() -> None:
    line = describe_mode(decide_live_mode({"kube-proxy"}, set()))
    assert line == (
        "kproxy: reading the nftables mode's rules (no --config: nftables table 'kube-proxy' found)"
    )


def test_an_empty_manifest_file_or_directory_is_warned_about(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    (tmp_path / "dir").mkdir()
    for path in (empty, tmp_path / "dir"):
        result = CliRunner().invoke(cli, ["dump", "--manifests", str(path)])
        assert result.exit_code == 0, result.output
        assert "manifests_empty" in result.stderr, result.stderr
        assert str(path) in result.stderr


def test_manifests_with_objects_give_no_empty_warning(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(SERVICE)
    result = CliRunner().invoke(cli, ["dump", "--manifests", str(path)])
    assert "manifests_empty" not in result.stderr


def test_userspace_dump_says_what_port_0_stands_for(tmp_path: Path) -> None:
    path, config = tmp_path / "m.yaml", tmp_path / "c.yaml"
    path.write_text(SERVICE)
    config.write_text(USERSPACE + "mode: userspace\n")
    result = CliRunner().invoke(cli, ["dump", "--manifests", str(path), "--config", str(config)])
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("# port 0 (--to-ports 0"), first
    assert "relay listener's port" in first
    assert "--to-destination" in result.stdout or "--to-ports" in result.stdout


def test_help_names_every_mode_and_no_single_format() -> None:
    top = CliRunner().invoke(cli, ["--help"]).stdout
    assert "iptables, nftables and userspace" in top
    dump = CliRunner().invoke(cli, ["dump", "--help"]).stdout
    assert "nft list table" in dump


def test_help_loads_no_kernel_library_cluster_client_or_mode() -> None:
    # What `kproxy --help` imports, not how long it takes: the start-up figures are measured
    # apart (see the closing note of issue 20).
    code = (
        "import sys; sys.argv = ['kproxy', '--help']\n"
        "from kproxy.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ('kubernetes', 'pyroute2', 'iptc', 'kproxy.sync.modes', 'kproxy.sync.agent')\n"
        "print(' '.join(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    )
    assert "Usage: kproxy" in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr

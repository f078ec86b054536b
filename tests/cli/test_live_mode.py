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


def _loaded(argv: list[str], heavy: tuple[str, ...]) -> tuple[str, list[str]]:
    """(stdout, the `heavy` modules in sys.modules) after `kproxy ARGV` ran in a fresh process."""
    code = (
        f"import sys; sys.argv = ['kproxy', *{argv!r}]\n"
        "from kproxy.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    )
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.stdout, last.split()


def test_help_loads_no_kernel_library_cluster_client_mode_or_logging() -> None:
    # What `kproxy --help` imports, not how long it takes: bench/cli_startup.py measures that.
    heavy = ("kubernetes", "pyroute2", "iptc", "kproxy.sync.modes", "kproxy.sync.agent")
    heavy += ("structlog", "yaml", "kproxy.state.ingest", "kproxy.watch.manifests")
    out, loaded = _loaded(["--help"], heavy)
    assert "Usage: kproxy" in out
    assert loaded == [], loaded


def test_dump_of_manifests_loads_no_cluster_client(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(SERVICE)
    out, loaded = _loaded(["dump", "--manifests", str(path)], ("kubernetes", "kproxy.watch.api"))
    assert "KUBE-SERVICES" in out
    assert loaded == [], loaded


@pytest.mark.parametrize(
    "argv",
    [
        ["dump"],
        ["dump", "--diff", "--manifests", "M"],
        ["trace", "tcp", "10.96.0.1:443", "--node-address", "10.0.0.1"],
    ],
)
def test_reading_the_live_mode_without_root_says_to_use_manifests(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without --config the command first asks the kernel which mode runs: not as root, that
    # must say what reading needs and what to do instead, not "to program netfilter tables".
    path = tmp_path / "m.yaml"
    path.write_text(SERVICE)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    result = CliRunner().invoke(cli, [str(path) if a == "M" else a for a in argv])
    assert result.exit_code != 0
    said = str(result.exception)
    assert "needs root" in said and "--manifests" in said, said
    assert "to program" not in said, said

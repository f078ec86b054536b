import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from kproxy.cli import cli
from kproxy.rules.saved import parse_save
from tests import scenarios

MANIFESTS = (
    scenarios.ONE_SERVICE_YAML
    + """\
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: default}
spec:
  clusterIP: 10.96.0.21
  ports: [{name: http, port: 80, protocol: ICMP}]
"""
)


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_dump_from_manifests_skips_bad_service_and_keeps_the_rest(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["dump", "--manifests", write(tmp_path, MANIFESTS)])
    assert result.exit_code == 0, result.output
    tables = parse_save(result.stdout)
    services = "\n".join(tables["nat"].chains["KUBE-SERVICES"])
    assert "default/good:http cluster IP" in services
    assert "10.96.0.21" not in result.stdout
    assert "Service default/broken" in result.stderr
    assert "spec.ports[0].protocol" in result.stderr


def test_config_masquerade_bit_changes_the_mark(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "iptables: {masqueradeBit: 15}\nfeatureGates: {Foo: true}\n",
        "config.yaml",
    )
    result = CliRunner().invoke(
        cli, ["dump", "--manifests", write(tmp_path, MANIFESTS), "--config", config]
    )
    assert result.exit_code == 0, result.output
    assert "--set-xmark 0x8000/0x8000" in result.stdout
    assert "featureGates" in result.stderr  # ignored field is named, not fatal


def test_bad_config_value_exits_1_with_a_message_naming_the_field(tmp_path: Path) -> None:
    config = write(tmp_path, "kind: KubeProxyConfiguration\nmode: ipvs\n", "config.yaml")
    args = ["dump", "--manifests", write(tmp_path, MANIFESTS), "--config", config]
    proc = subprocess.run(
        [sys.executable, "-m", "kproxy.cli", *args], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert "kproxy: error: config field mode: 'ipvs' is not supported" in proc.stderr
    assert proc.stdout == ""


def test_sync_requires_once(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["sync", "--manifests", write(tmp_path, MANIFESTS)])
    assert result.exit_code == 2
    assert "--once" in result.stderr


def test_unknown_flag_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["dump", "--no-such-flag"])
    assert result.exit_code == 2
    assert "no-such-flag" in result.stderr


def _run_flags(args: list[str]) -> dict[str, object]:
    from kproxy.cli import given_flags, run

    ctx = run.make_context("run", args)
    flags = given_flags(ctx.params)
    if ctx.params["hostname"]:
        flags["--hostname-override"] = ctx.params["hostname"]
    return flags


KUBEADM = """\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
conntrack: {maxPerCore: null, min: null, tcpEstablishedTimeout: null}
iptables: {masqueradeAll: false, masqueradeBit: null, minSyncPeriod: 0s, syncPeriod: 0s}
ipvs: {scheduler: ""}
mode: ""
featureGates: {}
"""


def test_kube_proxy_flags_override_the_config_file(tmp_path: Path) -> None:
    from kproxy.inspect.inputs import load_config_file

    config_path = write(tmp_path, KUBEADM, "config.conf")
    flags = _run_flags(
        [
            "--config", config_path,
            "--hostname-override", "node-7",
            "--cluster-cidr", "10.0.0.0/8,fd00::/48",
            "--masquerade-all",
            "--iptables-sync-period", "10s",
            "--iptables-masquerade-bit=15",
            "--iptables-localhost-nodeports=false",
            "--nodeport-addresses", "primary,192.168.0.0/16",
        ]
    )  # fmt: skip
    config = load_config_file(config_path, flags)
    assert config.hostname_override == "node-7"
    assert config.cluster_cidrs == ("10.0.0.0/8", "fd00::/48")
    assert config.masquerade_all is True and config.masquerade_bit == 15
    assert config.sync_period == 10.0 and config.localhost_nodeports is False
    assert config.node_port_addresses == ("primary", "192.168.0.0/16")
    assert config.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"  # from the file
    # Without flags, the file's values (kubeadm's nulls and zeros keep kube-proxy's defaults).
    plain = load_config_file(config_path, {})
    assert plain.cluster_cidrs == ("10.244.0.0/16",) and plain.masquerade_all is False
    assert plain.sync_period == 30.0 and plain.masquerade_bit == 14


def test_bad_flag_value_names_the_flag(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kproxy.cli", "run", "--iptables-masquerade-bit", "40"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "--iptables-masquerade-bit: 40 must be an integer from 0 to 31" in proc.stderr


def _kproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kproxy.cli", *args], capture_output=True, text=True, check=False
    )


def test_a_fatal_error_is_said_once(tmp_path: Path) -> None:
    config = write(tmp_path, "kind: KubeProxyConfiguration\nmode: ipvs\n", "config.yaml")
    proc = _kproxy("dump", "--manifests", write(tmp_path, MANIFESTS), "--config", config)
    assert proc.returncode == 1
    assert proc.stderr.count("is not supported") == 1, proc.stderr


def test_invalid_config_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    config = write(tmp_path, "kind: KubeProxyConfiguration\niptables:\n  a: 1\n b: [\n", "c.yaml")
    result = CliRunner().invoke(
        cli, ["dump", "--manifests", write(tmp_path, MANIFESTS), "--config", config]
    )
    assert result.exit_code == 1
    message = str(result.exception)
    assert message.startswith(f"--config {config}: line 4: invalid YAML (")
    assert "\n" not in message and "unicode string" not in message


def test_a_misspelt_field_is_named_with_the_near_one(tmp_path: Path) -> None:
    config = write(tmp_path, "kind: KubeProxyConfiguration\nclusterCidr: 10.0.0.0/8\n", "c.yaml")
    result = CliRunner().invoke(
        cli, ["dump", "--manifests", write(tmp_path, MANIFESTS), "--config", config]
    )
    assert result.exit_code == 0, result.output
    assert '"did_you_mean": "clusterCIDR"' in result.stderr


def test_boolean_flags_take_go_forms_only() -> None:
    assert _run_flags(["--masquerade-all"]) == {"--masquerade-all": True}
    assert _run_flags(["--masquerade-all=F"]) == {"--masquerade-all": False}
    assert _run_flags(["--iptables-localhost-nodeports=TRUE"]) == {
        "--iptables-localhost-nodeports": True
    }
    for value in ("yes", "maybe", "on", ""):
        result = CliRunner().invoke(cli, ["run", f"--masquerade-all={value}", "--cleanup"])
        assert result.exit_code == 2, value
        assert f"{value!r} is not a boolean; use true or false (1, t," in result.stderr


def test_help_shows_once_required_and_explains_lock_timeout() -> None:
    sync_help = CliRunner().invoke(cli, ["sync", "--help"]).stdout
    assert re.search(r"--once .*\[required\]", sync_help)
    for command in ("sync", "cleanup", "run"):
        text = CliRunner().invoke(cli, [command, "--help"]).stdout
        assert "--lock-timeout SECONDS" in text and "/run/xtables.lock" in text, command


def test_a_missing_kubeconfig_is_named() -> None:
    result = CliRunner().invoke(cli, ["run", "--kubeconfig", "/nonexistent/kubeconfig"])
    assert result.exit_code == 2
    assert "'/nonexistent/kubeconfig' does not exist" in result.stderr

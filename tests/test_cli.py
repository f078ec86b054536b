import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from kproxy.cli import cli
from kproxy.rules.saved import parse_save

MANIFESTS = """\
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: default}
spec:
  clusterIP: 10.96.0.21
  ports: [{name: http, port: 80, protocol: ICMP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: good-1
  namespace: default
  labels: {kubernetes.io/service-name: good}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true}
"""


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

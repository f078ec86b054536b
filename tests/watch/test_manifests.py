import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from kproxy.errors import ManifestError
from kproxy.watch.files import ManifestSource
from kproxy.watch.manifests import load_manifests

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: a, namespace: default}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
"""


def test_directory_with_multidoc_yaml_lists_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SERVICE + "---\napiVersion: v1\nkind: ConfigMap\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_text(
        json.dumps(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "items": [{"metadata": {"name": "a-1"}, "addressType": "IPv4"}],
            }
        )
    )
    (tmp_path / "c.yml").write_text(
        "apiVersion: v1\nkind: List\nitems:\n"
        "- apiVersion: v1\n  kind: Node\n  metadata: {name: n1}\n"
    )
    (tmp_path / "notes.txt").write_text("not a manifest")
    found = load_manifests(tmp_path)
    assert [s["metadata"]["name"] for s in found.services] == ["a"]
    assert [s["kind"] for s in found.endpoint_slices] == ["EndpointSlice"]
    assert [n["metadata"]["name"] for n in found.nodes] == ["n1"]
    assert len(found.warnings) == 1 and "ConfigMap" in found.warnings[0]


def test_wrong_api_version_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SERVICE.replace("apiVersion: v1", "apiVersion: v2"))
    found = load_manifests(tmp_path / "a.yaml")
    assert found.services == [] and "apiVersion" in found.warnings[0]


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: [\n")
    with pytest.raises(ManifestError, match=r"bad\.yaml: line \d+"):
        load_manifests(bad)


def test_missing_path() -> None:
    with pytest.raises(ManifestError, match="no such file"):
        load_manifests("/nonexistent/kproxy")


class _Sink:
    """Enough of a Sink for one poll: counts what the source hands over."""

    def __init__(self) -> None:
        self.applied = 0

    def apply(self, mutation: object) -> None:
        self.applied += 1

    def synced(self, kind: str) -> None:
        pass


def _empty_warnings(path: Path) -> list[str]:
    with capture_logs() as logs:
        ManifestSource(str(path), "node-1", use_inotify=False).poll(_Sink())
    return [e["path"] for e in logs if e["event"] == "manifests_empty"]


def test_run_source_warns_about_an_empty_directory_naming_it(tmp_path: Path) -> None:
    assert _empty_warnings(tmp_path) == [str(tmp_path)]


def test_run_source_warns_about_an_empty_file_naming_it(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SERVICE)
    (tmp_path / "truncated.yaml").write_text("")
    assert _empty_warnings(tmp_path) == [str(tmp_path / "truncated.yaml")]


def test_run_source_is_quiet_about_a_file_of_other_kinds(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SERVICE)
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\n")  # warned as ignored
    assert _empty_warnings(tmp_path) == []

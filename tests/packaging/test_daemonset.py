"""The manifests in daemonset/: valid Kubernetes objects (checked strictly against the official
client's models, so a misspelt field fails here rather than being dropped by the API server),
least-privilege RBAC, a DaemonSet set up as a node proxy must be, and a ConfigMap kproxy reads."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes.client as k8s
import pydantic
import pytest
import yaml

from kproxy.cli import cli
from kproxy.model.config import parse_bind_address, parse_config

DAEMONSET_DIR = Path(__file__).resolve().parents[2] / "daemonset"
NAMESPACE = "kube-system"
MODELS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("v1", "ServiceAccount"): k8s.V1ServiceAccount,
    ("v1", "ConfigMap"): k8s.V1ConfigMap,
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): k8s.V1ClusterRole,
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): k8s.V1ClusterRoleBinding,
    ("apps/v1", "DaemonSet"): k8s.V1DaemonSet,
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}
# (API group, resource, verb): everything kproxy may do, and nothing else.
ALLOWED = {
    ("", "services", "list"),
    ("", "services", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("", "nodes", "get"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
}
# Fields of the shipped KubeProxyConfiguration that kproxy reads but does not act on.
EXPECTED_IGNORED_CONFIG_FIELDS: list[str] = []  # kproxy honours every field the ConfigMap sets
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "images"}


class ManifestError(ValueError):
    pass


def validate(doc: dict[str, Any]) -> pydantic.BaseModel:
    """The object as the client's model, refusing anything the API schema does not have: unknown
    fields (the models forbid extras), wrong types, and names in the wrong spelling (a
    `host_network` passes the model, which accepts Python names too, but not the round trip)."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key not in MODELS:
        raise ManifestError(f"unexpected object {key}")
    try:
        obj = MODELS[key].model_validate(doc)
    except pydantic.ValidationError as exc:
        raise ManifestError(str(exc)) from exc
    again = obj.model_dump(by_alias=True, exclude_none=True, mode="json")
    if again != doc:
        raise ManifestError(f"not preserved by the schema:\n{doc}\nbecame\n{again}")
    return obj


def _load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DAEMONSET_DIR / name).read_text()) if d is not None]


def _resource_files() -> list[str]:
    return sorted(p.name for p in DAEMONSET_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def _objects() -> dict[str, dict[str, Any]]:
    """Every object in daemonset/, by kind (each kind appears once)."""
    found: dict[str, dict[str, Any]] = {}
    for name in _resource_files():
        for doc in _load(name):
            assert doc["kind"] not in found, f"two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    return _objects()


@pytest.fixture(scope="module")
def pod(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objects["DaemonSet"]["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    assert len(pod["containers"]) == 1
    only: dict[str, Any] = pod["containers"][0]
    return only


# --- schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", _resource_files())
def test_manifest_matches_the_api_schema(name: str) -> None:
    docs = _load(name)
    assert docs, f"{name} is empty"
    for doc in docs:
        validate(doc)
        assert doc["metadata"]["name"] == "kproxy" or doc["kind"] == "ConfigMap"
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"]
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "template", "spec", "hostNetwrok"), True),  # misspelt field
        (("spec", "template", "spec", "host_network"), True),  # Python name, not the API's
        (("spec", "updateStrategy", "rollingUpdate", "maxUnavailabel"), 1),
        (("spec", "template", "spec", "hostNetwork"), "yes"),  # wrong type
        (("metadata", "labelz"), {}),
    ],
)
def test_broken_daemonset_is_refused(
    objects: dict[str, dict[str, Any]], path: tuple[str, ...], value: Any
) -> None:
    doc = copy.deepcopy(objects["DaemonSet"])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    with pytest.raises(ManifestError):
        validate(doc)


def test_broken_container_field_is_refused(objects: dict[str, dict[str, Any]]) -> None:
    doc = copy.deepcopy(objects["DaemonSet"])
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = 1
    with pytest.raises(ManifestError, match="prot"):
        validate(doc)


def test_kustomization_lists_every_resource() -> None:
    (kustomization,) = _load("kustomization.yaml")
    assert set(kustomization) <= KUSTOMIZATION_KEYS
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    assert sorted(kustomization["resources"]) == _resource_files()


def test_kustomization_image_entry_names_the_daemonset_image(container: dict[str, Any]) -> None:
    (kustomization,) = _load("kustomization.yaml")
    names = [image["name"] for image in kustomization["images"]]
    assert names == [container["image"].rsplit(":", 1)[0]]


# --- RBAC -----------------------------------------------------------------------------------


def test_cluster_role_grants_exactly_what_kproxy_needs(objects: dict[str, dict[str, Any]]) -> None:
    granted = set()
    for rule in objects["ClusterRole"]["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no names, no URLs
        granted |= {
            (group, resource, verb)
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
    assert not any("*" in part for grant in granted for part in grant)
    assert granted == ALLOWED


def test_binding_ties_the_role_to_the_service_account(
    objects: dict[str, dict[str, Any]], pod: dict[str, Any]
) -> None:
    binding = objects["ClusterRoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": objects["ClusterRole"]["metadata"]["name"],
    }
    account = objects["ServiceAccount"]["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    assert pod["serviceAccountName"] == account["name"]


# --- DaemonSet ------------------------------------------------------------------------------


def test_pod_runs_on_every_linux_node_in_the_host_network(pod: dict[str, Any]) -> None:
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_container_is_privileged_with_requests(container: dict[str, Any]) -> None:
    assert container["securityContext"] == {"privileged": True}
    assert container["resources"]["requests"] == {"cpu": "100m", "memory": "128Mi"}


def test_rolling_update_one_node_at_a_time(objects: dict[str, dict[str, Any]]) -> None:
    strategy = objects["DaemonSet"]["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_selector_matches_the_pod_labels(objects: dict[str, dict[str, Any]]) -> None:
    spec = objects["DaemonSet"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def _mounts(
    pod: dict[str, Any], container: dict[str, Any]
) -> dict[str, tuple[dict[str, Any], Any]]:
    """mountPath -> (volume, readOnly)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    return {
        m["mountPath"]: (volumes[m["name"]], m.get("readOnly", False))
        for m in container["volumeMounts"]
    }


def test_host_paths_are_mounted_as_for_kube_proxy(
    pod: dict[str, Any], container: dict[str, Any]
) -> None:
    mounts = _mounts(pod, container)
    lock, lock_read_only = mounts["/run/xtables.lock"]
    assert lock["hostPath"] == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    assert lock_read_only is False  # flock needs a writable descriptor
    modules, modules_read_only = mounts["/lib/modules"]
    assert modules["hostPath"]["path"] == "/lib/modules"
    assert modules_read_only is True


def test_node_name_comes_from_the_downward_api(container: dict[str, Any]) -> None:
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # The debugging commands run through `kubectl exec` read the agent's config.
    assert f"--config={env['KPROXY_CONFIG']['value']}" in container["command"]
    assert "--hostname-override=$(NODE_NAME)" in container["command"]
    assert container["command"][:2] == ["kproxy", "run"]


def test_api_server_address_can_be_given_without_a_service_vip(container: dict[str, Any]) -> None:
    # Optional, so the manifests apply as they are; see README.md, "Install on a cluster".
    refs = [e["configMapRef"] for e in container["envFrom"]]
    assert refs == [{"name": "kproxy-apiserver", "optional": True}]


def test_the_command_line_is_one_kproxy_accepts(container: dict[str, Any]) -> None:
    run = cli.commands["run"]
    args = [a.replace("$(NODE_NAME)", "node-a") for a in container["command"][2:]]
    ctx = run.make_context("run", args)
    assert ctx.params["hostname"] == "node-a"
    assert ctx.params["config_path"] == "/var/lib/kproxy/config.conf"


def test_config_map_is_mounted_where_the_command_reads_it(
    objects: dict[str, dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]
) -> None:
    config_arg = next(a for a in container["command"] if a.startswith("--config="))
    path = Path(config_arg.removeprefix("--config="))
    volume, read_only = _mounts(pod, container)[str(path.parent)]
    assert volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert path.name in objects["ConfigMap"]["data"]
    assert read_only is True


def test_liveness_probe_asks_livez_on_the_healthz_port(
    objects: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    probe = container["livenessProbe"]["httpGet"]
    assert probe == {"host": "127.0.0.1", "path": "/livez", "port": 10256}
    assert "readinessProbe" not in container
    config, _ = parse_config(yaml.safe_load(objects["ConfigMap"]["data"]["config.conf"]))
    host, port = parse_bind_address(config.healthz_bind_address, "healthzBindAddress")
    assert port == probe["port"]
    assert host in ("0.0.0.0", "127.0.0.1")  # the probe's address must be one it listens on


# --- ConfigMap ------------------------------------------------------------------------------


def test_config_is_a_kube_proxy_configuration_kproxy_accepts(
    objects: dict[str, dict[str, Any]],
) -> None:
    doc = yaml.safe_load(objects["ConfigMap"]["data"]["config.conf"])
    assert doc["apiVersion"] == "kubeproxy.config.k8s.io/v1alpha1"
    assert doc["mode"] == "iptables"
    config, ignored = parse_config(doc)
    assert ignored == EXPECTED_IGNORED_CONFIG_FIELDS
    assert config.cluster_cidrs == ("10.244.0.0/16",)
    assert config.masquerade_bit == 14
    assert (config.sync_period, config.min_sync_period) == (30.0, 1.0)
    assert config.healthz_bind_address == "0.0.0.0:10256"
    assert config.metrics_bind_address == "127.0.0.1:10249"
    assert doc["conntrack"] == {"maxPerCore": 32768, "min": 131072}


def test_make_image_builds_the_tag_the_daemonset_runs() -> None:
    makefile = (DAEMONSET_DIR.parent / "Makefile").read_text()
    built = re.search(r"^IMAGE \?= (\S+)$", makefile, re.MULTILINE)
    assert built is not None and "docker build -t $(IMAGE) ." in makefile
    kustomization = yaml.safe_load((DAEMONSET_DIR / "kustomization.yaml").read_text())
    (image,) = [i for i in kustomization["images"] if i["name"] == "kproxy"]
    assert built.group(1) == f"{image['newName']}:{image['newTag']}"
    daemonset = yaml.safe_load((DAEMONSET_DIR / "daemonset.yaml").read_text())
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert container["image"] == built.group(1)

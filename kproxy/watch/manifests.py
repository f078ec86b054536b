"""The file source: Services, EndpointSlices, Nodes and ServiceCIDRs read from YAML/JSON
manifests, exactly as
`kubectl get -o yaml` prints them (multi-document YAML and `kind: List` accepted)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import structlog
import yaml

from kproxy.errors import InvalidObjectError, ManifestError
from kproxy.gcpause import gc_paused
from kproxy.model.addresses import build_allow_list
from kproxy.model.config import ProxyConfig
from kproxy.model.kinds import Kind
from kproxy.model.node import NodeInfo
from kproxy.state.cluster import ClusterState
from kproxy.state.ingest import (
    replace_all,
    set_service_cidrs,
    update_endpoint_slice,
)
from kproxy.watch.manifest_parts import split_documents

log = structlog.get_logger("kproxy.watch")
SUFFIXES = (".yaml", ".yml", ".json")
# kind -> the apiVersions kproxy understands for it.
KINDS: dict[str, tuple[str, ...]] = {  # keyed by Kind, looked up by any string
    Kind.SERVICE: ("v1",),
    Kind.ENDPOINT_SLICE: ("discovery.k8s.io/v1",),
    Kind.NODE: ("v1",),
    Kind.SERVICE_CIDR: ("networking.k8s.io/v1",),
}


@dataclass
class ConvertedSlices:
    """EndpointSlices converted as they are read, for a command that reads its manifests once:
    each document is dropped as soon as it is converted (a 5,000 x 50 cluster's slices weigh
    several times the state built from them). What they skip waits here, for
    state_from_manifests to report in its order."""

    state: ClusterState = field(default_factory=ClusterState)
    errors: list[InvalidObjectError] = field(default_factory=list)
    count: int = 0

    def add(self, obj: Mapping[str, Any]) -> None:
        self.count += 1
        try:
            self.errors += update_endpoint_slice(self.state, obj)
        except InvalidObjectError as exc:
            self.errors.append(exc)


@dataclass
class Manifests:
    """The objects found, by kind, and a warning for every document that was ignored. With
    `converted`, EndpointSlices go there instead of into `endpoint_slices`."""

    services: list[dict[str, Any]] = field(default_factory=list)
    endpoint_slices: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    service_cidrs: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    converted: ConvertedSlices | None = None

    def add(self, obj: Any, where: str) -> None:
        if not isinstance(obj, Mapping):
            self.warnings.append(f"{where}: not a Kubernetes object (expected a mapping); ignored")
            return
        kind = obj.get("kind")
        if isinstance(kind, str) and kind.endswith("List") and isinstance(obj.get("items"), list):
            for i, item in enumerate(obj["items"]):
                self.add(_with_kind(item, kind), f"{where} items[{i}]")
            return
        if not isinstance(kind, str) or kind not in KINDS:
            self.warnings.append(f"{where}: kind {kind!r} is not used by kproxy; ignored")
            return
        if obj.get("apiVersion") not in KINDS[kind]:
            self.warnings.append(
                f"{where}: {kind} apiVersion {obj.get('apiVersion')!r} is not supported "
                f"(expected {' or '.join(KINDS[kind])}); ignored"
            )
            return
        if kind == Kind.ENDPOINT_SLICE and self.converted is not None:
            self.converted.add(obj)
            return
        target = {
            Kind.SERVICE: self.services,
            Kind.ENDPOINT_SLICE: self.endpoint_slices,
            Kind.NODE: self.nodes,
            Kind.SERVICE_CIDR: self.service_cidrs,
        }[Kind(kind)]
        target.append(dict(obj))

    def extend(self, other: Manifests) -> None:
        """Add `other`'s objects and warnings after this one's (neither converting slices)."""
        if self.converted is not None or other.converted is not None:
            raise ValueError("manifests with converted EndpointSlices cannot be merged")
        self.services += other.services
        self.endpoint_slices += other.endpoint_slices
        self.nodes += other.nodes
        self.service_cidrs += other.service_cidrs
        self.warnings += other.warnings

    def holds_objects(self) -> bool:
        converted = self.converted is not None and self.converted.count > 0
        return bool(
            self.services or self.endpoint_slices or self.nodes or self.service_cidrs or converted
        )


def log_ignored_documents(manifests: Manifests, **context: str) -> None:
    """One warning per ignored document (`context`, such as file=, is bound to each)."""
    for warning in manifests.warnings:
        log.warning("manifest_document_ignored", reason=warning, **context)


def warn_empty(manifests: Manifests, path: str | Path) -> None:
    """One warning naming `path` when it holds no object kproxy reads (a file that a failed
    `kubectl get` truncated, a wrong directory): its sync would remove every rule."""
    if not manifests.holds_objects():
        log.warning(
            "manifests_empty",
            path=str(path),
            problem="no Service, EndpointSlice, Node or ServiceCIDR",
        )


def _with_kind(item: Any, list_kind: str) -> Any:
    """Items of a typed list (ServiceList) may omit kind/apiVersion; fill them in."""
    if not isinstance(item, Mapping) or list_kind == "List" or "kind" in item:
        return item
    kind = list_kind[: -len("List")]
    return {"kind": kind, "apiVersion": KINDS.get(kind, ("v1",))[0], **item}


def manifest_files(path: Path) -> list[Path]:
    return sorted(Path(p) for p in scan_manifest_files(path))


def scan_manifest_files(path: Path) -> dict[str, tuple[int, int]]:
    """Every manifest file under `path` (itself if a file) with its (mtime_ns, size). One stat
    per file and plain strings (a Path costs more than the stat): the file source runs this
    every poll, over thousands of files."""
    if path.is_file():
        st = path.stat()
        return {str(path): (st.st_mtime_ns, st.st_size)}
    if not path.is_dir():
        raise ManifestError(f"--manifests {path}: no such file or directory")
    found: dict[str, tuple[int, int]] = {}
    _walk(str(path), found, set())
    return found


def _walk(directory: str, found: dict[str, tuple[int, int]], seen: set[tuple[int, int]]) -> None:
    # Symlinked directories are followed (a ConfigMap volume is made of them), each once.
    try:
        st = os.stat(directory)
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return  # removed while being read: gone
    for entry in entries:
        try:
            if entry.is_dir():
                _walk(entry.path, found, seen)
            elif entry.name.endswith(SUFFIXES) and entry.is_file():
                est = entry.stat()
                found[entry.path] = (est.st_mtime_ns, est.st_size)
        except FileNotFoundError:
            continue


class ManifestParseError(ManifestError):
    """One manifest file that cannot be read or parsed: names the file and, where known, the
    line (1-based)."""

    def __init__(self, file: Path, line: int | None, problem: str) -> None:
        super().__init__(f"{file}: {f'line {line}' if line else '?'}: {problem}")
        self.file = file
        self.line = line
        self.problem = problem


def _unreadable(path: Path, exc: OSError | UnicodeDecodeError) -> ManifestParseError:
    reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
    return ManifestParseError(path, None, f"cannot read ({reason})")


class _TextChunks:
    """A manifest file's text handed to libyaml a chunk at a time, so that neither the whole
    text nor its UTF-8 copy is held (64 MB of a 32 MB file's peak). Named as a string source
    is: a reader error quotes the name, and reads as it did when the text was read whole."""

    name = "<unicode string>"

    def __init__(self, stream: TextIO) -> None:
        self.read: Callable[[int], str] = stream.read


def _documents(path: Path) -> Iterator[Any]:
    if path.suffix == ".json":
        yield from _json_document(path)
        return
    try:
        stream = path.open()
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    with stream:
        try:
            documents = split_documents(stream.fileno(), stream.encoding, _TextChunks(stream))
            yield from (doc for doc in documents if doc is not None)
        except (OSError, UnicodeDecodeError) as exc:
            raise _unreadable(path, exc) from exc
        except Exception as exc:
            # Text that does not decode is reported first wherever it is, as when the file
            # was read whole before its parse.
            try:
                stream.read()
            except (OSError, UnicodeDecodeError) as unreadable:
                raise _unreadable(path, unreadable) from unreadable
            error = _parse_error(path, exc)
            if error is exc:
                raise
            raise error from exc


def _json_document(path: Path) -> Iterator[Any]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _unreadable(path, exc) from exc
    try:
        yield json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _parse_error(path, exc) from exc


def _parse_error(path: Path, exc: Exception) -> Exception:
    """The ManifestParseError for `exc`, raised parsing `path`; `exc` itself if unexpected."""
    if isinstance(exc, json.JSONDecodeError):
        return ManifestParseError(path, exc.lineno, f"invalid JSON ({exc.msg})")
    if isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        line = mark.line + 1 if mark is not None else None
        return ManifestParseError(path, line, f"invalid YAML ({problem})")
    if isinstance(exc, RecursionError):  # absurdly deep nesting: the constructor recurses
        return ManifestParseError(path, None, "nested too deeply")
    return exc


def load_file(file: Path, found: Manifests | None = None) -> Manifests:
    """The objects of one manifest file (added to `found`, if given); ManifestParseError if it
    does not parse."""
    found = Manifests() if found is None else found
    with gc_paused():
        for i, doc in enumerate(_documents(file)):
            found.add(doc, f"{file} document {i + 1}")
    return found


def load_manifests(path: str | Path, convert_slices: bool = False) -> Manifests:
    """Every Service, EndpointSlice, Node and ServiceCIDR under `path`. A file that does not
    parse raises ManifestError naming the file and line; a document of another kind is only a
    warning. With `convert_slices`, the EndpointSlices are converted as they are read (see
    ConvertedSlices), for state_from_manifests."""
    found = Manifests(converted=ConvertedSlices() if convert_slices else None)
    for file in manifest_files(Path(path)):
        load_file(file, found)
    return found


def state_from_manifests(
    manifests: Manifests,
    on_invalid: Callable[[InvalidObjectError], None],
    config: ProxyConfig | None = None,
) -> ClusterState:
    """A ClusterState holding every valid Service, EndpointSlice and ServiceCIDR; invalid ones
    are reported through `on_invalid` and left out. `config` gives the allow-list of external
    addresses. The node set on it later carries the ServiceCIDRs, as in the agent.

    It consumes `manifests`' Services and EndpointSlices (their lists are left empty): their
    documents weigh more than the state built from them (86 MB of a sync's 659 MB peak at
    10,000 services, bench/memory_profile.py) and nothing reads them after."""
    converted = manifests.converted
    state = ClusterState() if converted is None else converted.state
    if config is not None:
        state.allowed_vips = build_allow_list(config.allowed_external_ip_cidrs)
    with gc_paused():
        # The errors in one order whether the slices were converted here or as read.
        errors = replace_all(Kind.SERVICE, manifests.services)(state)
        if converted is None:
            errors += replace_all(Kind.ENDPOINT_SLICE, manifests.endpoint_slices)(state)
        else:
            errors += converted.errors
            manifests.converted = None  # the state is the caller's now
        errors += set_service_cidrs(manifests.service_cidrs)(state)
    manifests.services.clear()
    manifests.endpoint_slices.clear()
    for exc in errors:
        on_invalid(exc)
    return state


def node_with_service_cidrs(node: NodeInfo, manifests: Manifests) -> NodeInfo:
    """`node` carrying the ServiceCIDRs of `manifests` exactly as the agent's node carries the
    listed ones (the same mutation, ClusterState.node). A bad one is left out here without a
    word: state_from_manifests, which every command runs as well, reports it."""
    state = ClusterState()
    state.node = node
    set_service_cidrs(manifests.service_cidrs)(state)
    return state.node or node

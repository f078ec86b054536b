"""A manifest file parsed in parts, in forked processes, yields the documents one parse of the
whole file yields, in order, and fails as that parse fails; no child outlives the read."""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.watch import manifest_parts
from kproxy.watch.manifest_parts import cut_points, part_count, split_documents
from kproxy.watch.manifest_yaml import load_documents
from kproxy.watch.manifests import ManifestParseError, _TextChunks, load_file
from tests.watch.test_manifest_yaml import TABLE, same, values

SERVICE = "apiVersion: v1\nkind: Service\nmetadata: {{name: s{0}, namespace: default}}\n" + (
    "spec: {{clusterIP: 10.0.0.{0}, ports: [{{port: 80}}]}}\n"
)


def outcome(text: str, parts: int, tmp_path: Path) -> tuple[str, Any]:
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with path.open() as stream:
        try:
            # As the file source hands it over: named as a string is.
            as_one = _TextChunks(stream)
            return "ok", list(split_documents(stream.fileno(), stream.encoding, as_one, parts))
        except Exception as exc:  # the error is part of the behaviour compared
            return type(exc).__name__, str(exc)


def whole(text: str) -> tuple[str, Any]:
    try:
        return "ok", list(load_documents(text))
    except Exception as exc:
        return type(exc).__name__, str(exc)


def check(text: str, parts: int, tmp_path: Path) -> None:
    mine, theirs = outcome(text, parts, tmp_path), whole(text)
    assert mine[0] == theirs[0], (mine, theirs)
    if mine[0] == "ok":
        assert same(mine[1], theirs[1]), (mine[1], theirs[1])
    else:
        assert mine[1] == theirs[1]


def test_cuts_fall_only_on_document_start_lines() -> None:
    text = b"a: 1\n--- x\nb: '---'\n ---\nc: ---\n---x: 1\n---\nd: 2\n---\n"
    # A share for every byte: every document start line is a cut, and nothing else.
    cuts = cut_points(text, len(text))
    assert [text[c : c + 4] for c in cuts] == [b"a: 1", b"--- ", b"---\n", b"---\n"]
    assert cuts == sorted(set(cuts))
    assert set(cut_points(text, 3)) < set(cuts)


def test_a_directive_leaves_the_file_whole() -> None:
    assert cut_points(b"a: 1\n---\n%YAML 1.1\n---\nb: 2\n", 4) == [0]
    assert cut_points(b"%YAML 1.1\n---\na: 1\n---\nb: 2\n", 4) == [0]


@pytest.mark.parametrize("parts", [2, 3, 7])
@pytest.mark.parametrize("text", TABLE.values(), ids=TABLE.keys())
def test_each_kind_of_document_reads_as_in_one_parse(text: str, parts: int, tmp_path: Path) -> None:
    # Each table entry beside others, so that the cuts fall around it.
    check(f"a: 1\n---\n{text}\n---\nb: [2]\n---\n- c\n", parts, tmp_path)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(values, min_size=1, max_size=8),
    st.sampled_from([None, True, False]),
    st.booleans(),
    st.integers(2, 6),
)
def test_dumped_documents_read_as_in_one_parse(
    tmp_path_factory: pytest.TempPathFactory,
    docs: list[Any],
    flow: bool | None,
    explicit_end: bool,
    parts: int,
) -> None:
    text = yaml.safe_dump_all(
        docs, default_flow_style=flow, allow_unicode=True, explicit_end=explicit_end
    )
    check(text, parts, tmp_path_factory.mktemp("parts"))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", ["a: [1\n", "a: 'open\n", "x: a\x07b\n", "\tb: 1\n", "- [\n"])
def test_a_broken_part_fails_as_one_parse_fails(where: str, bad: str, tmp_path: Path) -> None:
    good = [SERVICE.format(i) for i in range(9)]
    at = {"first": 0, "middle": 4, "last": 8}[where]
    text = "---\n".join([*good[:at], bad, *good[at:]])
    check(text, 3, tmp_path)


@pytest.fixture
def in_parts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every file read in two parts however small, and the forked children's pids. (Threads
    that other tests left behind do not count: the children only parse.)"""
    monkeypatch.setattr(manifest_parts, "MIN_PART_BYTES", 1)
    monkeypatch.setattr(manifest_parts.threading, "active_count", lambda: 1)
    monkeypatch.setattr(manifest_parts.os, "sched_getaffinity", lambda pid: {0, 1})
    forked: list[int] = []
    fork = os.fork

    def recording_fork() -> int:
        pid = fork()
        if pid:
            forked.append(pid)
        return pid

    monkeypatch.setattr(manifest_parts.os, "fork", recording_fork)
    yield forked
    for pid in forked:  # every child reaped
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def long_file(tmp_path: Path, tail: bytes = b"") -> Path:
    path = tmp_path / "m.yaml"
    path.write_bytes("---\n".join(SERVICE.format(i) for i in range(40)).encode() + tail)
    return path


def test_load_file_reads_in_parts_as_in_one(tmp_path: Path, in_parts: list[int]) -> None:
    path = long_file(tmp_path)
    found = load_file(path)
    assert in_parts, "read in one part"
    assert [s["metadata"]["name"] for s in found.services] == [f"s{i}" for i in range(40)]


def refusal(path: Path) -> str:
    with pytest.raises(ManifestParseError) as caught:
        load_file(path)
    return str(caught.value)


@pytest.mark.parametrize(
    "tail", [b"---\na: [1\n", b"---\nx: \xfe\n", b"---\nx: a\x07b\n", b"---\na: 'open\n"]
)
def test_an_error_in_a_later_part_is_the_one_parse_s_error(
    tmp_path: Path, in_parts: list[int], monkeypatch: pytest.MonkeyPatch, tail: bytes
) -> None:
    path = long_file(tmp_path, tail)
    in_two = refusal(path)
    assert in_parts
    monkeypatch.setattr(manifest_parts, "MAX_PARTS", 1)
    assert in_two == refusal(path)
    assert len(in_parts) == 1


def test_a_child_that_dies_leaves_the_documents_whole(
    tmp_path: Path, in_parts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def dying(*args: Any, **kwargs: Any) -> None:
        os._exit(3)  # the child, as the kernel's OOM killer would leave it

    monkeypatch.setattr(pickle, "dump", dying)
    found = load_file(long_file(tmp_path))
    assert in_parts
    assert [s["metadata"]["name"] for s in found.services] == [f"s{i}" for i in range(40)]


def test_a_read_stopped_early_reaps_its_children(tmp_path: Path, in_parts: list[int]) -> None:
    path = long_file(tmp_path)
    with path.open() as stream:
        documents = split_documents(stream.fileno(), stream.encoding, stream, 4)
        assert next(documents)["metadata"]["name"] == "s0"
        documents.close()
    assert len(in_parts) == 3  # (the fixture checks they are reaped)


@pytest.mark.parametrize("parts", [1, 3])
def test_the_file_is_parsed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parts: int
) -> None:
    parsed: list[object] = []
    real = manifest_parts.load_documents

    def counting(text: Any) -> Iterator[Any]:
        parsed.append(text)
        return real(text)

    monkeypatch.setattr(manifest_parts, "load_documents", counting)
    path = long_file(tmp_path)
    with path.open() as stream:
        docs = list(split_documents(stream.fileno(), stream.encoding, stream, parts))
    assert len(docs) == 40
    # Here: the whole file once, or the first part once (the children's parses are theirs).
    assert len(parsed) == 1


def test_one_part_while_another_thread_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest_parts.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    with monkeypatch.context() as alone:
        alone.setattr(manifest_parts.threading, "active_count", lambda: 1)
        assert part_count(64 << 20) == 3
        assert part_count(2 << 20) == 2  # none smaller than MIN_PART_BYTES
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert part_count(64 << 20) == 1
    finally:
        stop.set()
        other.join()

"""A manifest file is read a chunk at a time; what it yields, and how it is refused, is what it
was when the file was read whole before its parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from kproxy.watch.manifests import ManifestParseError, load_file

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: a, namespace: default}
spec: {clusterIP: 10.0.0.1, ports: [{port: 80}]}
"""
# Several of libyaml's read chunks.
FILLER = "".join(f"# comment line {i} to make the file long\n" for i in range(20000))


def refusal(path: Path) -> str:
    with pytest.raises(ManifestParseError) as caught:
        load_file(path)
    return str(caught.value)


@pytest.mark.parametrize("filler", ["", FILLER], ids=["short", "long"])
def test_bad_utf8_is_reported_before_a_syntax_error_that_precedes_it(
    tmp_path: Path, filler: str
) -> None:
    path = tmp_path / "a.yaml"
    path.write_bytes(b"a: [1\n" + filler.encode() + b"b: \xff\n")
    assert refusal(path) == f"{path}: ?: cannot read (not UTF-8 text)"


def test_bad_utf8_after_good_documents_refuses_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_bytes((SERVICE + "---\n" + FILLER + SERVICE + "---\n").encode() + b"x: \xfe\n")
    assert refusal(path) == f"{path}: ?: cannot read (not UTF-8 text)"


def test_a_control_character_names_the_text_as_before(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(SERVICE + FILLER + "x: a\x07b\n")
    message = refusal(path)
    assert message.startswith(f"{path}: ?: invalid YAML (unacceptable character #x0007")
    assert 'in "<unicode string>", position ' in message


def test_a_syntax_error_deep_in_a_long_file_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text(SERVICE + "---\n" + FILLER + "a: [1\n")
    assert refusal(path).startswith(f"{path}: line 20007: invalid YAML (")


def test_crlf_and_a_byte_order_mark_read_as_before(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + SERVICE.replace("\n", "\r\n").encode() + b"x: |\r\n  l\r\n")
    (service,) = load_file(path).services
    assert service["metadata"] == {"name": "a", "namespace": "default"}
    assert service["x"] == "l\n"

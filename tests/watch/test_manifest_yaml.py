"""The manifest YAML reader yields what PyYAML's safe loader yields, value for value and type
for type, and raises what it raises."""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy.watch.manifest_yaml import load_documents

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def reference(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=LOADER))


def same(a: Any, b: Any) -> bool:
    """Equal, with equal types all the way down (1, 1.0 and True differ; NaN equals NaN), and
    shared or recursive objects shared alike. Iterative: documents nest deeply."""
    stack: list[tuple[Any, Any]] = [(a, b)]
    paired: dict[int, int] = {}  # a container on one side -> its twin on the other
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, dict | list):
            if id(x) in paired:
                if paired[id(x)] != id(y):
                    return False
                continue  # compared already (or being compared: a recursive one)
            paired[id(x)] = id(y)
            if len(x) != len(y):
                return False
            if isinstance(x, dict):
                stack += [(k, j) for k, j in zip(x, y, strict=True)]
                stack += [(x[k], y[j]) for k, j in zip(x, y, strict=True)]
            else:
                stack += list(zip(x, y, strict=True))
        elif isinstance(x, float) and math.isnan(x):
            if not math.isnan(y):
                return False
        elif x != y:
            return False
    return True


def outcome(read: Any, text: str) -> tuple[str, Any]:
    try:
        return "ok", list(read(text))
    except Exception as exc:  # the error is part of the behaviour compared
        return type(exc).__name__, str(exc)


def check(text: str) -> None:
    mine, theirs = outcome(load_documents, text), outcome(reference, text)
    assert mine[0] == theirs[0], (mine, theirs)
    if mine[0] == "ok":
        assert same(mine[1], theirs[1]), (mine[1], theirs[1])
    else:
        assert mine[1] == theirs[1]


def words(text: str) -> list[str]:
    return text.split()


# YAML 1.1's spellings of each core type, as plain and as quoted scalars.
SPELLINGS = [
    *words("y Y yes Yes YES n N no No NO true True TRUE false False FALSE on On ON off Off OFF"),
    *words("~ null Null NULL"),
    "",
    *words("0 -0 +0 7 -7 +7 0o17 017 0x1F 0x1f 0b101 1_000 190:20:30 -190:20:30 08 09"),
    *words("1.5 -1.5 +1.5 1e3 1.0e3 1.0e+3 1.0E-3 .5 -.5 1_000.5 190:20:30.15 .inf -.inf +.inf"),
    *words(".Inf .INF .nan .NaN .NAN 1. 6.8523015e+5 685.230_15e+03"),
    *words("2001-12-14 2001-12-14t21:59:43.10-05:00 2001-12-14T21:59:43Z 2002-12-14 21:59:43.1"),
    "2001-12-15 2:59:43.10",
    "2001-12-14 21:59:43.10 -5",
    *words("10.0.0.1 fd00::1 ::1 TCP http svc-0 1.2.3 0.0.0.0/0 = << - a:b"),
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_scalar_spelling_reads_as_pyyaml_reads_it(spelling: str) -> None:
    for text in (
        f"a: {spelling}\n",
        f"a: '{spelling}'\n",
        f'a: "{spelling}"\n',
        f"- {spelling}\n- [{spelling}, x]\n",
        f"{spelling}: 1\n" if spelling else "x: 1\n",
        f"a: !!str {spelling}\n",
    ):
        check(text)


TABLE = {
    "empty": "",
    "empty documents": "---\n---\n...\n",
    "comment only": "# nothing\n",
    "multi-document": "a: 1\n---\nb: [1, 2]\n---\n- x\n",
    "List kind": (
        "apiVersion: v1\nkind: List\nitems:\n- kind: Service\n  apiVersion: v1\n"
        "  metadata: {name: a}\n- kind: Service\n  metadata: {name: b}\n"
    ),
    "flow style": '{a: [1, 2, {b: "c"}], d: null}\n',
    "anchors and aliases": "a: &x {k: 1}\nb: *x\nc: &y 5\nd: *y\n",
    "scalar alias as key": "a: &k key\n*k : 2\n",
    "recursive alias": "a: &x [1, *x]\n",
    "merge key": "base: &b {x: 1, y: 2}\nthis:\n  <<: *b\n  y: 3\n",
    "merge key list": "a: &a {x: 1}\nb: &b {y: 2}\nc: {<<: [*a, *b], z: 3}\n",
    "value key": "= : 1\n",
    "value as value": "a: =\n",
    "duplicate keys": "a: 1\nb: 2\na: 3\n",
    "set": "!!set {a, b}\n",
    "omap": "!!omap [a: 1, b: 2]\n",
    "pairs": "!!pairs [a: 1, a: 2]\n",
    "binary": "!!binary aGVsbG8=\n",
    "explicit core tags": "a: !!int '12'\nb: !!float '1'\nc: !!bool 'yes'\nd: !!null ''\n",
    "explicit str on a number": "a: !!str 12\nb: !!str true\n",
    "explicit map and seq": "a: !!map {x: 1}\nb: !!seq [1]\n",
    "non-specific tags": "a: ! 12\nb: ! [1, yes]\nc: ! {x: ~}\n! d: 1.5\n",
    # An alias leaves the whole document to PyYAML's constructor: every plain scalar resolved.
    "every type beside an alias": (
        "a: &x {i: 1, f: 1.5, b: yes, n: ~, d: 2001-12-14, s: text, q: '1'}\n"
        "b: *x\nc: [0x1F, .inf, 190:20:30, 2001-12-14 21:59:43.10 -5, Off, '', \"t\"]\n"
    ),
    "bad int": "a: !!int abc\n",
    "bad timestamp": "a: !!timestamp nope\n",
    "map tag on a sequence": "a: !!map [1]\n",
    "local tag": "a: !thing 1\n",
    "python tag": "a: !!python/tuple [1, 2]\n",
    "unknown global tag": "a: !<tag:example.com,2000:x> 1\n",
    "collection key": "? [a, b]\n: 1\n",
    "mapping key": "? {a: 1}\n: 1\n",
    "complex key": "? a\n: 1\n",
    "block scalars": "a: |\n  line 1\n  line 2\nb: >-\n  folded\n  text\n",
    "multi-line plain": "a: one\n  two\n",
    "quoted escapes": "a: \"\\t\\u00e9\\x41\"\nb: 'it''s'\n",
    "unicode": "名前: 値\n",
    "deep nesting": "[" * 300 + "]" * 300 + "\n",
    "deeper nesting": "[" * 900 + "]" * 900 + "\n",
    "parse error": "a: [1, 2\n",
    "scan error": "a: 'open\n",
    "tab indentation": "a:\n\tb: 1\n",
    "directive": "%YAML 1.1\n---\na: 1\n",
    "tag directive": "%TAG !e! tag:yaml.org,2002:\n---\na: !e!int '3'\n",
    "second document bad": "a: 1\n---\nb: !!int x\n",
    "null document between": "a: 1\n--- ~\n---\nb: 2\n",
    "scalar document": "--- 5\n",
    "timestamps": "a: 2001-12-14\nb: 2001-12-14 21:59:43.10 -5\nc: 2001-12-14T21:59:43Z\n",
}


@pytest.mark.parametrize("text", TABLE.values(), ids=TABLE.keys())
def test_documents_read_as_pyyaml_reads_them(text: str) -> None:
    check(text)


def test_a_shared_node_is_one_object_as_in_pyyaml() -> None:
    (doc,) = load_documents("a: &x {k: 1}\nb: *x\n")
    assert doc["a"] is doc["b"]


def test_the_memo_does_not_share_mutable_values() -> None:
    docs = list(load_documents("a: {k: 1}\nb: {k: 1}\n---\na: 2001-12-14\nb: 2001-12-14\n"))
    assert docs[0]["a"] is not docs[0]["b"]
    assert docs[1]["a"] == datetime.date(2001, 12, 14)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(SPELLINGS),
    st.dates(),
    st.datetimes(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans()), inner),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(values, min_size=1, max_size=3), st.sampled_from([None, True, False]))
def test_dumped_documents_read_as_pyyaml_reads_them(docs: list[Any], flow: bool | None) -> None:
    check(yaml.safe_dump_all(docs, default_flow_style=flow, allow_unicode=True))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([*SPELLINGS, "a:", "- ", "[", "{", "&a", "*a", "<<:", "!!str"])))
def test_scalar_soup_reads_as_pyyaml_reads_it(words: list[str]) -> None:
    check("\n".join(f"k{i}: {w}" for i, w in enumerate(words)) + "\n")
    check("- " + "\n- ".join(words) + "\n")

"""Multi-document YAML read into the same Python values as `yaml.safe_load_all`, faster.

PyYAML's constructor spends most of a large manifest's parse in Python bookkeeping per node
(state generators, a constructed-object memo, a resolver walk per scalar). Manifests hold plain
mappings, lists and scalars, so this builds those directly from the nodes libyaml composes, and
each scalar through the safe constructor's own function for its tag, once per distinct
(tag, text). A document holding anything else (a tag outside YAML's core schema, a merge key,
a node reached twice through an alias, a non-scalar key, a value its tag's constructor refuses)
is built by PyYAML's safe constructor itself, so every document reads exactly as it would
there, errors included."""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
# Scalar tags built here (by the safe constructor's function for each): their values are
# immutable, so one value may stand for every equal (tag, text).
_SCALAR_TAGS = frozenset(
    "tag:yaml.org,2002:" + name for name in ("int", "float", "bool", "null", "timestamp")
)
# Bounds the per-file memos: the frequent texts (keys, true, TCP) come first and stay; a file of
# a million distinct addresses does not keep a million entries.
_MEMO_LIMIT = 8192

ScalarBuilder = Callable[[Any, ScalarNode], Any]


class Readable(Protocol):
    """A text stream libyaml reads a chunk at a time."""

    def read(self, size: int, /) -> str: ...


class _Unusual(Exception):
    """A document this reader leaves to PyYAML's constructor."""


class _Loader(_LOADER):  # type: ignore[misc, valid-type]
    """libyaml's composer with the implicit-tag resolution of each distinct plain text made
    once. Without path resolvers (none is set by default) the resolver is a pure function of
    the node's kind, text and style: a quoted or block scalar is a string, a collection a map
    or a sequence, a plain scalar whatever its text resolves to."""

    def __init__(self, stream: str | Readable) -> None:
        super().__init__(stream)
        self._tags: dict[str, str] = {}
        self._memo_ok = not self.yaml_path_resolvers
        if self._memo_ok:
            # The composer calls these around every node; without path resolvers they do
            # nothing, and C callables that do nothing cost a tenth of the Python call.
            setattr(self, "descend_resolver", operator.is_)  # noqa: B010 (a method's place)
            setattr(self, "ascend_resolver", tuple)  # noqa: B010

    def resolve(self, kind: type[Node], value: Any, implicit: Any) -> Any:
        if not self._memo_ok:
            return super().resolve(kind, value, implicit)
        if kind is not ScalarNode:
            return self.DEFAULT_MAPPING_TAG if kind is MappingNode else self.DEFAULT_SEQUENCE_TAG
        if not implicit[0]:  # not plain: no implicit resolver applies
            return self.DEFAULT_SCALAR_TAG
        tag = self._tags.get(value)
        if tag is None:
            tag = super().resolve(kind, value, implicit)
            if len(self._tags) < _MEMO_LIMIT:
                self._tags[value] = tag
        return tag


class _Builder:
    """Python values of one file's documents, built from their nodes."""

    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        self.scalars: dict[tuple[str, str], Any] = {}
        self.strings: dict[str, str] = {}
        constructors = loader.yaml_constructors
        self.constructors: dict[str, ScalarBuilder] = {
            tag: constructors[tag] for tag in _SCALAR_TAGS if tag in constructors
        }
        self.seen: set[int] = set()

    def document(self, root: Node) -> Any:
        self.seen.clear()
        try:
            return self.build(root)
        except (_Unusual, RecursionError):
            return self.loader.construct_document(root)
        finally:
            self.seen.clear()

    def build(self, node: Node) -> Any:
        kind = type(node)
        if kind is ScalarNode:
            return self.scalar(node)  # type: ignore[arg-type]
        if id(node) in self.seen:  # an alias: PyYAML shares the object (or a recursive one)
            raise _Unusual
        self.seen.add(id(node))
        if kind is MappingNode and node.tag == _MAP:
            mapping: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if type(key_node) is not ScalarNode:
                    raise _Unusual  # a collection as a key (PyYAML refuses most)
                if key_node.tag == _STR:  # field names: one object each, across files too
                    mapping[sys.intern(key_node.value)] = self.build(value_node)
                else:  # (a merge key `<<` or value key `=` has its own tag: unusual there)
                    mapping[self.scalar(key_node)] = self.build(value_node)
            return mapping
        if kind is SequenceNode and node.tag == _SEQ:
            return [self.build(item) for item in node.value]
        raise _Unusual

    def scalar(self, node: ScalarNode) -> Any:
        tag = node.tag
        if tag == _STR:
            # One object for each frequent text (keys, `TCP`, node names): a file's documents
            # hold it hundreds of thousands of times.
            text: str = node.value
            shared = self.strings.get(text)
            if shared is None and len(self.strings) < _MEMO_LIMIT:
                self.strings[text] = shared = text
            return text if shared is None else shared
        key = (tag, node.value)
        try:
            return self.scalars[key]
        except KeyError:
            pass
        construct = self.constructors.get(tag)
        if construct is None:
            raise _Unusual
        try:
            value = construct(self.loader, node)
        except Exception:  # left to PyYAML, to raise exactly what it raises
            raise _Unusual from None
        if len(self.scalars) < _MEMO_LIMIT:
            self.scalars[key] = value
        return value


def load_documents(text: str | Readable) -> Iterator[Any]:
    """Each document of `text` (a string, or a stream of one) as `yaml.load_all(text,
    Loader=CSafeLoader)` yields it."""
    loader = _Loader(text)
    try:
        builder = _Builder(loader)
        while loader.check_node():
            yield builder.document(loader.get_node())
    finally:
        loader.dispose()

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
_MISSING = object()

ScalarBuilder = Callable[[Any, ScalarNode], Any]


class Readable(Protocol):
    """A text stream libyaml reads a chunk at a time."""

    def read(self, size: int, /) -> str: ...


class _Unusual(Exception):
    """A document this reader leaves to PyYAML's constructor."""


class _Loader(_LOADER):  # type: ignore[misc, valid-type]
    """libyaml's composer with tag resolution left to the builder. Without path resolvers (none
    is set by default) the resolver is a pure function of the node's kind, text and style: a
    quoted or block scalar is a string, a collection a map or a sequence, a plain scalar
    whatever its text resolves to. The composer calls it for every node without a tag; here
    that call only records its arguments (in a slice, made in C: a Python call per node was a
    quarter of the compose), and the builder resolves each distinct plain text once."""

    def __init__(self, stream: str | Readable) -> None:
        super().__init__(stream)
        if not self.yaml_path_resolvers:
            # The composer calls these around every node; without path resolvers they do
            # nothing, and C callables that do nothing cost a tenth of the Python call.
            setattr(self, "descend_resolver", operator.is_)  # noqa: B010 (a method's place)
            setattr(self, "ascend_resolver", tuple)  # noqa: B010
            # node.tag = slice(kind, value, implicit), for the builder to resolve
            setattr(self, "resolve", slice)  # noqa: B010


class _Builder:
    """Python values of one file's documents, built from their nodes."""

    def __init__(self, loader: _Loader) -> None:
        self.loader = loader
        self.plain: dict[str, Any] = {}  # a plain scalar's text -> its value
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
            self.resolve_tags(root)
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
        tag: Any = node.tag
        # (Scalars are built here rather than through build(): a call fewer for each.)
        if kind is MappingNode and (type(tag) is slice or tag == _MAP):
            mapping: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if type(key_node) is not ScalarNode:
                    raise _Unusual  # a collection as a key (PyYAML refuses most)
                key = self.scalar(key_node)
                if type(key) is str:  # field names: one object each, across files too
                    key = sys.intern(key)
                if type(value_node) is ScalarNode:
                    mapping[key] = self.scalar(value_node)
                else:
                    mapping[key] = self.build(value_node)
            return mapping
        if kind is SequenceNode and (type(tag) is slice or tag == _SEQ):
            scalar, build = self.scalar, self.build
            return [scalar(n) if type(n) is ScalarNode else build(n) for n in node.value]
        raise _Unusual

    def scalar(self, node: ScalarNode) -> Any:
        tag: Any = node.tag
        if type(tag) is slice:  # resolved here (see _Loader)
            if not tag.step[0]:  # not plain: no implicit resolver applies
                return self.string(node.value)
            value = self.plain.get(node.value, _MISSING)
            if value is _MISSING:
                return self.plain_scalar(node, tag.step)
            return value
        if tag == _STR:
            return self.string(node.value)
        return self.typed(node, tag)

    def string(self, text: str) -> str:
        # One object for each frequent text (keys, `TCP`, node names): a file's documents hold
        # it hundreds of thousands of times.
        shared = self.strings.get(text)
        if shared is None and len(self.strings) < _MEMO_LIMIT:
            self.strings[text] = shared = text
        return text if shared is None else shared

    def plain_scalar(self, node: ScalarNode, implicit: tuple[bool, bool]) -> Any:
        """A plain scalar not met yet (or past the memo's bound): its tag resolved by the
        resolver, its value built for that tag."""
        text: str = node.value
        tag: str = _LOADER.resolve(self.loader, ScalarNode, text, implicit)  # type: ignore[no-untyped-call]
        value = self.string(text) if tag == _STR else self.typed(node, tag)
        if len(self.plain) < _MEMO_LIMIT:  # values of these tags are immutable: shareable
            self.plain[text] = value
        return value

    def typed(self, node: ScalarNode, tag: str) -> Any:
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

    def tag(self, node: ScalarNode) -> str:
        """The scalar's tag, as the resolver would have given it."""
        tag: Any = node.tag
        if type(tag) is not slice:
            return str(tag)  # written in the document
        if not tag.step[0]:  # not plain: no implicit resolver applies
            return _STR
        resolved: str = _LOADER.resolve(self.loader, ScalarNode, node.value, tag.step)  # type: ignore[no-untyped-call]
        return resolved

    def resolve_tags(self, root: Node) -> None:
        """Give every node of a document the tag the resolver would have (before PyYAML's
        constructor builds it). Iterative: a document may nest deeper than the stack."""
        stack, seen = [root], set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            kind = type(node)
            if kind is ScalarNode:
                node.tag = self.tag(node)  # type: ignore[arg-type]
                continue
            if type(node.tag) is slice:  # type: ignore[comparison-overlap]
                node.tag = _MAP if kind is MappingNode else _SEQ
            if kind is MappingNode:
                stack += [n for pair in node.value for n in pair]
            else:
                stack += node.value


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

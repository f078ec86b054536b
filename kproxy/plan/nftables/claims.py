"""One set's or map's elements as service ports claim them. Two ports claiming one key (one
address and port) is a conflict the first port in table order wins; the others wait, so that
when the holder lets go the next one takes the key without replanning every port."""

from __future__ import annotations

from kproxy.plan.nftables.ir import Element

Order = tuple[str, ...]  # a port's place in the table: smaller comes first
ElementKey = tuple[str, ...]


class ElementClaims:
    __slots__ = ("_holder", "_waiting", "held")

    def __init__(self) -> None:
        self.held: dict[ElementKey, Element] = {}  # the winning element of each key
        self._holder: dict[ElementKey, Order] = {}
        self._waiting: dict[ElementKey, dict[Order, Element]] = {}

    def claim(self, order: Order, element: Element) -> None:
        """`order` claims the element's key (at most once while it holds a claim on it)."""
        key = element.key
        holder = self._holder.get(key)
        if holder is None:
            self.held[key] = element
            self._holder[key] = order
        elif order < holder:
            self._waiting.setdefault(key, {})[holder] = self.held[key]
            self.held[key] = element
            self._holder[key] = order
        else:
            self._waiting.setdefault(key, {})[order] = element

    def release(self, order: Order, key: ElementKey) -> None:
        """`order` gives up its claim on `key`; the first waiting claim, if any, takes it."""
        queue = self._waiting.get(key)
        if self._holder.get(key) == order:
            if queue:
                first = min(queue)
                self.held[key] = queue.pop(first)
                self._holder[key] = first
            else:
                del self.held[key]
                del self._holder[key]
        elif queue is not None:
            queue.pop(order, None)
        if queue is not None and not queue:
            del self._waiting[key]

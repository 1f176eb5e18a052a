"""The one bounded cache of the runtime: prompt encodings, input latents, CUDA graphs, execution contexts."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable


class LruCache(OrderedDict):
    """A dict that keeps the most recently used `size` entries; `on_evict(key, value)` runs for each one dropped."""

    def __init__(self, size: int, on_evict: Callable[[Hashable, Any], None] | None = None) -> None:
        super().__init__()
        self.size, self.on_evict = size, on_evict

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The cached value for key, made (and cached) on a miss; the least recently used beyond `size` is dropped."""
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            old_key, old_value = self.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old_key, old_value)
        return value

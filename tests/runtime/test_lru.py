"""LruCache: bounded, most recently used kept, eviction hook called with what it drops."""
from kontext_trt.core.lru import LruCache


def test_lru_keeps_recent_and_reports_evictions():
    dropped, made = [], []
    cache = LruCache(2, on_evict=lambda key, value: dropped.append((key, value)))

    def make(key):
        made.append(key)
        return key * 10

    assert [cache.get_or_make(k, lambda k=k: make(k)) for k in (1, 2, 1, 3)] == [10, 20, 10, 30]
    assert made == [1, 2, 3] and dropped == [(2, 20)] and list(cache) == [1, 3]
    assert cache.get_or_make(None, lambda: None) is None and dropped[-1] == (1, 10)
    assert cache.get_or_make(None, lambda: 1 / 0) is None  # a cached None is a hit, not a miss


def test_lru_without_hook():
    cache = LruCache(1)
    cache.get_or_make("a", lambda: 1)
    cache.get_or_make("b", lambda: 2)
    assert dict(cache) == {"b": 2}

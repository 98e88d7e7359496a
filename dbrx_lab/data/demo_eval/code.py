"""A small least-recently-used cache with statistics, written for evaluating the demo model."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_times: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        if total == 0:
            return 0.0
        return self.hits / total

    def mean_load_time(self) -> float:
        if not self.load_times:
            return 0.0
        return sum(self.load_times) / len(self.load_times)


class LRUCache(Generic[K, V]):
    """Keep at most `capacity` values; the least recently used one is removed first."""

    def __init__(self, loader: Callable[[K], V], capacity: int = 128) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.loader = loader
        self.capacity = capacity
        self.stats = CacheStats()
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: K) -> V:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.stats.hits += 1
                return self._data[key]
            self.stats.misses += 1
        start = time.perf_counter()
        value = self.loader(key)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.stats.load_times.append(elapsed)
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)
                self.stats.evictions += 1
        return value

    def invalidate(self, key: K) -> bool:
        with self._lock:
            return self._data.pop(key, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def word_lengths(path: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            for word in line.split():
                word = word.strip(".,;:!?").lower()
                if word:
                    counts[word] = len(word)
    return counts


if __name__ == "__main__":
    cache = LRUCache(lambda n: n * n, capacity=3)
    for number in [1, 2, 3, 1, 4, 5, 1, 2]:
        print(number, cache.get(number))
    print(f"hit rate: {cache.stats.hit_rate:.2f}, evictions: {cache.stats.evictions}")

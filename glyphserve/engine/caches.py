"""Byte-bounded LRU caches: vision features per page (document prefixes live in the KV pool)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


class ByteLRU:
    """Least-recently-used map bounded by the total size of its values in bytes."""

    def __init__(self, capacity_bytes: int, on_evict: Callable[[str, Any], None] | None = None):
        self.capacity = int(capacity_bytes)
        self.on_evict = on_evict
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> Any | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def pop(self, key: str) -> Any | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self.bytes -= item[1]
        return item[0]

    def put(self, key: str, value: Any, nbytes: int) -> bool:
        """Store ``value``; evicts least recently used entries to make room. False if it can never fit."""
        self.pop(key)
        if nbytes > self.capacity:
            return False
        while self.bytes + nbytes > self.capacity:
            old_key, (old_value, old_bytes) = self._items.popitem(last=False)
            self.bytes -= old_bytes
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(old_key, old_value)
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        return True

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def stats(self) -> dict:
        return {
            "entries": len(self._items),
            "bytes": self.bytes,
            "capacity_bytes": self.capacity,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class VisionCache:
    """Per-page vision features: a device tier, and optionally a CPU tier that receives device evictions."""

    def __init__(self, device_bytes: int, cpu_bytes: int, device: torch.device):
        self.device = device
        self.cpu = ByteLRU(cpu_bytes) if cpu_bytes > 0 and device.type != "cpu" else None
        self.gpu = ByteLRU(device_bytes, on_evict=self._demote if self.cpu is not None else None)
        self.hits = 0
        self.misses = 0

    def _demote(self, key: str, value: torch.Tensor) -> None:
        host = value.to("cpu", non_blocking=False).pin_memory()
        self.cpu.put(key, host, tensor_bytes(host))

    def get(self, key: str) -> torch.Tensor | None:
        value = self.gpu.get(key)
        if value is None and self.cpu is not None:
            host = self.cpu.pop(key)
            if host is not None:
                value = host.to(self.device, non_blocking=True)
                self.gpu.put(key, value, tensor_bytes(value))
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        self.gpu.put(key, value, tensor_bytes(value))

    def clear(self) -> None:
        self.gpu.clear()
        if self.cpu is not None:
            self.cpu.clear()

    def stats(self) -> dict:
        out = {"hits": self.hits, "misses": self.misses, "device": self.gpu.stats()}
        if self.cpu is not None:
            out["cpu"] = self.cpu.stats()
        return out

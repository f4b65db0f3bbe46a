"""Host-to-device row updates of per-slot state (block tables, sampling settings), without waiting for the step
in flight."""

from __future__ import annotations

import numpy as np
import torch


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; on CUDA through pinned memory, asynchronously (a copy from pageable memory would
    wait for the device's work in flight)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def copy_rows(dst: torch.Tensor, slots: np.ndarray | list[int], rows: np.ndarray) -> None:
    """``dst[slots] = rows`` from host arrays; on CUDA through pinned memory, asynchronously (a copy from pageable
    memory would wait for the step in flight)."""
    index, values = torch.as_tensor(np.asarray(slots, dtype=np.int64)), torch.from_numpy(np.ascontiguousarray(rows))
    if dst.device.type == "cuda":
        index, values = index.pin_memory(), values.pin_memory()
    dst.index_copy_(0, index.to(dst.device, non_blocking=True), values.to(dst.device, non_blocking=True))

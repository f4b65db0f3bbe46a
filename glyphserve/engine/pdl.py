"""Programmatic dependent launch (PDL; Hopper and later): a kernel launched with it may be scheduled while the kernel
before it on the stream still runs, and waits (``griddepcontrol.wait``) for that kernel's completion and memory
before it touches memory itself. What overlaps is the launch and the programs' start-up, ~1 us a kernel that a
decode step otherwise pays between its ~430 launches (the gaps in a CUDA graph step: 0.27 ms of 5.43 on an H200,
profile-h200-s13.md).

Our Triton kernels take a ``PDL`` flag (``pdl_enabled``): with it, every program waits first, then lets the next
kernel launch (``begin``), so no load or store of a kernel can run before the one before it has finished. The
exception is the paged attention: it launches at once after the rotation (``begin_early``) and, before it waits,
reads only what kernels before those two wrote (and prefetches keys into L2); its programs without queries leave
without waiting. Inductor launches its own Triton kernels with PDL too (``enable_for_inductor``; torch >= 2.10):
each waits before its first access to memory another kernel may have written and lets the next launch after its
loads (a kernel after an opaque op, ours included, waits before anything). Kernels of other libraries (cuBLAS,
PyTorch's own) launch as before, and a PDL kernel after one of them waits as a plain launch would.
``GLYPHSERVE_PDL=0`` (read once per process) turns it off for our kernels and Inductor's.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: CUDA on a Hopper or later card, not under Triton's
    interpreter, unless ``GLYPHSERVE_PDL=0``."""
    return device.type == "cuda" and _enabled(device.index if device.index is not None else
                                              torch.cuda.current_device())


@functools.cache
def _enabled(index: int) -> bool:
    if os.environ.get("GLYPHSERVE_PDL") == "0" or triton is None or torch.version.hip is not None:
        return False  # (ROCm: no griddepcontrol)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on"):
        return False
    return torch.cuda.get_device_capability(index) >= (9, 0)


def enable_for_inductor(device: torch.device) -> bool:
    """Have Inductor generate and launch its Triton kernels with PDL (process-wide) where ``pdl_enabled``;
    returns whether it did (torch's without the option: no)."""
    import torch._inductor.config as inductor

    if not pdl_enabled(device) or not hasattr(inductor.triton, "enable_pdl"):
        return False
    inductor.triton.enable_pdl = True
    return True


if triton is not None:

    @triton.jit
    def begin(PDL: tl.constexpr):
        """A kernel's first statement: with ``PDL``, wait for the kernel before (its completion and memory), then
        let the next one launch."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def begin_early(PDL: tl.constexpr):
        """``begin`` for a short kernel whose successor has work that needs nothing of it or of the kernel before
        it: the successor may launch at once, then this one waits (the rotation before the attention, which
        starts the keys that earlier steps wrote on their way into L2 before it waits in turn)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

"""Pages (HxWx3 uint8) to GLM-4.1V pixel patches, equal to the Hugging Face image processor's output.

The HF processor resizes (PIL bicubic, identity when both sides are already multiples of 28 and the area is
within bounds), rescales in float64, casts to float32, normalises in float32 and patchifies. Everything after
decoding runs on the device: the uint8 page crosses the bus at its original size (on a side stream, through a
pinned staging buffer), is resized there by ``resize.resize_bicubic`` (Pillow's integer arithmetic, bit for bit),
and rescale and normalise, which depend only on the 8-bit value and the channel, become a 3x256 lookup table
computed with the same numpy operations as HF's. On CUDA the resize passes and the lookup with the patch layout are
Triton kernels (``pixel_kernels``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from glyphserve.engine.resize import BICUBIC, resize_bicubic
from glyphserve.engine.transfer import to_device
from glyphserve.engine.types import EncodedPage, Page
from glyphserve.errors import ConfigError, GlyphserveError
from glyphserve.glm4v import MAX_ASPECT, MAX_PIXELS, MERGE, MIN_PIXELS, PATCH, TEMPORAL, smart_resize

try:
    import triton
except ImportError:  # the torch path only
    triton = None


@dataclass(frozen=True)
class PreprocessParams:
    patch_size: int = PATCH
    merge_size: int = MERGE
    temporal_patch_size: int = TEMPORAL
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    resample: int = BICUBIC

    @classmethod
    def from_image_processor(cls, ip) -> PreprocessParams:
        size = (
            ip.size
            if isinstance(ip.size, dict)
            else {"shortest_edge": ip.size.shortest_edge, "longest_edge": ip.size.longest_edge}
        )
        return cls(
            patch_size=int(ip.patch_size),
            merge_size=int(ip.merge_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            min_pixels=int(size["shortest_edge"]),
            max_pixels=int(size["longest_edge"]),
            rescale_factor=float(ip.rescale_factor),
            image_mean=tuple(float(x) for x in ip.image_mean),
            image_std=tuple(float(x) for x in ip.image_std),
            resample=int(ip.resample),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def fingerprint(self) -> str:
        return hashlib.blake2b(json.dumps(asdict(self), sort_keys=True).encode(), digest_size=8).hexdigest()

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, factor=self.factor, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels, temporal=self.temporal_patch_size)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of a page, as ``image_grid_thw``."""
        h, w = self.resized_shape(height, width)
        return (1, h // self.patch_size, w // self.patch_size)

    def vision_tokens(self, height: int, width: int) -> int:
        _, gh, gw = self.grid(height, width)
        return gh * gw // self.merge_size**2

    def lookup_table(self) -> np.ndarray:
        """float32 [3, 256]: HF's rescale (float64 then float32) and normalise (float32) of each 8-bit value."""
        values = np.arange(256, dtype=np.uint8).astype(np.float64) * self.rescale_factor
        values = values.astype(np.float32)[None, :]
        mean = np.array(self.image_mean, dtype=np.float32)[:, None]
        std = np.array(self.image_std, dtype=np.float32)[:, None]
        return (values - mean) / std


def check_page(page: Page, index: int) -> None:
    if not isinstance(page, EncodedPage) and (
        not isinstance(page, np.ndarray) or page.ndim != 3 or page.shape[2] != 3 or page.dtype != np.uint8
    ):
        shape = getattr(page, "shape", None)
        dtype = getattr(page, "dtype", type(page).__name__)
        raise GlyphserveError(f"page {index + 1} must be an HxWx3 uint8 RGB array, got shape {shape} of {dtype}")
    height, width = page.shape[:2]
    if min(height, width) < 1:
        raise GlyphserveError(f"page {index + 1} is empty ({width}x{height} px)")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise GlyphserveError(f"page {index + 1} is too elongated ({width}x{height} px; GLM-4.1V reads images "
                              f"whose long side is at most {MAX_ASPECT} times the short one)")


def page_digest(page: np.ndarray) -> str:
    data = np.ascontiguousarray(page)
    h = hashlib.sha256(f"{data.shape}".encode())  # SHA-NI: ~1 ms for a 840x588 page
    h.update(memoryview(data).cast("B"))
    return h.hexdigest()[:32]


PAGE_THREADS = 8  # threads that hash and decode pages, shared by every request of the process


@functools.cache
def _page_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(PAGE_THREADS, thread_name_prefix="glyphserve-page")


# A forked child inherits the pool without its threads (it would wait on them for ever): it starts its own.
os.register_at_fork(after_in_child=_page_pool.cache_clear)


def _parallel(function, pages: list[Page]) -> list:
    """``function`` over the pages in the process's page threads (hashlib and PIL's decoders release the GIL).
    One pool for the process, not one a call: starting a call's threads took ~1 ms each on the 2-core VM, most of a
    W50 request's 6 ms of planning (its 6 pages hashed in ~1 ms each). The calling thread takes pages too, one at
    a time from the same queue as the pool's threads: on an H200 host, a W200 request's 24 pages took 4 ms to hash
    in a loop but 7-18 ms in a question's planning, while the pool's idle threads woke."""
    if len(pages) < 2:
        return [function(p) for p in pages]
    out: list = [None] * len(pages)
    queue = iter(range(len(pages)))
    lock = threading.Lock()
    failed: list[tuple[int, BaseException]] = []

    def work() -> None:
        while True:
            with lock:
                i = None if failed else next(queue, None)  # after an error, no page more is begun
            if i is None:
                return
            try:
                out[i] = function(pages[i])
            except BaseException as exc:
                with lock:
                    failed.append((i, exc))
                return

    helpers = [_page_pool().submit(work) for _ in range(min(PAGE_THREADS, len(pages) - 1))]
    work()
    for helper in helpers:
        if not helper.cancel():  # one that never started (the pool busy with other calls) is not waited for
            helper.result()  # work() raises nothing: a page's error is in ``failed``
    if failed:
        raise min(failed, key=lambda f: f[0])[1]  # the error of the first page that failed
    return out


def page_key(page: Page) -> str:
    """A page's identity when the caller gave none: its encoded bytes' hash, else its pixels' (never decoded)."""
    return page.key() if isinstance(page, EncodedPage) else "pixels:" + page_digest(page)


def page_keys(pages: list[Page]) -> list[str]:
    """``page_key`` of each page, hashed in parallel (a W200 request's 24 pages, 36 MB of pixels, took 31 ms
    hashed one after another on the 2-core VM, and that was spent before its first step could run)."""
    return _parallel(page_key, pages)


def try_decode(pages: list[Page]) -> list[np.ndarray | GlyphserveError]:
    """The pages' pixels (decoded in parallel), or for a page that cannot be decoded its error: one damaged file
    does not keep the others from being read."""
    def one(page: Page):
        if not isinstance(page, EncodedPage):
            return page
        try:
            return page.pixels()
        except GlyphserveError as exc:
            return exc

    if not any(isinstance(p, EncodedPage) for p in pages):  # nothing to decode: no threads to start
        return list(pages)
    return _parallel(one, pages)


def decode_pages(pages: list[Page]) -> list[np.ndarray]:
    """The pages' pixels: encoded pages decoded (in parallel), arrays as they are; a page that cannot be decoded
    raises its error."""
    out = try_decode(pages)
    for page in out:
        if isinstance(page, GlyphserveError):
            raise page
    return out


def _as_tensor(page: np.ndarray) -> torch.Tensor:
    if not page.flags.writeable or not page.flags.c_contiguous:
        page = np.array(page)  # torch.from_numpy needs a writable, contiguous array
    return torch.from_numpy(page)


# Pages cross the bus through a pinned staging buffer of at most this many bytes (allocated at the first upload:
# 16 MiB, or twice the upload; reallocated so when a later upload is larger; uploads past it go in turns): a page
# larger than it goes from pageable memory.
STAGING_BYTES = 64 * 2**20
COPY_THREADS = 4  # host threads filling the staging buffer (numpy's copy releases the GIL)


class PagePreprocessor:
    """uint8 pages to flattened patches [sum(gh*gw), 3*T*P*P] on ``device``, in the model's dtype."""

    def __init__(self, params: PreprocessParams, device: torch.device, dtype: torch.dtype, side_stream: bool = True):
        if params.resample != BICUBIC:
            raise ConfigError(f"the image processor resamples with PIL filter {params.resample}; only bicubic "
                              f"({BICUBIC}), what GLM-4.1V uses, is reproduced on the device")
        self.params = params
        self.device = device
        self.dtype = dtype
        self.lut = torch.from_numpy(params.lookup_table()).to(device)
        self.channel_index = torch.arange(3, device=device).view(1, 3, 1, 1)
        self.copy_stream = torch.cuda.Stream(device) if side_stream and device.type == "cuda" else None
        self._staging: torch.Tensor | None = None  # pinned host bytes
        self._staged: torch.cuda.Event | None = None  # the last copy out of the staging buffer
        self._copiers: ThreadPoolExecutor | None = None

    def upload(self, pages: list[Page]) -> list[torch.Tensor]:
        """Decode encoded pages and move the uint8 pages, at their own size, to the device (on a side stream,
        through the staging buffer). One thread at a time (the engine's)."""
        host = decode_pages(pages)
        if self.device.type != "cuda":
            return [_as_tensor(p) for p in host]
        if self.copy_stream is None:
            return [_as_tensor(p).to(self.device) for p in host]
        main = torch.cuda.current_stream(self.device)
        out: list[torch.Tensor | None] = [None] * len(host)
        # On a side stream that waits for nothing, so the copies run at once even while the main stream has steps
        # queued. Through a pinned buffer kept for the process, filled by a few host threads: on an H200 host
        # W200's 24 pages (36 MB) took 4-5 ms from pageable memory (and 3.4 ms more where a read-only page was
        # copied first), 2.5 ms so, and pinning each request's pages took longer than either (thirteenth
        # session: new pinned blocks of new sizes).
        batch: list[int] = []
        staged = 0  # bytes of the pages in batch
        for i, page in enumerate(host):
            if page.nbytes > STAGING_BYTES:
                out[i] = self._copy_pageable(page, main)
                continue
            if staged + page.nbytes > STAGING_BYTES:
                self._copy_staged(host, batch, out, main)
                batch, staged = [], 0
            batch.append(i)
            staged += page.nbytes
        if batch:
            self._copy_staged(host, batch, out, main)
        main.wait_stream(self.copy_stream)
        return out

    def _copy_pageable(self, page: np.ndarray, main) -> torch.Tensor:
        with torch.cuda.stream(self.copy_stream):
            dev = _as_tensor(page).to(self.device, non_blocking=True)
            dev.record_stream(main)
        return dev

    def _copy_staged(self, host: list[np.ndarray], batch: list[int], out: list, main) -> None:
        """The pages ``host[i]`` for ``i`` in ``batch`` (at most STAGING_BYTES together) into ``out[i]``."""
        offsets = np.cumsum([0] + [host[i].nbytes for i in batch])
        total = int(offsets[-1])
        if self._staging is None or self._staging.numel() < total:
            size = min(STAGING_BYTES, max(2 * total, 16 * 2**20))
            self._staging = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._staged = None
        if self._staged is not None:
            self._staged.synchronize()  # the copy out of it before (long done unless the batches come in turns)
        flat = self._staging.numpy()

        def put(j: int) -> None:
            np.copyto(flat[offsets[j] : offsets[j + 1]].reshape(host[batch[j]].shape), host[batch[j]])

        if len(batch) > 1:
            if self._copiers is None:
                self._copiers = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="glyphserve-pages")
            list(self._copiers.map(put, range(len(batch))))
        else:
            put(0)
        with torch.cuda.stream(self.copy_stream):
            dev = self._staging[:total].to(self.device, non_blocking=True)
            dev.record_stream(main)
            self._staged = torch.cuda.Event()
            self._staged.record(self.copy_stream)
        for j, i in enumerate(batch):
            out[i] = dev[offsets[j] : offsets[j + 1]].view(host[i].shape)

    def patchify(self, pages: list[torch.Tensor]) -> torch.Tensor:
        """Device uint8 pages (HxWx3, as uploaded) to patches: resized to the processor's size, normalised and
        patchified, pages of one shape together (on CUDA each shape's pages in Triton launches: one a resize pass
        that changes a side, one for the lookup and the patch layout: ``pixel_kernels``)."""
        p, m, t = self.params.patch_size, self.params.merge_size, self.params.temporal_patch_size
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, page in enumerate(pages):
            by_shape.setdefault(tuple(page.shape[:2]), []).append(i)
        if self.device.type == "cuda" and triton is not None:
            from glyphserve.engine.pixel_kernels import patchify

            grids = [self.params.grid(*page.shape[:2]) for page in pages]
            starts = np.cumsum([0] + [gh * gw for _, gh, gw in grids])
            out = torch.empty((int(starts[-1]), 3 * t * p * p), dtype=self.dtype, device=self.device)
            for shape, idx in by_shape.items():
                batch = resize_bicubic(torch.stack([pages[i] for i in idx]), *self.params.resized_shape(*shape))
                rows = to_device(starts[idx].astype(np.int64), self.device)  # not waiting for the tower's batch before
                patchify(batch, self.lut, out, rows, p, m, t)
            return out
        chunks: list[torch.Tensor | None] = [None] * len(pages)
        for shape, idx in by_shape.items():
            height, width = self.params.resized_shape(*shape)
            batch = resize_bicubic(torch.stack([pages[i] for i in idx]), height, width)
            batch = batch.permute(0, 3, 1, 2).long()  # N,3,H,W
            x = self.lut[self.channel_index, batch]  # float32, HF's values
            n, gh, gw = len(idx), height // p, width // p
            x = x.reshape(n, 3, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
            x = x.unsqueeze(6).expand(n, gh // m, gw // m, m, m, 3, t, p, p)
            x = x.reshape(n, gh * gw, 3 * t * p * p).to(self.dtype)
            for j, i in enumerate(idx):
                chunks[i] = x[j]
        return torch.cat(chunks, dim=0)

    def __call__(self, pages: list[Page]) -> torch.Tensor:
        return self.patchify(self.upload(pages))

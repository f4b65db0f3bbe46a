"""The images of a request, sent as ``data:`` URLs: read from their headers, every limit checked before any
pixel is decoded. Nothing is ever fetched or opened.

Each image becomes an :class:`EncodedPage` (its file bytes, size and type); the engine decodes it only when
the page's vision features are not cached (keyed by the file's bytes, so a stored page and the same file sent
here share them), so what a request may make the engine decode is bounded by ``max_decoded_bytes``, and a
refused request decodes nothing. An image seen for the first
time is decoded once here, after the limits, and dropped: a file whose header reads but whose pixels do not
must fail its own request here, not inside a batch that other requests share.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

from glyphserve.engine.types import EncodedPage
from glyphserve.serve.errors import ImageLimitError, InvalidRequestError

# Decoders that only read pixels (no EPS, which runs Ghostscript, nor other exotic formats).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_REMEMBERED = 4096  # images known to decode, by a hash of their bytes (a front sends a document's pages each time)


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 256  # image_url parts in one request
    # width x height of one image, from its header (the model reads at most ~5.9 Mpx of it, glm4v.MAX_PIXELS over
    # TEMPORAL: a larger image is scaled down to that)
    max_pixels: int = 25_000_000
    max_decoded_bytes: int = 256 * 2**20  # width x height x 3 summed over a request's images


def read_images(urls: list[str], limits: ImageLimits) -> list[EncodedPage]:
    """The images as pages, every limit checked before any is decoded."""
    if len(urls) > limits.max_images:
        raise ImageLimitError(
            f"the request holds {len(urls)} images, over this server's limit of {limits.max_images} "
            "(--max-images)", param="messages"
        )
    pages, total = [], 0
    for number, url in enumerate(urls, 1):
        page = read_image(url, number, limits.max_pixels)
        total += page.width * page.height * 3
        if total > limits.max_decoded_bytes:
            raise ImageLimitError(
                f"the request's images would decode to more than {limits.max_decoded_bytes / 2**20:g} MiB of pixels, "
                "this server's limit (--max-image-mb)", param="messages"
            )
        pages.append(page)
    for number, page in enumerate(pages, 1):
        _DECODABLE.check(page, number)
    return pages


class _Decodable:
    """Hashes of images that decoded fully, the least recently used forgotten first."""

    def __init__(self, size: int):
        self.size = size
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, page: EncodedPage, number: int) -> None:
        key = hashlib.sha256(page.data).hexdigest()
        with self._lock:
            if key in self._keys:
                self._keys.move_to_end(key)
                return
        try:
            with Image.open(io.BytesIO(page.data), formats=FORMATS) as image:
                image.load()
        except Exception:  # truncated or corrupt pixel data behind a readable header
            raise InvalidRequestError(f"image {number} is damaged: its pixels cannot be decoded",
                                      param="messages") from None
        with self._lock:
            self._keys[key] = None
            while len(self._keys) > self.size:
                self._keys.popitem(last=False)


_DECODABLE = _Decodable(_REMEMBERED)


def read_image(url: str, number: int = 1, max_pixels: int = ImageLimits.max_pixels) -> EncodedPage:
    """Image ``number`` of a request from a ``data:image/...;base64,`` URL, its header read, nothing decoded."""
    if not url.startswith("data:"):
        raise InvalidRequestError(
            "image_url must be a data: URL (data:image/png;base64,...); this server never fetches URLs or opens paths",
            param="messages")
    header, _, payload = url.partition(",")
    if ";base64" not in header or not header[5:].startswith("image/"):
        raise InvalidRequestError("image_url data URLs must be base64-encoded images (data:image/png;base64,...)",
                                  param="messages")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"image {number} holds invalid base64", param="messages") from None
    limit = f"this server's limit of {max_pixels / 1e6:g} megapixels per image (--max-image-mpx)"
    try:
        with Image.open(io.BytesIO(raw), formats=FORMATS) as image:
            width, height, mime = image.width, image.height, Image.MIME.get(image.format, "image/png")
    except Image.DecompressionBombError:  # PIL's own ceiling, far above ours
        raise ImageLimitError(f"image {number} is over {limit}", param="messages") from None
    except Exception:  # PIL fails in many ways on damaged headers
        raise InvalidRequestError(
            f"image {number} is not a readable image (accepted: {', '.join(FORMATS)})", param="messages"
        ) from None
    if width * height > max_pixels:
        raise ImageLimitError(f"image {number} is {width}x{height} px, over {limit}", param="messages")
    if min(width, height) < 1:
        raise InvalidRequestError(f"image {number} is empty ({width}x{height} px)", param="messages")
    return EncodedPage(raw, height, width, mime)

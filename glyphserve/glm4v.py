"""Facts about GLM-4.1V (the model Glyph fine-tunes) that every layer shares: its control tokens, the stop and
reasoning tokens, how its image processor sizes a page and what a page costs in vision tokens, and its chat
format. Pure Python (no torch, no transformers), so render, engine and the remote client import it alike.
"""

from __future__ import annotations

import math
from importlib import resources

# Control tokens, in the order of the real vocabulary (ids 151329 onwards there).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",
    "<|video|>",
    "<|begin_of_box|>",
    "<|end_of_box|>",
)
IMAGE_TOKEN, IMAGE_BEGIN_TOKEN, IMAGE_END_TOKEN = "<|image|>", "<|begin_of_image|>", "<|end_of_image|>"
# Generation ends at any of these (Glyph's generation_config lists them as eos).
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")
# Glyph's reasoning markers: plain added tokens (they survive decoding), splitting thinking from the answer.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAG_TOKENS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# The image processor: 14 px patches merged 2x2, so one token per 28x28 block; a page is resized to multiples
# of 28 between these pixel bounds (a still image counts twice for the temporal patch of 2).
PATCH = 14
MERGE = 2
FACTOR = PATCH * MERGE
TEMPORAL = 2
MIN_PIXELS = 112 * 112
MAX_PIXELS = 28 * 28 * 15000
MAX_ASPECT = 200
# Each page in a prompt costs its vision tokens plus <|begin_of_image|> and <|end_of_image|>.
PAGE_MARKER_TOKENS = 2
# The chat format's own tokens (glm4v_chat_template.jinja): "[gMASK]<sop>" and the answer's "<|assistant|>\n" in
# every prompt, "<|role|>\n" before each message (a question alone: 6 tokens around its text).
PROMPT_TOKENS = 4
MESSAGE_TOKENS = 2


def smart_resize(height: int, width: int, *, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS, temporal: int = TEMPORAL) -> tuple[int, int]:
    """(height, width) the processor resizes a page to: Hugging Face's ``smart_resize`` for a still image."""
    if height <= 0 or width <= 0:
        raise ValueError("image size must be positive")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if temporal * h_bar * w_bar > max_pixels:
        beta = math.sqrt(temporal * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif temporal * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (temporal * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def vision_tokens(height: int, width: int) -> int:
    """Vision tokens GLM-4.1V spends on a page of ``height`` x ``width`` pixels (rows first, as an array's shape
    and every other page size in the engine; a PIL size is the other way round)."""
    h, w = smart_resize(height, width)
    return (h // FACTOR) * (w // FACTOR)


def chat_template() -> str:
    """GLM-4.1V's chat format as a Jinja template (pages open the first user turn; assistant history keeps only
    the answer)."""
    return resources.files("glyphserve").joinpath("glm4v_chat_template.jinja").read_text(encoding="utf-8")

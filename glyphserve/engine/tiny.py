"""GLM-4.1V architecture definitions: a tiny random checkpoint for tests and the full-size config for benchmarks.

The tiny checkpoint has the real structure (partial rotary 0.5, M-RoPE sections, vision patch 14, merge 2,
temporal patch 2), a byte-level BPE tokenizer with GLM-4.1V's special tokens, a PIL image processor and the
chat template, all written with ``save_pretrained`` so it loads through the same ``from_pretrained`` path as
the real Glyph checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from glyphserve.errors import ConfigError
from glyphserve.glm4v import (IMAGE_BEGIN_TOKEN, IMAGE_END_TOKEN, IMAGE_TOKEN, MAX_PIXELS, MERGE, MIN_PIXELS, PATCH,
                              SPECIAL_TOKENS, STOP_TOKENS, TAG_TOKENS, TEMPORAL, chat_template)

FULL_SIZE_VOCAB = 151552

_TRAINING_TEXT = """\
Glyph renders long text into compact page images and a vision-language model reads them.
The quick brown fox jumps over the lazy dog. Little Red Riding Hood walked through the forest
to visit her grandmother, who lived in a small house beyond the river. The wolf ran ahead,
knocked on the door and pretended to be the girl. Question: who pretended to be the grandmother?
Answer: the wolf. Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14; dates, names and places.
Chapter one. It was the best of times, it was the worst of times, it was the age of wisdom.
The report shows revenue of 42 million dollars in the third quarter, up 7 percent from last year.
"""


def build_tokenizer():
    """A small byte-level BPE tokenizer with GLM-4.1V's special tokens, trained deterministically in memory."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=STOP_TOKENS[0],
        pad_token=STOP_TOKENS[0],
        padding_side="left",
        chat_template=chat_template(),
    )


def build_image_processor():
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    return Glm4vImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})


def _token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids(IMAGE_TOKEN),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids(IMAGE_BEGIN_TOKEN),
        image_end_token_id=ids(IMAGE_END_TOKEN),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
    )


def _config(tokenizer, text: dict, vision: dict):
    from transformers import Glm4vConfig

    text_defaults = dict(
        hidden_act="silu",
        rms_norm_eps=1e-5,
        attention_bias=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS],
    )
    vision_defaults = dict(patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3,
                           image_size=336)
    cfg = Glm4vConfig(
        text_config={**text_defaults, **text},
        vision_config={**vision_defaults, **vision},
        tie_word_embeddings=False,
        **_token_ids(tokenizer),
    )
    cfg.architectures = ["Glm4vForConditionalGeneration"]
    return cfg


def tiny_config(tokenizer):
    head_dim = 32  # partial rotary 0.5 -> 16 rotary dims -> 8 frequencies split 2/3/3 like 8/12/12
    return _config(
        tokenizer,
        text=dict(
            vocab_size=len(tokenizer),
            hidden_size=4 * head_dim,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            initializer_range=0.5,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [2, 3, 3],
            },
        ),
        vision=dict(
            depth=2,
            hidden_size=64,
            num_heads=4,
            intermediate_size=128,
            out_hidden_size=4 * head_dim,
            initializer_range=0.5,
        ),
    )


def glm41v_9b_config(tokenizer):
    """GLM-4.1V-9B / Glyph sizes, with token ids taken from ``tokenizer`` (only ids matter for random weights)."""
    return _config(
        tokenizer,
        text=dict(
            vocab_size=FULL_SIZE_VOCAB,
            hidden_size=4096,
            intermediate_size=13696,
            num_hidden_layers=40,
            num_attention_heads=32,
            num_key_value_heads=2,
            max_position_embeddings=65536,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": [8, 12, 12],
            },
        ),
        vision=dict(depth=24, hidden_size=1536, num_heads=12, intermediate_size=13696, out_hidden_size=4096),
    )


RANDOM_WEIGHT_CONFIGS = {"glm-4.1v-9b": glm41v_9b_config}


# What make_tiny_model writes: a folder holding anything else (a real checkpoint's shards, documents) is refused.
TINY_FILES = frozenset({"chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
                        "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                        "video_preprocessor_config.json"})


def make_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random GLM-4.1V checkpoint (model, generation config, tokenizer, processor) to ``path``: a new
    folder, an empty one or one holding an earlier tiny checkpoint (replaced), else a ConfigError before writing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file: give a folder for the checkpoint")
    others = sorted(p.name for p in path.iterdir() if p.name not in TINY_FILES) if path.is_dir() else []
    if others:
        raise ConfigError(f"{path} already holds other files ({', '.join(others[:3])}"
                          f"{', ...' if len(others) > 3 else ''}): give a new or empty folder")

    import torch
    from transformers import GenerationConfig, Glm4vForConditionalGeneration
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    cfg = tiny_config(tokenizer)
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=cfg.text_config.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(path)
    # The processor's parts, saved one by one (Glm4vProcessor itself cannot be built without torchvision);
    # processor_class in tokenizer_config.json lets AutoProcessor assemble them where torchvision exists.
    tokenizer._set_processor_class("Glm4vProcessor")
    tokenizer.save_pretrained(path)
    build_image_processor().save_pretrained(path)
    Glm4vVideoProcessor().save_pretrained(path)
    return path

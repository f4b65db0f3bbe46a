"""The tiny checkpoint has GLM-4.1V's structure and loads through the same from_pretrained path as Glyph."""

from __future__ import annotations

import json

import pytest

from glyphserve.glm4v import SPECIAL_TOKENS, STOP_TOKENS, TAG_TOKENS


def test_files_and_config_structure(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "chat_template.jinja",
    } <= names
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["model_type"] == "glm4v" and cfg["architectures"] == ["Glm4vForConditionalGeneration"]
    text, vision = cfg["text_config"], cfg["vision_config"]
    rope = text["rope_parameters"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert rope["partial_rotary_factor"] == 0.5
    assert sum(rope["mrope_section"]) * 2 == int(head_dim * rope["partial_rotary_factor"])
    assert text["attention_bias"] is True and text["num_key_value_heads"] < text["num_attention_heads"]
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (14, 2, 2)
    assert vision["out_hidden_size"] == text["hidden_size"]


def test_token_ids_are_consistent(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + TAG_TOKENS}
    assert len(set(ids.values())) == len(ids) and tok.unk_token_id not in ids.values()
    assert cfg.image_token_id == ids["<|image|>"]
    assert (cfg.image_start_token_id, cfg.image_end_token_id) == (ids["<|begin_of_image|>"], ids["<|end_of_image|>"])
    assert cfg.text_config.vocab_size == len(tok)
    gen = GenerationConfig.from_pretrained(tiny_model_dir)
    assert sorted(gen.eos_token_id) == sorted(ids[t] for t in STOP_TOKENS)
    # special tokens are single tokens; text around them tokenises normally
    assert tok("[gMASK]<sop><|user|>\nhi<|assistant|>", add_special_tokens=False)["input_ids"][:3] == [
        ids["[gMASK]"],
        ids["<sop>"],
        ids["<|user|>"],
    ]
    assert tok.decode(tok("<think>a</think><answer>b</answer>")["input_ids"]) == "<think>a</think><answer>b</answer>"


def test_chat_template_renders_the_glm_format(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Who?"}]},
        {"role": "assistant", "content": "<think>the wolf is sly</think><answer>The wolf.</answer>"},
        {"role": "user", "content": "Why?"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = "<|begin_of_image|><|image|><|end_of_image|>"
    assert text == (
        f"[gMASK]<sop><|system|>\nBe brief.<|user|>\n{image}{image}Who?"
        "<|assistant|>\n<answer>The wolf.</answer><|user|>\nWhy?<|assistant|>\n"
    )


def test_loads_without_torchvision_and_is_seeded(tiny_model_dir, tmp_path):
    import torch
    from transformers import Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from glyphserve.engine import make_tiny_model

    ip = Glm4vImageProcessorPil.from_pretrained(tiny_model_dir)
    assert (ip.patch_size, ip.merge_size, ip.temporal_patch_size) == (14, 2, 2)
    make_tiny_model(tmp_path / "again")
    make_tiny_model(tmp_path / "again")  # an earlier tiny checkpoint is replaced
    a = Glm4vForConditionalGeneration.from_pretrained(tiny_model_dir).state_dict()
    b = Glm4vForConditionalGeneration.from_pretrained(tmp_path / "again").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_holding_anything_else_is_refused_before_writing(tiny_model_dir, tmp_path):
    from glyphserve.engine import make_tiny_model
    from glyphserve.engine.tiny import TINY_FILES
    from glyphserve.errors import ConfigError

    assert {p.name for p in tiny_model_dir.iterdir()} == TINY_FILES  # what the check lets a rerun replace
    real = tmp_path / "glyph"
    real.mkdir()
    for name in ("config.json", "model-00001-of-00004.safetensors", "model.safetensors.index.json"):
        (real / name).write_text("{}")
    with pytest.raises(ConfigError, match=r"glyph already holds other files \(model-00001-of-00004.safetensors, "
                                          r"model.safetensors.index.json\): give a new or empty folder"):
        make_tiny_model(real)
    assert (real / "config.json").read_text() == "{}"
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt is a file: give a folder"):
        make_tiny_model(tmp_path / "notes.txt")

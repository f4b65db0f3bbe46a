"""Engine fixtures: the tiny checkpoint, loaded engines, and the plain Hugging Face path as the reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from glyphserve.bench.probe import hf_inputs


def make_pages(shapes, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


@dataclass
class Reference:
    """Processor + ``model.generate``, exactly as Glyph's model card uses them."""

    model: object
    processor: object

    def inputs(self, pages, question, history=()):
        return hf_inputs(self.processor, pages, question, history, device="cpu")

    def generate(self, pages, question, history=(), max_new_tokens=16, ignore_eos=False):
        """(generated ids incl. a stop token, per-step logits)."""
        inputs = self.inputs(pages, question, history)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if ignore_eos else None,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        return out.sequences[0, inputs["input_ids"].shape[1] :].tolist(), out.logits


@pytest.fixture(scope="session")
def reference(tiny_model_dir) -> Reference:
    from transformers import AutoTokenizer, Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from glyphserve.bench.probe import hf_processor

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    processor = hf_processor(tokenizer, Glm4vImageProcessorPil.from_pretrained(tiny_model_dir))
    model = Glm4vForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    return Reference(model, processor)


@pytest.fixture
def load_engine(tiny_model_dir):
    """Factory for fresh engines on the tiny model (fp32, CPU), short prefills run as graph rows as on CUDA (the
    CPU's default is the eager pass)."""
    from glyphserve.engine import Engine, EngineConfig

    def load(**overrides):
        return Engine.load(EngineConfig(**{"model": str(tiny_model_dir), "device": "cpu", "dtype": "float32",
                                           "graph_prefill": True, **overrides}))

    return load

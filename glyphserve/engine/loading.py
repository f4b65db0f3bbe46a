"""Loading a GLM-4.1V checkpoint (local directory or Hugging Face id) or building random full-size weights."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from glyphserve.engine.tiny import RANDOM_WEIGHT_CONFIGS, build_image_processor, build_tokenizer
from glyphserve.glm4v import chat_template
from glyphserve.engine.types import NOT_A_MODEL, EngineConfig, is_hub_id
from glyphserve.errors import ConfigError, ModelLoadError

SUPPORTED_MODEL_TYPES = ("glm4v",)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: object  # Glm4vForConditionalGeneration, eval mode, on device
    tokenizer: object
    image_processor: object  # Glm4vImageProcessorPil: identical pixels with or without torchvision
    chat_template: str
    name: str  # identity for cache keys
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but no CUDA GPU is available (use --device cpu)")
    if name not in ("cuda", "cpu"):
        raise ConfigError(f"unknown device {name!r} (auto, cuda or cpu)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r} (auto, bfloat16, float16 or float32)")
    return DTYPES[name]


def attention_implementation(device: torch.device) -> str:
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load(config: EngineConfig) -> LoadedModel:
    """The model on ``config.device``; with ``quantize``, the weights the model runner quantizes (the decoder
    layers' projections, the head and the embedding table) on the host, from where the runner moves each to the
    device as it quantizes it, so a checkpoint never sits on the device whole in 16 bits (loading it whole and
    quantizing there peaked at 27.1 GiB on an H200, more than the 24 GB cards FP8 is for). Random weights are drawn
    on the device (drawing 10 billion on the host is slow), so building them peaks at the 16-bit model's size
    there."""
    if (config.model is None) == (config.random_weights is None):
        raise ConfigError("give exactly one of a model (path or Hugging Face id) or random_weights")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    host = torch.device("cpu")
    if config.random_weights is not None:
        loaded = _random(config, device, dtype)
    else:
        loaded = _pretrained(config.model, device, dtype, host if config.quantize else device)
    if config.quantize:
        try:
            place(loaded.model, device, held_on=host)
        except RuntimeError as exc:  # out of device memory, above all
            raise ModelLoadError(f"cannot place the model on {device}: {_first_line(exc)}") from exc
    return loaded


def quantized_modules(model) -> list:
    """The modules whose weights ``--quantize`` turns to FP8: each decoder layer's q, k, v, o, gate_up and down
    projections, the head and the token embedding table."""
    out = [model.lm_head, model.model.language_model.embed_tokens]
    for layer in model.model.language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]
    return out


def place(model, device: torch.device, held_on: torch.device) -> None:
    """Every parameter and buffer on ``device``, except the weights of ``quantized_modules`` (not their
    biases), which go to ``held_on``."""
    held = {id(m.weight) for m in quantized_modules(model)}
    moved: dict[int, torch.nn.Parameter] = {}  # a parameter shared by modules stays shared
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in moved:
                where = held_on if id(param) in held else device
                moved[id(param)] = torch.nn.Parameter(param.data.to(where), requires_grad=param.requires_grad)
            module._parameters[name] = moved[id(param)]
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # what moved off the device


def _random(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import Glm4vForConditionalGeneration

    builder = RANDOM_WEIGHT_CONFIGS.get(config.random_weights)
    if builder is None:
        names = ", ".join(RANDOM_WEIGHT_CONFIGS)
        raise ConfigError(f"unknown random-weights preset {config.random_weights!r} (choose {names})")
    tokenizer = build_tokenizer()
    cfg = builder(tokenizer)
    cfg._attn_implementation = attention_implementation(device)
    torch.manual_seed(config.seed)
    with torch.device(device):
        model = Glm4vForConditionalGeneration._from_config(cfg, dtype=dtype)
    return LoadedModel(
        model=model.eval(),
        tokenizer=tokenizer,
        image_processor=build_image_processor(),
        chat_template=chat_template(),
        name=f"random:{config.random_weights}:seed{config.seed}",
        device=device,
        dtype=dtype,
    )


def _pretrained(name: str, device: torch.device, dtype: torch.dtype, stage: torch.device) -> LoadedModel:
    """Loaded onto ``stage`` (the host, or ``device`` itself), for ``device``."""
    from transformers import AutoConfig, AutoTokenizer, Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    where = "directory" if Path(name).exists() else "Hugging Face model"
    if where != "directory" and not is_hub_id(name):
        # a path, not an organisation/name id: the Hub's own message ("Repo id must be in the form") misleads
        raise ModelLoadError(f"{name}: {NOT_A_MODEL}")
    try:
        cfg = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the model config of {where} {name!r}: {_first_line(exc)}") from exc
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{name!r} is a {cfg.model_type!r} checkpoint; glyphserve needs a GLM-4.1V "
            "(Glm4vForConditionalGeneration) checkpoint such as zai-org/Glyph"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        image_processor = Glm4vImageProcessorPil.from_pretrained(name)
        # Straight onto the GPU where accelerate can place it; otherwise load on the CPU and move.
        placement = {"device_map": str(stage)} if _direct_placement(stage) else {}
        model = Glm4vForConditionalGeneration.from_pretrained(
            name, dtype=dtype, attn_implementation=attention_implementation(device), **placement
        ).to(stage)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load {where} {name!r}: {_first_line(exc)}") from exc
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else chat_template()
    return LoadedModel(
        model=model.eval(),
        tokenizer=tokenizer,
        image_processor=image_processor,
        chat_template=template,
        name=str(Path(name).resolve()) if where == "directory" else name,
        device=device,
        dtype=dtype,
    )


def _direct_placement(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("accelerate") is not None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

"""``glyphserve doctor``: what the service will find on this machine, and what each gap means."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from glyphserve.serve.weights import locate_weights

DEFAULT_MODEL = "zai-org/Glyph"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    meaning: str = ""  # what it means when not ok
    required: bool = False  # a failed required check makes doctor exit 1


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_gpu() -> list[Check]:
    checks = []
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(f"{i}: {pynvml.nvmlDeviceGetName(handle)} ({memory.total / 2**30:.0f} GiB, "
                        f"{memory.used / 2**30:.1f} GiB used)")
        checks.append(Check("NVIDIA driver (NVML)", True,
                            f"driver {driver}, CUDA {cuda // 1000}.{cuda % 1000 // 10}; " + "; ".join(gpus)))
    except ImportError:
        checks.append(Check("NVIDIA driver (NVML)", False, "nvidia-ml-py is not installed",
                            "GPU metrics are missing from /metrics; `pip install nvidia-ml-py` adds them"))
    except Exception as exc:
        checks.append(Check("NVIDIA driver (NVML)", False, f"no NVIDIA driver or GPU ({type(exc).__name__})",
                            "no GPU metrics; a model would run on the CPU"))
    try:
        import torch

        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            checks.append(Check("CUDA (torch)", True, f"CUDA {torch.version.cuda}: {names}"))
        else:
            built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            checks.append(Check("CUDA (torch)", False, f"no usable GPU (torch is {built})",
                                "--model runs on the CPU: fine for tiny test models, far too slow for Glyph (9B); "
                                "the extractive backend is unaffected"))
    except ImportError:
        pass
    return checks


def check_libraries() -> list[Check]:
    checks = []
    for package, meaning in (
        ("torch", "no model can be loaded (--model fails); the extractive backend still works"),
        ("transformers", "no model can be loaded (--model fails); the extractive backend still works"),
        ("fastapi", "`glyphserve serve` cannot start"),
        ("uvicorn", "`glyphserve serve` cannot start"),
        ("gradio", "`glyphserve serve` cannot start (the web UI needs it; --no-ui serves the API alone)"),
        ("prometheus-client", "`glyphserve serve` cannot start (/metrics needs it)"),
    ):
        version = _version(package)
        required = package in ("fastapi", "uvicorn", "prometheus-client")
        checks.append(Check(package, version is not None, version or "not installed", meaning, required))
    return checks


def check_fonts() -> list[Check]:
    """The font each preset renders with, and whether it is Glyph's own (from a clone of the
    official repository named by GLYPHSERVE_GLYPH_REPO) or a free substitute."""
    from glyphserve.errors import GlyphserveError
    from glyphserve.render import GLYPH_REPO_ENV, resolve_config
    from glyphserve.render.fonts import resolve_font

    checks = []
    for label, preset_name, sample, official in (("English font", "glyph-en", "Hello", "Verdana"),
                                                 ("Chinese font", "glyph-zh", "你好", "Source Han Sans HW SC")):
        try:
            resolved = resolve_font(resolve_config(sample, preset=preset_name).font_path)
        except GlyphserveError as exc:
            checks.append(Check(label, False, exc.message, f"{preset_name} documents ({sample}…) cannot be rendered", True))
            continue
        used = resolved.manifest()
        detail = f"{preset_name}: {used['name']} ({used['used']})"
        if not resolved.substitute:
            checks.append(Check(label, True, detail))
            checks.append(Check(f"official {official}", True, f"present: {preset_name} pages are Glyph's own"))
            continue
        checks.append(Check(label, True, detail + f", a free substitute for {official}"))
        checks.append(Check(
            f"official {official}", False,
            f"not present ({GLYPH_REPO_ENV} does not name a clone of https://github.com/thu-coai/Glyph, "
            "whose config/ folder ships it)",
            f"{preset_name} pages are set in {used['name']}: close to, not the same as, the pages Glyph was trained "
            f"on; set {GLYPH_REPO_ENV}=/path/to/Glyph (or `glyphserve render --glyph-repo PATH`) to use it"))
    return checks


def check_model(model: str | None, random_weights: str | None) -> list[Check]:
    if random_weights:
        return [Check("model", True, f"random weights ({random_weights}): no checkpoint needed")]
    name = model or DEFAULT_MODEL
    given = model is not None
    location, problem = locate_weights(name)
    if location is not None:
        detail = f"{name}: weights found in {location}"
        if not given:
            detail += f" (start with `glyphserve serve {name}`)"
        return [Check("model", True, detail)]
    if given:
        return [Check("model", False, f"{name}: {problem}",
                      "`glyphserve serve MODEL` will fail to load it here (no network for downloads)", True)]
    return [Check("model", False, f"none given; {DEFAULT_MODEL}: {problem}",
                  "the service answers extractively (BM25 passages); download the weights to "
                  f"use `glyphserve serve {DEFAULT_MODEL}`")]


def report(model: str | None = None, random_weights: str | None = None, device: str = "auto") -> tuple[str, bool]:
    """The doctor's text and whether everything required is there."""
    sections = [
        ("GPU", check_gpu()),
        ("Libraries", check_libraries()),
        ("Fonts", check_fonts()),
        ("Model", check_model(model, random_weights)),
    ]
    lines, ok = [], True
    for title, checks in sections:
        lines.append(f"{title}:")
        for check in checks:
            mark = "ok " if check.ok else "-- "
            lines.append(f"  {mark}{check.name}: {check.detail}")
            if not check.ok and check.meaning:
                lines.append(f"       means: {check.meaning}")
            ok = ok and (check.ok or not check.required)
    if device == "cuda" and not any(c.ok for c in sections[0][1] if c.name == "CUDA (torch)"):
        lines.append("  -- --device cuda was asked for but no usable GPU is present")
        ok = False
    lines.append("ready" if ok else "not ready: see the lines marked -- with a 'means' that stops the service")
    return "\n".join(lines), ok

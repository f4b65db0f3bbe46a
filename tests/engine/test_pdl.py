"""Programmatic dependent launch: where it is (not) used."""

from __future__ import annotations

import torch

from glyphserve.engine import pdl


def test_no_pdl_off_cuda_and_inductor_left_alone():
    import torch._inductor.config as inductor

    before = getattr(inductor.triton, "enable_pdl", None)
    assert not pdl.pdl_enabled(torch.device("cpu"))
    assert not pdl.enable_for_inductor(torch.device("cpu"))
    assert getattr(inductor.triton, "enable_pdl", None) == before


def test_the_switch_and_the_interpreter_turn_it_off_before_any_device_is_asked(monkeypatch):
    """Decided without touching CUDA (no device here): the switch, then Triton's interpreter."""
    for env in ({"GLYPHSERVE_PDL": "0"}, {"TRITON_INTERPRET": "true"}, {"TRITON_INTERPRET": "1"}):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            pdl._enabled.cache_clear()
            try:
                assert pdl._enabled(0) is False
            finally:
                pdl._enabled.cache_clear()

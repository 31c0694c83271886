"""`varlen_vision_attention`: the Qwen-VL vision encoders' per-image / per-window attention as one varlen call a layer.

transformers runs those encoders' attention one SDPA call per block (image, or window for Qwen2.5-VL) unless the
implementation's name says "flash"; `use_varlen_vision_attention` gives them the `"sdpa_varlen"` function under a
flash name. Checked here: the encoder's output is the `"sdpa"` encoder's, through the CPU fallback and through a
float64 stand-in for the flash kernel (one call per layer, every block attending fully within itself only).
"""

from __future__ import annotations

import pytest
import torch
from test_gemma3_packing import flash_stand_in

from trl_rejection import attention
from trl_rejection.attention import VISION_VARLEN_ATTENTION, use_varlen_vision_attention
from trl_rejection.testing.tiny import make_model, make_processor

FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"]
# three images in patches (t, h, w): Qwen2.5-VL's 8x8-patch windows split them into 4, 1 and 4 windows (some partial)
GRID = torch.tensor([[1, 12, 16], [1, 8, 8], [1, 16, 10]])


def _encode(model: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the vision encoder returns (merged features, deepstack features, hidden states)."""
    with torch.no_grad():
        out = model.model.visual(pixels, grid_thw=GRID)
    found: list[torch.Tensor] = []

    def walk(x):
        if torch.is_tensor(x):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif hasattr(x, "values"):
            for y in x.values():
                walk(y)

    walk(out)
    return found


def _pixels(model: torch.nn.Module) -> torch.Tensor:
    vision = model.config.vision_config
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    return torch.randn(int(GRID.prod(-1).sum()), width, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_encoder_on_varlen_attention_equals_sdpa(family, monkeypatch):
    """Through the CPU fallback (one SDPA call per block) and through the flash path (a float64 stand-in kernel):
    outputs equal the `"sdpa"` encoder's to 1e-10; the flash path is one kernel call per layer, unmasked, and
    Qwen2.5-VL's windowed layers get more blocks than there are images."""
    model = make_model(family, make_processor(family)).double().eval()
    pixels = _pixels(model)
    expected = _encode(model, pixels)
    assert use_varlen_vision_attention(model)
    assert model.config.vision_config._attn_implementation == VISION_VARLEN_ATTENTION
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # the language model is left alone
    for got, want in zip(_encode(model, pixels), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    calls, blocks = [], []
    stand_in = flash_stand_in(calls)

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, window_size=None, scale=None):
        blocks.append(cu_q.numel() - 1)
        assert torch.equal(cu_q, cu_k) and max_q == max_k == int(cu_q.diff().max())
        return stand_in(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size, scale=scale)

    monkeypatch.setattr(attention, "_VARLEN_ATTN", kernel)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"window_size": None, "scale": None})
    monkeypatch.setattr(attention, "flash_input_dtype", lambda *t: torch.float64)
    monkeypatch.setenv("TRL_REJECTION_VARLEN", "flash")
    for got, want in zip(_encode(model, pixels), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    depth = model.config.vision_config.depth
    assert calls == [(-1, -1)] * depth, calls
    if family == "qwen2.5-vl":  # layer 0 windowed (9 windows), layer 1 full attention (3 images)
        assert blocks == [9, 3], blocks
    else:
        assert blocks == [3] * depth, blocks


def test_images_never_attend_to_each_other():
    """Control: the same encoder with every image in one block (plain SDPA over all tokens) gives other features,
    so the equality above is not vacuous."""
    model = make_model("qwen2-vl", make_processor("qwen2-vl")).double().eval()
    pixels = _pixels(model)
    expected = _encode(model, pixels)[0]
    real = attention.varlen_sdpa_attention_forward

    def leaky(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("cu_seq_lens_q"), kwargs.pop("cu_seq_lens_k")
        return real(module, query, key, value, attention_mask, **kwargs)

    from transformers import AttentionInterface

    assert use_varlen_vision_attention(model)
    AttentionInterface.register(VISION_VARLEN_ATTENTION, leaky)
    try:
        got = _encode(model, pixels)[0]
    finally:
        attention.register_varlen_attention()
    assert (got - expected).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llava-1.5", "gemma3"])
def test_other_models_are_left_alone(family):
    model = make_model(family, make_processor(family))
    before = model.config.vision_config._attn_implementation
    assert not use_varlen_vision_attention(model)
    assert model.config.vision_config._attn_implementation == before


def test_a_vision_encoder_on_another_attention_is_left_alone():
    model = make_model("qwen2.5-vl", make_processor("qwen2.5-vl"))
    model.set_attn_implementation({"vision_config": "eager"})
    assert not use_varlen_vision_attention(model)
    assert model.config.vision_config._attn_implementation == "eager"


def test_saved_config_keeps_the_loaded_attention(tmp_path):
    """The switch is for training only: a saved model reloads in a fresh process, where `"varlen_flash_sdpa"` is not
    registered, without naming it."""
    import json

    model = make_model("qwen2.5-vl", make_processor("qwen2.5-vl"))
    assert use_varlen_vision_attention(model)
    model.save_pretrained(tmp_path)
    assert VISION_VARLEN_ATTENTION not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["model_type"]


@pytest.mark.parametrize("enabled", [True, False])
def test_the_trainer_applies_the_option(enabled, tmp_path):
    """`varlen_vision_attention` (default on) switches the vision encoder of a Qwen-VL model the trainer gets, padded
    batches included; off, it keeps `"sdpa"`. The trainer then trains a step through it."""
    from peft import LoraConfig
    from test_trainer import config, mix

    from trl_rejection import RejectionSFTTrainer

    proc = make_processor("qwen2-vl")
    args = config(tmp_path, varlen_vision_attention=enabled, padding_free=False, max_steps=1)
    trainer = RejectionSFTTrainer(make_model("qwen2-vl", proc), args=args, train_dataset=mix(), processing_class=proc,
                                  peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*q_proj"))
    vision = trainer.model.config.vision_config._attn_implementation
    assert vision == (VISION_VARLEN_ATTENTION if enabled else "sdpa")
    assert trainer.train().training_loss > 0


def test_packed_non_causal_attention_with_dropout_or_mask_fails_loudly():
    """Plain SDPA would attend across the packed blocks: an error naming the fix instead."""
    module = torch.nn.Module()
    module.is_causal = False
    q = k = v = torch.randn(1, 2, 10, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    for kwargs in ({"dropout": 0.1}, {"attention_mask": torch.ones(1, 1, 10, 10, dtype=torch.bool)}):
        args = {"attention_mask": None, **kwargs}
        with pytest.raises(ValueError, match="varlen_vision_attention=False"):
            attention.varlen_sdpa_attention_forward(module, q, k, v, cu_seq_lens_q=cu, max_length_q=6, is_causal=False,
                                                    **args)
    out, _ = attention.varlen_sdpa_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6)
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e])
                      for s, e in ((0, 4), (4, 10))], 2).transpose(1, 2)
    torch.testing.assert_close(out, want)

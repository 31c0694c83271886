"""Padding-free Gemma 3 (CPU, fp32): packed batches attend exactly as padded ones - rows apart, causal, the tokens of
one image bidirectionally, sliding-window layers within their window."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from trl_rejection import attention
from trl_rejection.attention import use_varlen_attention, varlen_sdpa_attention_forward
from trl_rejection.collator import RejectionDataCollator
from trl_rejection.constants import DEFAULT_REFUSAL
from trl_rejection.packing import image_block_ids, padding_free_supported
from trl_rejection.testing.tiny import make_model, make_processor

IMAGES = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (40, 24), (20, 90, 220))]
WORDS = "the red square sits on a white background next to a small blue circle".split()


def row(i: int, images: int, reply_words: int, refusal: bool = False) -> dict:
    reply = DEFAULT_REFUSAL if refusal else " ".join(WORDS[j % len(WORDS)] for j in range(reply_words))
    return {"id": str(i), "is_refusal": refusal, "images": IMAGES[:images], "messages": [
        {"role": "user", "content": [{"type": "image", "text": None}] * images
         + [{"type": "text", "text": " ".join(WORDS[: 3 + i])}]},
        {"role": "assistant", "content": [{"type": "text", "text": reply}]}]}


# rows with 1, 0, 2 and 1 images (one a refusal); and a batch of text-only rows
IMAGE_ROWS = [row(0, 1, 30), row(1, 0, 12), row(2, 2, 20), row(3, 1, 0, refusal=True)]
TEXT_ROWS = [row(0, 0, 35), row(1, 0, 3, refusal=True), row(2, 0, 18)]


def loss_and_grads(batch: dict, window: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    proc = make_processor("gemma3")
    model = make_model("gemma3", proc, seed=seed, text_kwargs={"sliding_window": window}).float().train()
    assert model.config.text_config.layer_types == ["sliding_attention", "full_attention"]
    if "cu_seq_lens_q" in batch:
        assert use_varlen_attention(model)
    loss = model(**{k: v for k, v in batch.items() if k != "is_refusal"}, use_cache=False).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def close(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], tol: float = 1e-5) -> bool:
    return abs(float(a[0] - b[0])) < tol and float((a[1] - b[1]).norm() / b[1].norm()) < tol


@pytest.fixture(scope="module")
def batches() -> dict[str, tuple[dict, dict]]:
    proc = make_processor("gemma3")
    return {name: (RejectionDataCollator(proc)(data), RejectionDataCollator(proc, padding_free=True)(data))
            for name, data in (("images", IMAGE_ROWS), ("text", TEXT_ROWS))}


def test_packed_batches_carry_token_types_and_image_blocks(batches):
    padded, packed = batches["images"]
    real = padded["attention_mask"].bool()
    assert "image_block_ids" not in padded
    torch.testing.assert_close(packed["token_type_ids"][0], padded["token_type_ids"][real])
    blocks = packed["image_block_ids"][0]
    assert bool(((blocks >= 0) == (packed["token_type_ids"][0] == 1)).all())
    assert blocks.max().item() + 1 == 4  # 1 + 0 + 2 + 1 images, each its own block
    assert [int((blocks == b).sum()) for b in range(4)] == [4] * 4  # 4 image tokens each (the tiny processor)
    assert "image_block_ids" in batches["text"][1] and bool((batches["text"][1]["image_block_ids"] == -1).all())
    llava = make_processor("llava-1.5")
    assert "image_block_ids" not in RejectionDataCollator(llava, padding_free=True)(IMAGE_ROWS[:1])


def test_image_blocks_never_cross_rows():
    types = torch.tensor([[1, 1, 1, 1, 0, 1]])
    assert image_block_ids(types, torch.tensor([0, 2, 4, 6])).tolist() == [[0, 0, 1, 1, -1, 2]]


@pytest.mark.parametrize("window", [1024, 64, 8])
@pytest.mark.parametrize("data", ["images", "text"])
def test_packed_loss_and_grads_equal_padded(batches, data, window):
    """1024: longer than every row; 64: shorter than the longest rows; 8: shorter than an image's row span, so on the
    sliding layer image tokens see their image's later tokens but not the text 8 tokens back."""
    padded, packed = batches[data]
    lengths = padded["attention_mask"].sum(1)
    assert int(lengths.max()) > 64 and int(lengths.min()) > 8
    ref = loss_and_grads(padded, window)
    assert close(loss_and_grads(packed, window), ref)
    if window < 1024:  # the window changes what the padded model computes: the test looks at it
        assert not close(loss_and_grads(padded, 1024), ref)


def test_deliberate_bugs_break_the_equality(batches, monkeypatch):
    """The comparison above catches image tokens attending causally only, and rows attending to each other."""
    padded, packed = batches["images"]
    ref, real = loss_and_grads(padded, 8), attention._row_mask
    with monkeypatch.context() as m:  # no bidirectional image blocks
        m.setattr(attention, "_row_mask", lambda blocks, window: real(torch.full_like(blocks, -1), window))
        assert not close(loss_and_grads(packed, 8), ref)
    with monkeypatch.context() as m:  # one sequence: rows see the rows before them
        total = packed["input_ids"].shape[1]
        leaky = {**packed, "cu_seq_lens_q": torch.tensor([0, total], dtype=torch.int32),
                 "max_length_q": total}
        assert not close(loss_and_grads(leaky, 1024), loss_and_grads(padded, 1024))
    assert close(loss_and_grads(packed, 8), ref)


def test_varlen_attention_masks_match_the_padded_rule():
    """Direct check against a mask built from the rule: same row & (causal | same image) & window, GQA included."""
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    lens, window = [7, 1, 10], 4
    types = torch.tensor([[0, 1, 1, 1, 0, 1, 0] + [0] + [0, 0, 1, 1, 1, 1, 1, 0, 1, 1]])
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    blocks = image_block_ids(types, cu)
    q = torch.randn(1, 4, sum(lens), 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, sum(lens), 8, dtype=torch.float64), torch.randn(1, 2, sum(lens), 8, dtype=torch.float64)
    i = torch.arange(sum(lens))
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    b = blocks[0]
    for w in (None, window):
        rule = (rows[:, None] == rows[None]) & ((i[None] <= i[:, None]) | (b[:, None] == b[None]) & (b[:, None] >= 0))
        if w is not None:
            rule &= i[None] > i[:, None] - w
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=rule, scale=0.3).transpose(1, 2)
        out, _ = varlen_sdpa_attention_forward(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=10,
                                               image_block_ids=blocks, sliding_window=w)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_masked_rows_never_use_cudnn_attention(monkeypatch):
    """cuDNN's SDPA builds an execution plan for every new sequence length (~1.7 ms of CPU a call on an H100): the
    per-row masked calls run with it disabled, the same results; plain causal batches leave the backends alone."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["attn_mask"] is not None, torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    monkeypatch.setenv("TRL_REJECTION_VARLEN", "loop")
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    lens = [6, 5]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(1, 2, sum(lens), 8) for _ in range(3))
    blocks = torch.full((1, sum(lens)), -1)
    blocks[0, 1:3] = 0
    assert torch.backends.cuda.cudnn_sdp_enabled()
    masked, _ = varlen_sdpa_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6,
                                              image_block_ids=blocks)
    assert seen == [(True, False), (False, False)] and torch.backends.cuda.cudnn_sdp_enabled()
    seen.clear()
    varlen_sdpa_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6)
    assert seen == [(False, True), (False, True)]
    flags = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: flags.append(
        (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())) or sdpa(*a, **k))
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):  # the user's choice is kept
        torch.testing.assert_close(varlen_sdpa_attention_forward(
            module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=6, image_block_ids=blocks)[0], masked)
    assert flags == [(False, True), (False, True)]


def test_image_layout_follows_each_layers_device():
    """A model split over devices (device_map) runs its layers on several: each gets the batch's layout there."""
    lens = [5, 4]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    blocks = torch.tensor([[-1, 0, 0, -1, -1, -1, 1, 1, 1]])
    assert any(attention._rows_with_images(cu, blocks))
    here = attention._image_block_layout(cu, blocks, torch.device("cpu"))
    there = attention._image_block_layout(cu, blocks, torch.device("meta"))
    assert here["q_idx"].device.type == "cpu" and there["q_idx"].device.type == "meta"
    assert here["q_idx"].tolist() == [1, 2, 6, 7, 8] and here["k_idx"].tolist() == [0, 1, 2, 5, 6, 7, 8]
    assert here["cu_k"].tolist() == [0, 3, 7] and (here["max_q"], here["max_k"]) == (3, 4)
    assert attention._image_block_layout(cu, blocks, torch.device("cpu")) is here


def flash_stand_in(calls: list):
    """A varlen kernel with flash-attention's semantics, computed in float64 with SDPA: queries and keys laid out by
    their own `cu` offsets, `window_size=(left, right)` around the query with the causal diagonal aligned to the
    bottom right (queries are the last keys' positions), (-1, -1) for no mask."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, -1), scale=None):
        calls.append(window_size)
        out = []
        for (sq, eq), (sk, ek) in zip(zip(cu_q[:-1].tolist(), cu_q[1:].tolist()),
                                      zip(cu_k[:-1].tolist(), cu_k[1:].tolist())):
            i, j = torch.arange(eq - sq)[:, None] + (ek - sk) - (eq - sq), torch.arange(ek - sk)[None]
            keep = torch.ones(eq - sq, ek - sk, dtype=torch.bool)
            if window_size[1] >= 0:
                keep &= j <= i + window_size[1]
            if window_size[0] >= 0:
                keep &= j >= i - window_size[0]
            out.append(torch.nn.functional.scaled_dot_product_attention(
                q[sq:eq].transpose(0, 1).double(), k[sk:ek].transpose(0, 1).double(),
                v[sk:ek].transpose(0, 1).double(), attn_mask=keep, scale=scale))
        return torch.cat(out, 1).transpose(0, 1).to(q.dtype)

    return varlen_attn


def test_flash_kernel_gets_the_sliding_window(monkeypatch):
    """Packed rows without images go to the varlen flash kernel with `window_size=(window - 1, 0)`: flash-attention's
    (left, right) tokens around the query, as transformers' flash-attention integration passes a sliding window. A
    stand-in kernel with those semantics gives what the per-row masks give. Rows with images reach it only without a
    window shorter than a row (two calls: causal, then the images' tokens unmasked); with one, they loop."""
    calls = []
    monkeypatch.setattr(attention, "_VARLEN_ATTN", flash_stand_in(calls))
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"window_size": None, "scale": None})
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    lens = [9, 3, 12]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(1, 2, sum(lens), 8).bfloat16() for _ in range(3))
    text = torch.full((1, sum(lens)), -1)
    for window, expected in ((4, (3, 0)), (None, (-1, 0))):
        got = {}
        for backend in ("flash", "loop"):
            monkeypatch.setenv("TRL_REJECTION_VARLEN", backend)
            got[backend], _ = varlen_sdpa_attention_forward(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu,
                                                            max_length_q=12, image_block_ids=text,
                                                            sliding_window=window)
        assert calls[-1] == expected
        torch.testing.assert_close(got["flash"].float(), got["loop"].float(), rtol=0, atol=2e-2)
    monkeypatch.setenv("TRL_REJECTION_VARLEN", "flash")
    images = text.clone()
    images[0, 10:12] = 0
    calls.clear()
    varlen_sdpa_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=12, image_block_ids=images)
    assert calls == [(-1, 0), (-1, -1)]
    varlen_sdpa_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=12, image_block_ids=images,
                                  sliding_window=4)
    assert calls == [(-1, 0), (-1, -1)]  # a binding window: per-row masks, not the kernel


@pytest.mark.parametrize("kernel_params", [{"window_size": None, "scale": None}, {"is_causal": None, "scale": None}])
def test_flash_path_with_images_attends_exactly_as_the_padded_rule(monkeypatch, kernel_params):
    """Rows with 0, 1 and 2 images (one at a row's start, one in the middle, one at a row's end), through the two
    flash calls (a float64 stand-in kernel): the output and the gradients of q, k, v equal SDPA with the padded
    model's mask (same row & (causal | same image)), GQA included. Both kernel signatures (torch >= 2.12 `window_size`,
    older `is_causal`)."""
    calls = []
    stand_in = flash_stand_in(calls)

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=None, window_size=None, scale=None):
        if window_size is None:
            window_size = (-1, 0) if is_causal else (-1, -1)
        return stand_in(q, k, v, cu_q, cu_k, max_q, max_k, window_size=window_size, scale=scale)

    monkeypatch.setattr(attention, "_VARLEN_ATTN", kernel)
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", kernel_params)
    monkeypatch.setenv("TRL_REJECTION_VARLEN", "flash")
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    lens = [7, 4, 11]
    types = torch.tensor([[1, 1, 1, 0, 0, 0, 0] + [0, 0, 0, 0] + [0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]])
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    blocks = image_block_ids(types, cu)
    n = sum(lens)
    q = torch.randn(1, 4, n, 8, dtype=torch.float64).bfloat16().double().requires_grad_()
    k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64).bfloat16().double().requires_grad_() for _ in range(2))
    i = torch.arange(n)
    rows = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    b = blocks[0]
    rule = (rows[:, None] == rows[None]) & ((i[None] <= i[:, None]) | (b[:, None] == b[None]) & (b[:, None] >= 0))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=rule, scale=0.3).transpose(1, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        out, _ = varlen_sdpa_attention_forward(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=0.3,
                                               cu_seq_lens_q=cu, max_length_q=11, image_block_ids=blocks)
    assert len(calls) == 2
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-2)  # bf16 output of exact float64 sums
    # the gradients, in float64 end to end: the same two calls on float64 inputs (the stand-in keeps their dtype)
    monkeypatch.setattr(attention, "flash_input_dtype", lambda *t: torch.float64)
    out64, _ = varlen_sdpa_attention_forward(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=11,
                                             image_block_ids=blocks)
    torch.testing.assert_close(out64, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(expected)
    got = torch.autograd.grad((out64 * weights).sum(), (q, k, v))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_gemma3_packs_with_sdpa_only():
    proc = make_processor("gemma3")
    model = make_model("gemma3", proc)
    assert padding_free_supported(model.config) == (True, "")
    model.set_attn_implementation("eager")
    supported, why = padding_free_supported(model.config)
    assert not supported and "sdpa" in why
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        use_varlen_attention(model)

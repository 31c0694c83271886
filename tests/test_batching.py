"""Throughput levers on CPU: padding-free batches (loss equal to padded ones), varlen attention, length grouping,
the LoRA input cast."""

from __future__ import annotations

import datasets
import pytest
import torch
from PIL import Image

from trl_rejection import attention
from trl_rejection import trainer as trainer_module
from trl_rejection.attention import (flash_input_dtype, register_varlen_attention, use_varlen_attention,
                                     varlen_sdpa_attention_forward)
from trl_rejection.collator import RejectionDataCollator
from trl_rejection.config import RejectionSFTConfig
from trl_rejection.constants import DEFAULT_REFUSAL, IGNORE_INDEX
from trl_rejection.packing import mrope_packed_inputs, pack_padded_batch, rope_index_module, token_row_index
from trl_rejection.sampler import ModalityLengthGroupedSampler, estimate_lengths, image_token_count
from trl_rejection.testing.tiny import make_model, make_processor
from trl_rejection.trainer import RejectionSFTTrainer

IMAGE = Image.new("RGB", (32, 32), (200, 30, 30))
WORDS = "the red square sits on a white background next to a small blue circle".split()


def rows(n: int, images: bool = True, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        refusal = i % 3 == 2
        k = int(torch.randint(2, 40, (), generator=g))
        reply = DEFAULT_REFUSAL if refusal else " ".join(WORDS[j % len(WORDS)] for j in range(k))
        out.append({"id": str(i), "is_refusal": refusal, "images": [IMAGE] if images else [], "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}] * images
             + [{"type": "text", "text": " ".join(WORDS[: 3 + i % 7])}]},
            {"role": "assistant", "content": [{"type": "text", "text": reply}]}]})
    return out


# ---------------------------------------------------------------------------------------------------- packing

def test_pack_padded_batch_positions_boundaries_and_labels():
    batch = {"input_ids": torch.tensor([[1, 5, 6, 7], [1, 8, 0, 0], [1, 9, 4, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]),
             "labels": torch.tensor([[3, 5, 6, -100], [-100, 8, -100, -100], [2, 9, 4, -100]]),
             "pixel_values": torch.zeros(3, 3, 2, 2), "is_refusal": torch.tensor([False, True, False])}
    out = pack_padded_batch(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[1, 5, 6, 7, 1, 8, 1, 9, 4]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert out["labels"].tolist() == [[-100, 5, 6, -100, -100, 8, -100, 9, 4]]  # no target at a row's first token
    assert out["cu_seq_lens_q"].tolist() == [0, 4, 6, 9] and out["cu_seq_lens_q"].dtype == torch.int32
    assert out["max_length_q"] == out["max_length_k"] == 4 and "attention_mask" not in out
    assert out["pixel_values"].shape == (3, 3, 2, 2) and out["is_refusal"].tolist() == [False, True, False]
    padded = pack_padded_batch(batch, pad_token_id=0, pad_to_multiple_of=8)
    assert padded["input_ids"].tolist() == [[1, 5, 6, 7, 1, 8, 1, 9, 4, 0, 0, 0, 0, 0, 0, 0]]
    assert padded["labels"][0, 9:].eq(IGNORE_INDEX).all() and padded["cu_seq_lens_q"].tolist() == [0, 4, 6, 9, 16]
    with pytest.raises(ValueError, match="right-padded"):
        pack_padded_batch({**batch, "attention_mask": batch["attention_mask"].flip(1)}, pad_token_id=0)
    # the row of each token (split losses): from cu_seq_lens_q, the padding a row of its own; the same from positions
    assert token_row_index(out, out["labels"].shape).tolist() == [[0, 0, 0, 0, 1, 1, 2, 2, 2]]
    assert token_row_index(padded, padded["labels"].shape).tolist() == [[0] * 4 + [1] * 2 + [2] * 3 + [3] * 7]
    no_cu = {k: v for k, v in padded.items() if not k.startswith("cu_seq")}
    assert torch.equal(token_row_index(no_cu, padded["labels"].shape), token_row_index(padded, padded["labels"].shape))
    assert token_row_index(batch, batch["labels"].shape) is None  # padded batches: rows are rows


def test_varlen_attention_matches_per_sequence_sdpa_with_gqa():
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    lens = [5, 1, 9, 3]
    q = torch.randn(1, 4, sum(lens), 8, dtype=torch.float64)
    k, v = torch.randn(1, 2, sum(lens), 8, dtype=torch.float64), torch.randn(1, 2, sum(lens), 8, dtype=torch.float64)
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    out, _ = varlen_sdpa_attention_forward(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=9)
    ref = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        kk, vv = k[:, :, s:e].repeat_interleave(2, 1), v[:, :, s:e].repeat_interleave(2, 1)
        ref.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], kk, vv, is_causal=True, scale=0.3))
    assert out.shape == (1, sum(lens), 4, 8)
    torch.testing.assert_close(out, torch.cat(ref, 2).transpose(1, 2), rtol=1e-12, atol=1e-12)
    pos = torch.cat([torch.arange(n) for n in lens])[None]  # boundaries from position_ids alone give the same
    out2, _ = varlen_sdpa_attention_forward(module, q, k, v, None, scaling=0.3, position_ids=pos)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llava-1.5", "qwen2-vl", "qwen3-vl", "gemma3", "llama3-text"])
def test_use_varlen_attention_switches_the_language_model_only(family):
    """The language model's modules read `"sdpa_varlen"`, the vision tower's keep `"sdpa"`; a model on another
    attention (eager) is left as it is."""
    model = make_model(family, make_processor(family))
    text = model.config.get_text_config()
    assert use_varlen_attention(model)
    attn = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and config is not model.config or config is text:
            attn.setdefault(config is text or config.model_type == text.model_type, set()).add(
                config._attn_implementation)
    assert attn[True] == {"sdpa_varlen"}
    assert attn.get(False, {"sdpa"}) == {"sdpa"}
    assert False in attn or family == "llama3-text"  # the VLMs' vision towers were looked at
    eager = make_model(family, make_processor(family))
    eager.set_attn_implementation("eager")
    if family == "gemma3":  # transformers' packed masks get its image blocks wrong: an error, not a silent mask
        with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
            use_varlen_attention(eager)
    else:
        assert not use_varlen_attention(eager)
    assert eager.config.get_text_config()._attn_implementation == "eager"


def _fake_flash_kernel(calls):
    """Stands in for torch's varlen flash kernel on CPU: refuses fp32 as the real one does, else per-row SDPA."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, scale=None):
        if q.dtype not in (torch.float16, torch.bfloat16) or not q.dtype == k.dtype == v.dtype:
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        calls.append(q.dtype)
        with torch.autocast("cpu", enabled=False):
            out = [torch.nn.functional.scaled_dot_product_attention(
                *(t[s:e].transpose(0, 1).float() for t in (q, k, v)), is_causal=is_causal, scale=scale)
                for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())]
        return torch.cat(out, 1).transpose(0, 1).to(q.dtype)

    return varlen_attn


def test_flash_varlen_casts_fp32_query_and_key_to_the_autocast_dtype(monkeypatch):
    """fp32 weights under bf16 autocast: RoPE leaves q and k in fp32 (fp32 cos/sin), v comes out of an autocast
    linear in bf16. The flash kernel takes fp16/bf16 only, so all three must go to it in bf16 (as SDPA does under
    autocast); with no autocast and everything in fp32 the per-row SDPA fallback runs instead."""
    calls = []
    monkeypatch.setattr(attention, "_VARLEN_ATTN", _fake_flash_kernel(calls))
    monkeypatch.setattr(attention, "_VARLEN_PARAMS", {"is_causal": None, "scale": None})
    monkeypatch.setenv("TRL_REJECTION_VARLEN", "flash")
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    lens = [6, 2, 9]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(1, 2, sum(lens), 8) for _ in range(3))
    ref, _ = varlen_sdpa_attention_forward(module, q.double(), k.double(), v.double(), None,
                                                    cu_seq_lens_q=cu, max_length_q=9)
    assert calls == []  # float64 without autocast: no half dtype to run the kernel in -> per-row SDPA
    assert flash_input_dtype(q, k, v) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert flash_input_dtype(q, k, v.bfloat16()) == torch.bfloat16
        out, _ = varlen_sdpa_attention_forward(module, q, k, v.bfloat16(), None, cu_seq_lens_q=cu,
                                                        max_length_q=9)
    assert calls == [torch.bfloat16] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=3e-2)  # bf16 inputs: ~3 significant digits
    out, _ = varlen_sdpa_attention_forward(module, q, k, v.half(), None, cu_seq_lens_q=cu, max_length_q=9)
    assert calls[-1] == torch.float16 and out.dtype == torch.float32  # no autocast: the half tensor decides
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=5e-3)
    out, _ = varlen_sdpa_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=9)
    assert len(calls) == 2 and out.dtype == torch.float32  # all fp32, no autocast: fallback, exact
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


FAMILIES = ["llava-1.5", "llava-next", "idefics3", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llama3-text"]


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_free_loss_and_grads_equal_padded(family):
    """fp32, CPU: the packed batch gives the padded batch's loss and gradients (SDPA vs sdpa_varlen, and eager).

    Qwen-VL rows get their 3-D RoPE positions per row (`mrope_packed_inputs`); one row has no image. Packed with 1-D
    positions only, their gradients differ by ~2.5e-4 relative (Qwen2-VL; 3.5e-2 for Qwen3-VL), well over the
    tolerance. Qwen3-VL also adds deepstack visual features to the first decoder layers at the image tokens."""
    proc = make_processor(family)
    data = rows(5, images=family != "llama3-text")
    if family.startswith("qwen"):
        data[1]["images"], data[1]["messages"][0]["content"] = [], data[1]["messages"][0]["content"][1:]
    padded = RejectionDataCollator(proc)(data)
    packed = RejectionDataCollator(proc, padding_free=True)(data)
    assert packed["input_ids"].shape[1] == int(padded["attention_mask"].sum()) < padded["input_ids"].numel()
    assert int((packed["labels"] != IGNORE_INDEX).sum()) == int((padded["labels"] != IGNORE_INDEX).sum())

    def loss_and_grad(batch, attn):
        model = make_model(family, proc).float().train()
        register_varlen_attention()
        model.set_attn_implementation(attn) if attn == "eager" else use_varlen_attention(model)
        batch = {k: v for k, v in batch.items() if k != "is_refusal"}
        if "cu_seq_lens_q" in batch:
            batch = mrope_packed_inputs(rope_index_module(model), batch)
            assert batch["position_ids"].shape[0] == (4 if family.startswith("qwen") else 1)
        loss = model(**batch, use_cache=False).loss  # a cache would turn off transformers' packed-mask path
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return loss.detach(), grads

    ref_loss, ref_grad = loss_and_grad(padded, "sdpa")
    for attn in ("sdpa_varlen", "eager"):
        loss, grad = loss_and_grad(packed, attn)
        assert abs(float(loss - ref_loss)) < 1e-5, (attn, float(loss), float(ref_loss))
        assert float((grad - ref_grad).norm() / ref_grad.norm()) < 1e-5, attn


@pytest.mark.parametrize("family", ["llava-1.5", "qwen2-vl", "qwen3-vl", "gemma3"])
def test_trainer_padding_free_step_equals_padded_step(tmp_path, family, monkeypatch):
    """Gemma 3's packed batches carry `image_block_ids`, with which `"sdpa_varlen"` rebuilds its image-token mask."""
    proc = make_processor(family)
    data = datasets.Dataset.from_list(rows(8))
    logs = {}
    position_rows, image_blocks = [], []
    real = mrope_packed_inputs

    def spy(module, inputs):
        out = real(module, inputs)
        position_rows.append(out["position_ids"].shape[0])
        image_blocks.append(int((out["image_block_ids"] >= 0).sum()) if "image_block_ids" in out else None)
        return out

    monkeypatch.setattr(trainer_module, "mrope_packed_inputs", spy)
    for free in (True, False):
        args = RejectionSFTConfig(str(tmp_path / str(free)), use_cpu=True, report_to="none", save_strategy="no",
                                  logging_steps=1, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                                  warmup_steps=0, seed=0, dataloader_num_workers=0, padding_free=free)
        trainer = RejectionSFTTrainer(make_model(family, proc).float(), args=args, train_dataset=data,
                                      processing_class=proc)
        assert trainer.padding_free is free and trainer.data_collator.padding_free is free
        assert (trainer.model.config.get_text_config()._attn_implementation == "sdpa_varlen") is free
        trainer.train()
        logs[free] = [h for h in trainer.state.log_history if "loss" in h]
    assert position_rows == [4 if family.startswith("qwen") else 1] * 2  # the packed steps got 3-D RoPE positions
    assert image_blocks == ([4 * 4] * 2 if family == "gemma3" else [None] * 2)  # 4 rows, 4 image tokens each
    assert any("loss_refusal" in h for h in logs[True])
    for a, b in zip(logs[True], logs[False]):  # bf16 autocast on CPU: same tokens, same order, same values
        assert a.keys() == b.keys()
        for key in {"loss", "loss_refusal", "loss_normal", "grad_norm"} & a.keys():
            assert a[key] == pytest.approx(b[key], rel=2e-3), key
        assert a["refusal_tokens"] == b["refusal_tokens"] and a["normal_tokens"] == b["normal_tokens"]


def eager_gemma3(proc):
    model = make_model("gemma3", proc)
    model.set_attn_implementation("eager")
    return model


def test_models_with_token_type_masks_fall_back_to_padded_batches(tmp_path):
    """Gemma 3 packs with SDPA only (`"sdpa_varlen"` rebuilds its image-token mask); with eager it trains padded."""
    proc = make_processor("gemma3")
    args = RejectionSFTConfig(str(tmp_path), use_cpu=True, report_to="none", max_steps=1, dataloader_num_workers=0)
    data = datasets.Dataset.from_list(rows(4))
    trainer = RejectionSFTTrainer(eager_gemma3(proc), args=args, train_dataset=data, processing_class=proc)
    assert args.padding_free and not trainer.padding_free and not trainer.data_collator.padding_free
    trainer = RejectionSFTTrainer(make_model("gemma3", proc), args=args, train_dataset=data, processing_class=proc)
    assert trainer.padding_free and trainer.model.config.get_text_config()._attn_implementation == "sdpa_varlen"


def test_a_given_collator_decides_padding_free(tmp_path):
    """A given RejectionDataCollator keeps its flag (and the attention follows it); a packing one for a model that
    cannot keep rows apart is an error; any other collator means padded-batch handling."""
    data = datasets.Dataset.from_list(rows(4))
    args = RejectionSFTConfig(str(tmp_path), use_cpu=True, report_to="none", max_steps=1, dataloader_num_workers=0,
                              padding_free=False)
    proc = make_processor("llava-1.5")
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=data, processing_class=proc,
                                  data_collator=RejectionDataCollator(proc, padding_free=True))
    assert trainer.padding_free and trainer.model.config.get_text_config()._attn_implementation == "sdpa_varlen"
    plain = RejectionSFTTrainer(make_model("llava-1.5", proc), args=RejectionSFTConfig(
        str(tmp_path), use_cpu=True, report_to="none", dataloader_num_workers=0), train_dataset=data,
        processing_class=proc, data_collator=lambda examples: RejectionDataCollator(proc)(examples))
    assert not plain.padding_free and plain.model.config.get_text_config()._attn_implementation == "sdpa"
    gemma = make_processor("gemma3")
    with pytest.raises(ValueError, match="cannot keep packed rows apart"):
        RejectionSFTTrainer(eager_gemma3(gemma), args=args, train_dataset=data, processing_class=gemma,
                            data_collator=RejectionDataCollator(gemma, padding_free=True))


# ---------------------------------------------------------------------------------------------------- grouping

def test_sampler_covers_every_row_once_is_deterministic_and_groups_lengths():
    g = torch.Generator().manual_seed(1)
    lengths = (torch.rand(403, generator=g) * 1500).long().tolist()
    has_image = (torch.rand(403, generator=g) < 0.8).tolist()
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=8, mega_batch_mult=10, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(403)) and len(sampler) == 403
    assert order == list(ModalityLengthGroupedSampler(lengths, has_image, 8, mega_batch_mult=10, seed=3))
    assert order != list(ModalityLengthGroupedSampler(lengths, has_image, 8, mega_batch_mult=10, seed=4))
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(403))

    def padding(order):
        batches = [order[i:i + 8] for i in range(0, len(order), 8)]
        return 1 - sum(lengths[i] for i in order) / sum(max(lengths[i] for i in b) * len(b) for b in batches)

    random_order = torch.randperm(403, generator=g).tolist()
    assert padding(order) < 0.1 < 0.3 < padding(random_order)
    batches = sampler.batches()
    full = [b for b in batches if len(b) == 8][:-1]  # the last full batch may hold both modalities' leftovers
    assert all(len({has_image[i] for i in b}) == 1 for b in full)  # image rows and text-only rows apart
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch first


def test_estimated_lengths_follow_token_lengths_without_decoding_images():
    proc = make_processor("llava-1.5")
    data = rows(12) + rows(4, images=False, seed=1)
    ds = datasets.Dataset.from_list(data)
    n_img = image_token_count(proc, size=28)
    assert 4 <= n_img <= 8  # the tiny LLaVA: a 28 px image is 4 image tokens, plus the template's separator
    lengths, has_image = estimate_lengths(ds, image_tokens=n_img)
    assert has_image == [True] * 12 + [False] * 4
    slow, _ = estimate_lengths([{"messages": r["messages"]} for r in data], image_tokens=n_img)
    assert lengths == slow  # Arrow and Python paths agree
    real = RejectionDataCollator(proc)(data)["attention_mask"].sum(1).tolist()
    ratio = torch.tensor(real, dtype=torch.float) / torch.tensor(lengths, dtype=torch.float)
    assert 0.5 < float(ratio.min()) and float(ratio.max()) < 2.5, ratio


def test_trainer_uses_the_modality_length_sampler(tmp_path):
    proc = make_processor("llava-1.5")
    ds = datasets.Dataset.from_list(rows(10))
    args = RejectionSFTConfig(str(tmp_path), use_cpu=True, report_to="none", max_steps=1, dataloader_num_workers=0,
                              train_sampling_strategy="group_by_length", per_device_train_batch_size=2)
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=ds, processing_class=proc)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ModalityLengthGroupedSampler) and sorted(sampler) == list(range(10))
    trainer.train()


# ---------------------------------------------------------------------------------------------------- LoRA inputs

def test_skipping_the_lora_input_upcast_changes_nothing_with_dropout_0(tmp_path):
    """bf16 autocast (CPU): PEFT's fp32 upcast of LoRA inputs is skipped during steps and restored afterwards."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import BaseTunerLayer

    proc = make_processor("llava-1.5")
    data = datasets.Dataset.from_list(rows(8))
    seen, logs = {}, {}
    for cast in (True, False):
        model = make_model("llava-1.5", proc).to(torch.bfloat16)  # bf16 base, fp32 adapters: PEFT upcasts inputs
        args = RejectionSFTConfig(str(tmp_path / str(cast)), use_cpu=True, report_to="none", save_strategy="no",
                                  logging_steps=1, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                                  warmup_steps=0, seed=0, dataloader_num_workers=0, cast_lora_inputs=cast)
        peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=r".*language_model.*_proj")
        trainer = RejectionSFTTrainer(model, args=args, train_dataset=data, processing_class=proc, peft_config=peft)
        layer = next(m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer))
        layer.register_forward_pre_hook(lambda m, a, cast=cast: seen.update({cast: m.cast_input_dtype_enabled}))
        assert next(p for n, p in trainer.model.named_parameters() if "lora_A" in n).dtype == torch.float32
        trainer.train()
        logs[cast] = [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]
        assert layer.cast_input_dtype_enabled  # restored after the steps
    assert seen == {True: True, False: False}
    assert logs[True] == logs[False]

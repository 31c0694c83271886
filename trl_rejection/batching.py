"""Throughput levers for VLM fine-tuning: padding-free (varlen) batches and modality-aware length grouping.

- `pack_padded_batch` turns a right-padded collated batch into one row of concatenated sequences (no padding) with
  `position_ids` restarting at 0 for each sequence and flash-attention-style `cu_seq_lens_q/k`, `max_length_q/k`.
- `register_varlen_attention` adds the attention implementation `"sdpa_varlen"` to transformers: for such packed
  batches it attends within each sequence only, through PyTorch's flash-attention varlen kernel
  (`torch.nn.attention.varlen.varlen_attn`) on CUDA, or one causal SDPA call per sequence elsewhere; for any other
  batch (padded, generation with a cache) it is transformers' own SDPA, mask included.
- `ModalityLengthGroupedSampler` groups rows of similar estimated length (text characters / 4 + tokens per image,
  no tokenization) into the same batch, image rows and text-only rows apart, as LLaVA's `group_by_modality_length`.

Example:
    >>> import torch
    >>> batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]),
    ...          "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
    ...          "labels": torch.tensor([[-100, 6, 7], [-100, 9, -100]])}
    >>> packed = pack_padded_batch(batch, pad_token_id=0)
    >>> packed["input_ids"].tolist(), packed["position_ids"].tolist(), packed["cu_seq_lens_q"].tolist()
    ([[5, 6, 7, 8, 9]], [[0, 1, 2, 0, 1]], [0, 3, 5])
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
VARLEN_ATTENTION = "sdpa_varlen"
PACKED_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# Models whose positions are not 1-D (multimodal RoPE) or whose mask depends on token types (bidirectional image
# blocks): concatenating rows with restarting 1-D position_ids would change what they compute.
_NOT_PACKABLE = ("qwen3_vl", "qwen3_vl_moe", "glm4v", "glm4v_moe", "gemma3", "gemma3n", "paligemma", "mllama",
                 "qwen2_5_omni", "qwen3_omni_moe", "kimi_vl")
# Multimodal-RoPE models packed with per-row 3-D positions (`mrope_packed_inputs`): their text model reads
# `[4, 1, tokens]` position ids, text positions first.
_MROPE_PACKABLE = ("qwen2_vl", "qwen2_5_vl")


# --------------------------------------------------------------------------------------------------------------------
# Padding-free batches
# --------------------------------------------------------------------------------------------------------------------

def padding_free_supported(config: Any) -> tuple[bool, str]:
    """Whether rows of this model can be concatenated into one sequence; the reason when not."""
    types = {getattr(config, "model_type", None)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types.add(getattr(text, "model_type", None))
    if types & set(_NOT_PACKABLE):
        return False, f"model type {sorted(t for t in types if t)} uses multimodal RoPE or a token-type mask"
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if isinstance(rope, dict) and ("mrope_section" in rope or rope.get("rope_type") == "mrope") \
            and not types & set(_MROPE_PACKABLE):
        return False, "the model uses multimodal RoPE (3-D position ids)"
    return True, ""


def rope_index_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The sub-module computing a Qwen2-VL-family model's 3-D RoPE positions (`get_rope_index`); None for others."""
    return next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)


def mrope_packed_inputs(rope_module: torch.nn.Module | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """Give a packed batch of a Qwen2-VL-family model its `[4, 1, tokens]` position ids.

    Row 0 holds the packed text positions (restarting per row; the model keeps rows apart with them), rows 1-3 the
    temporal/height/width positions of multimodal RoPE, computed over the packed sequence and shifted so each row
    starts at 0: exactly the positions the model computes for that row in a padded batch. Inputs of other models,
    padded batches and batches without images are returned unchanged.

    Example:
        >>> batch = mrope_packed_inputs(rope_index_module(model), collator(rows))  # doctest: +SKIP
        >>> batch["position_ids"].shape  # doctest: +SKIP
        torch.Size([4, 1, 391])
    """
    if rope_module is None:  # every model but the Qwen2-VL family: nothing to do on this per-step path
        return inputs
    position_ids, cu = inputs.get("position_ids"), inputs.get("cu_seq_lens_q")
    grids = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
             if inputs.get(k) is not None}
    if cu is None or position_ids is None or position_ids.dim() != 2 or not grids:
        return inputs
    positions, _ = rope_module.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                              **grids)  # (3, 1, tokens): the packed rows as one sequence
    rows = token_row_index(inputs, inputs["input_ids"].shape)[0].to(positions.device)
    starts = cu[:-1].to(device=positions.device, dtype=torch.long)
    positions = positions - positions[:, :, starts][:, :, rows]  # RoPE is relative: each row back to 0
    return {**inputs, "position_ids": torch.cat([position_ids.to(positions.device)[None], positions], 0)}


def pack_padded_batch(batch: dict[str, Any], pad_token_id: int,
                      pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Concatenate the rows of a right-padded batch into a single row without padding.

    Every tensor shaped `(batch, seq_len, ...)` is flattened over its real tokens; `attention_mask` is replaced by
    `position_ids` (restarting at 0 per row), `cu_seq_lens_q/k` (int32 row boundaries, `[0, len_0, len_0+len_1,
    ...]`) and `max_length_q/k`. The first token of each row gets label `-100`, so no row learns to predict the next
    row's first token (in a padded batch that position is never a target either). Other keys (pixel values,
    `is_refusal`, ...) are kept as they are. With `pad_to_multiple_of`, pad tokens are appended as one more sequence
    with label `-100`.
    """
    mask = batch["attention_mask"].bool()
    n, length = mask.shape
    lengths = mask.sum(1)
    if not bool((mask == (torch.arange(length)[None] < lengths[:, None])).all()):
        raise ValueError("pack_padded_batch needs a right-padded batch (each row's real tokens first).")
    out: dict[str, Any] = {}
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        value = labels if key == "labels" else value
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (n, length):
            out[key] = value[mask][None]
        else:
            out[key] = value
    seq_lens = [int(x) for x in lengths]
    total = sum(seq_lens)
    if pad_to_multiple_of and total % pad_to_multiple_of:
        extra = pad_to_multiple_of - total % pad_to_multiple_of
        for key in list(out):
            value = out[key]
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (1, total):
                fill = pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
                out[key] = torch.cat([value, value.new_full((1, extra, *value.shape[2:]), fill)], 1)
        seq_lens.append(extra)
    out["position_ids"] = torch.cat([torch.arange(s) for s in seq_lens])[None]
    cu = torch.tensor([0, *seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu
    out["max_length_q"] = out["max_length_k"] = max(seq_lens)
    return out


def token_row_index(inputs: dict[str, Any], shape: torch.Size) -> torch.Tensor | None:
    """For a packed batch, the row (sequence) index of every token, shaped like `labels`; None for padded batches."""
    cu = inputs.get("cu_seq_lens_q")
    if cu is not None and shape[0] == 1:
        cu = cu.to(torch.long)
        return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu.diff())[None]
    pos = inputs.get("position_ids")
    if pos is not None and shape[0] == 1 and "attention_mask" not in inputs:
        return ((pos == 0).cumsum(-1) - 1)[:1]
    return None


# --------------------------------------------------------------------------------------------------------------------
# Varlen attention for transformers (SDPA semantics, sequences kept apart)
# --------------------------------------------------------------------------------------------------------------------

def _load_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, params


_VARLEN_ATTN, _VARLEN_PARAMS = _load_varlen_attn()
_CU_CACHE: dict[str, Any] = {"key": None, "value": None}


def varlen_backend(device: torch.device) -> str:
    """`"flash"` (PyTorch's varlen flash-attention kernel) or `"loop"` (one causal SDPA call per sequence).

    `TRL_REJECTION_VARLEN=loop` forces the loop (used by the benchmark to compare the two).
    """
    forced = os.environ.get("TRL_REJECTION_VARLEN", "auto")
    if forced in ("loop", "flash"):
        return forced
    return "flash" if device.type == "cuda" and _VARLEN_ATTN is not None else "loop"


def _boundaries(cu: torch.Tensor) -> list[int]:
    """`cu_seq_lens` as Python ints, synchronising once per forward (the tensor object is the cache key)."""
    if _CU_CACHE["key"] is not cu:
        _CU_CACHE["key"], _CU_CACHE["value"] = cu, [int(x) for x in cu.tolist()]
    return _CU_CACHE["value"]


_HALF = (torch.float16, torch.bfloat16)


def flash_input_dtype(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.dtype | None:
    """The half-precision dtype in which q, k, v go to the flash kernel (it takes fp16/bf16 only); None: none fits.

    Under autocast, that is the autocast dtype: fp32 weights make fp32 hidden states, and RoPE multiplies q and k by
    fp32 cos/sin, so q and k reach attention in fp32 while v (a plain projection) is already bf16 - SDPA is autocast
    to bf16 there, and so is the flash kernel here. Without autocast, a tensor already in half precision sets it
    (all three in one half dtype: no cast). All in fp32 without autocast: None (fp32 needs the SDPA fallback).
    """
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype in _HALF:
            return dtype
    return next((t.dtype for t in (query, key, value) if t.dtype in _HALF), None)


def _flash_varlen(query, key, value, cu, max_len, scaling):
    dtype = flash_input_dtype(query, key, value)
    out_dtype = query.dtype
    query, key, value = (t.to(dtype) for t in (query, key, value))
    kwargs: dict[str, Any] = {}
    if "is_causal" in _VARLEN_PARAMS:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)  # causal in torch >= 2.12
    if scaling is not None:
        if "scale" in _VARLEN_PARAMS:
            kwargs["scale"] = scaling
        elif not math.isclose(scaling, query.shape[-1] ** -0.5):
            query = query * (scaling * query.shape[-1] ** 0.5)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, head_dim)
    cu = cu.to(device=q.device, dtype=torch.int32)
    out = _VARLEN_ATTN(q, k, v, cu, cu, max_len, max_len, **kwargs)
    # SDPA under autocast returns the autocast dtype; without autocast, keep the query's dtype for what follows
    return out[None] if torch.is_autocast_enabled(out.device.type) else out[None].to(out_dtype)


def _loop_varlen(query, key, value, cu, scaling):
    bounds = _boundaries(cu)
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    # `split`, not slicing: the backward of a split is one concatenation, that of n slices n full-size buffers
    outs = [torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
            for q, k, v in zip(*(t.split(sizes, dim=2) for t in (query, key, value))) if q.shape[2]]
    return torch.cat(outs, 2).transpose(1, 2).contiguous()


def varlen_sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None,
                                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal attention within each packed sequence, else plain SDPA."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    packed = (cu is not None and attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
              and getattr(module, "is_causal", True) and not dropout)
    if cu is None and attention_mask is None and query.shape[0] == 1 and kwargs.get("position_ids") is not None:
        pos = kwargs["position_ids"][0]
        starts = (pos == 0).nonzero().flatten()
        if starts.numel() > 1 and query.shape[2] == key.shape[2]:  # packed rows given by position_ids alone
            cu = torch.cat([starts, starts.new_tensor([pos.numel()])]).to(torch.int32)
            kwargs["max_length_q"] = int(cu.diff().max())
            packed = not dropout
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if varlen_backend(query.device) == "flash" and flash_input_dtype(query, key, value) is not None:
        max_len = kwargs.get("max_length_q") or int(cu.diff().max())
        return _flash_varlen(query, key, value, cu, int(max_len), scaling), None
    return _loop_varlen(query, key, value, cu, scaling), None


def _varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask builder for `"sdpa_varlen"`: none for packed/unpadded inputs, SDPA's own for padded ones."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register `"sdpa_varlen"` with transformers' attention and mask interfaces (idempotent); return the name."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION


def use_varlen_attention(model: Any) -> bool:
    """Switch the language model of `model` from `"sdpa"` to `"sdpa_varlen"`; False if it uses something else.

    Flash-attention implementations already read `cu_seq_lens_*`; eager and flex attention build a block-diagonal
    mask from the packed `position_ids` (correct, slower), so they are left alone.
    """
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text._attn_implementation not in ("sdpa", VARLEN_ATTENTION):
        return False
    register_varlen_attention()
    text._attn_implementation = VARLEN_ATTENTION
    for module in model.modules():  # sub-models that hold their own copy of the text config
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg is not text and getattr(cfg, "model_type", None) == text.model_type \
                and getattr(cfg, "_attn_implementation", None) == "sdpa" and not hasattr(cfg, "text_config"):
            cfg._attn_implementation = VARLEN_ATTENTION
    return True


# --------------------------------------------------------------------------------------------------------------------
# Length grouping
# --------------------------------------------------------------------------------------------------------------------

def _image_parts(content: Any) -> int:
    return 0 if isinstance(content, str) or content is None else sum(p.get("type") == "image" for p in content)


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    return sum(len(p.get("text") or "") for p in content or () if p.get("type") == "text")


def _arrow_stats(dataset: Any) -> tuple[list[int], list[int]] | None:
    """(text characters, image parts) per row from the Arrow `messages` column, without decoding any image."""
    try:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        table = dataset.with_format("arrow")[:]
        col = table.column("messages").combine_chunks()
        n = len(col)
        messages = col.flatten()
        msg_row = pc.list_parent_indices(col).to_numpy()
        content = messages.field("content")
        if pa.types.is_string(content.type) or pa.types.is_large_string(content.type):
            chars = np.bincount(msg_row, weights=pc.fill_null(pc.utf8_length(content), 0).to_numpy(), minlength=n)
            return chars.astype(int).tolist(), [0] * n
        parts = content.flatten()
        part_row = msg_row[pc.list_parent_indices(content).to_numpy()]
        text = pc.fill_null(pc.utf8_length(parts.field("text")), 0).to_numpy()
        is_image = pc.fill_null(pc.equal(parts.field("type"), "image"), False).to_numpy(zero_copy_only=False)
        chars = np.bincount(part_row, weights=np.where(is_image, 0, text), minlength=n)
        images = np.bincount(part_row, weights=is_image.astype(np.int64), minlength=n)
        return chars.astype(int).tolist(), images.astype(int).tolist()
    except Exception as e:  # any other layout: the Python path below
        logger.debug("arrow length estimate failed (%s); using the python path", e)
        return None


def estimate_lengths(dataset: Any, image_tokens: int, chars_per_token: float = 4.0,
                     tokens_per_message: int = 4) -> tuple[list[int], list[bool]]:
    """Estimated token length and whether it has an image, per row: no tokenization, no image decoding.

    length = text characters / `chars_per_token` + `tokens_per_message` per message + `image_tokens` per image part.
    """
    stats = _arrow_stats(dataset) if hasattr(dataset, "with_format") else None
    if stats is not None:
        chars, images = stats
        import pyarrow.compute as pc

        col = dataset.with_format("arrow")[:].column("messages")
        n_msgs = pc.list_value_length(col).to_pylist()
    else:
        chars, images, n_msgs = [], [], []
        rows = dataset.select_columns(["messages"]) if hasattr(dataset, "select_columns") else dataset
        for row in rows:
            msgs = row["messages"]
            chars.append(sum(_text_chars(m["content"]) for m in msgs))
            images.append(sum(_image_parts(m["content"]) for m in msgs))
            n_msgs.append(len(msgs))
    lengths = [int(c / chars_per_token) + tokens_per_message * m + image_tokens * i
               for c, i, m in zip(chars, images, n_msgs)]
    return lengths, [i > 0 for i in images]


def image_token_count(processing_class: Any, size: int = 336) -> int:
    """Tokens one `size` px image adds after processing (e.g. 576 for LLaVA-1.5 at 336 px); 0 for tokenizers."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is processing_class:
        return 0
    try:
        from PIL import Image

        with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
        text_only = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
        a = processing_class.apply_chat_template(with_image, tokenize=False)
        b = processing_class.apply_chat_template(text_only, tokenize=False)
        n_a = len(processing_class(text=[a], images=[[Image.new("RGB", (size, size))]])["input_ids"][0])
        n_b = len(tokenizer(b)["input_ids"])
        return max(n_a - n_b, 1)
    except Exception as e:
        logger.warning("Could not count the tokens of an image (%s); assuming 576.", e)
        return 576


class ModalityLengthGroupedSampler(Sampler[int]):
    """Indices such that each batch holds rows of similar length, image rows and text-only rows apart.

    Per modality: shuffle, cut into mega-batches of `mega_batch_mult * batch_size * world_size` rows, sort each by
    length (longest first) and cut it into batches. Then all full batches are shuffled, the one with the longest row
    goes first (an out-of-memory error shows at step 1, not hours in), and the leftover rows of both modalities form
    the last batch(es). Every row appears exactly once per epoch; the order depends only on `seed` and the epoch.

    Example:
        >>> sampler = ModalityLengthGroupedSampler([5, 100, 6, 90, 7, 95], [True] * 6, batch_size=3, seed=0)
        >>> sorted(sampler) == list(range(6))
        True
    """

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, world_size: int = 1,
                 mega_batch_mult: int = 50, seed: int = 0):
        if len(lengths) != len(has_image):
            raise ValueError("lengths and has_image must have the same length.")
        self.lengths = list(lengths)
        self.has_image = list(has_image)
        self.batch_size = batch_size
        self.world_size = world_size
        self.mega = max(1, mega_batch_mult) * batch_size * world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        full, leftover = [], []
        for modality in (True, False):
            idx = [i for i, m in enumerate(self.has_image) if m == modality]
            idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            for start in range(0, len(idx), self.mega):
                mega = sorted(idx[start:start + self.mega], key=lambda i: -self.lengths[i])
                for b in range(0, len(mega), self.batch_size):
                    chunk = mega[b:b + self.batch_size]
                    (full.append(chunk) if len(chunk) == self.batch_size else leftover.extend(chunk))
        full = [full[j] for j in torch.randperm(len(full), generator=g).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda j: max(self.lengths[i] for i in full[j]))
            full[0], full[longest] = full[longest], full[0]
        leftover.sort(key=lambda i: -self.lengths[i])
        tail = [leftover[b:b + self.batch_size] for b in range(0, len(leftover), self.batch_size)]
        return full + tail

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


# --------------------------------------------------------------------------------------------------------------------
# Fused element-wise ops (torch.compile on two small pure functions)
# --------------------------------------------------------------------------------------------------------------------

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`LlamaRMSNorm.forward`, op for op (fp32 statistics, cast back, then the weight)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


_COMPILED: dict[str, Any] = {}


def _compiled(name: str):
    if name not in _COMPILED:
        backend = os.environ.get("TRL_REJECTION_COMPILE_BACKEND", "inductor")  # "eager" in CPU tests: no codegen
        fn = {"rms_norm": _rms_norm, "silu_mul": _silu_mul}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True, backend=backend)
    return _COMPILED[name]


_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_SILU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def fuse_elementwise_ops(model: torch.nn.Module) -> int:
    """Run the RMSNorms and the SiLU-gated MLP activations of Llama-style language models as compiled, fused
    kernels (one pass over the activations instead of five or so, forward and backward). Two small pure functions
    are compiled once with dynamic shapes and shared by every layer; the matmuls (and LoRA) stay eager. Returns the
    number of patched modules."""
    from transformers.activations import SiLUActivation

    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if name in _RMS_NORMS and hasattr(module, "variance_epsilon") and "forward" not in vars(module):
            module.forward = (lambda m: lambda x: _compiled("rms_norm")(x, m.weight, m.variance_epsilon))(module)
            patched += 1
        elif (name in _SILU_MLPS and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU))
              and "forward" not in vars(module)):
            module.forward = (lambda m: lambda x: m.down_proj(_compiled("silu_mul")(m.gate_proj(x), m.up_proj(x))))(
                module)
            patched += 1
    return patched

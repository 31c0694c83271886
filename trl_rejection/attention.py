"""The `"sdpa_varlen"` attention: SDPA semantics, with the rows of a padding-free batch kept apart.

`register_varlen_attention` adds `"sdpa_varlen"` to transformers' `AttentionInterface` and `AttentionMaskInterface`.
For packed batches (`cu_seq_lens_q`, or `position_ids` restarting at 0, and no mask) it attends within each sequence
only, through PyTorch's flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`) on CUDA, or one
causal SDPA call per sequence elsewhere; for any other batch (padded, generation with a cache) it is transformers'
own SDPA, mask included. `use_varlen_attention` switches a model's language model to it with
`PreTrainedModel.set_attn_implementation` (the vision tower keeps its own attention).

`use_varlen_vision_attention` switches the vision encoders of Qwen2-VL, Qwen2.5-VL and Qwen3-VL to the same function
under a second name, `"varlen_flash_sdpa"`: transformers gives those encoders' attention `cu_seqlens` (each image, or
each window of Qwen2.5-VL's window attention, a sequence) only for implementations named "flash"; under `"sdpa"` it
runs one SDPA call per window (~9,400 calls a step, CPU-bound, for Qwen2.5-VL-7B at batch 16). Packed sequences of a
non-causal module attend fully within themselves: one varlen flash call per layer on CUDA, one SDPA call per sequence
elsewhere.

Inside each packed sequence it attends as the padded model does:

- a layer's `sliding_window` (Gemma 3's local layers, Mistral-style models) is kept: a token sees the last
  `sliding_window` tokens of its row, itself included;
- with `image_block_ids` (Gemma 3 batches from `RejectionDataCollator`, see `trl_rejection.packing.image_block_ids`)
  the tokens of one image also attend to each other in both directions, the rest stays causal. With the flash kernel
  and no sliding window shorter than a row, that is two kernel calls: causal over all rows, then each image's tokens
  again over their row up to the image's end, unmasked. Otherwise sequences with images run one SDPA call each with
  their exact boolean mask (built once per batch and layer kind), the others stay causal.

Example:
    >>> use_varlen_attention(model)  # doctest: +SKIP
    True
    >>> packed = RejectionDataCollator(processor, padding_free=True)(rows)  # doctest: +SKIP
    >>> loss = model(**packed).loss  # the padded batch's loss  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .packing import IMAGE_BLOCK_PACKABLE

VARLEN_ATTENTION = "sdpa_varlen"
VISION_VARLEN_ATTENTION = "varlen_flash_sdpa"  # "flash" in the name: transformers then passes the vision cu_seqlens
VISION_CU_SEQLENS_MODELS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
"""Model types whose vision encoder attends within `cu_seqlens` blocks, passed to flash-named implementations."""


def _load_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    return varlen_attn, inspect.signature(varlen_attn).parameters


_VARLEN_ATTN, _VARLEN_PARAMS = _load_varlen_attn()
_CU_CACHE: dict[str, Any] = {"key": None, "value": None}
_MASK_CACHE: dict[str, Any] = {"key": None, "images": [], "masks": {}, "host": None}
_HALF = (torch.float16, torch.bfloat16)


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


def _flash_mask_kwargs(window: int | None) -> dict[str, Any] | None:
    """The kernel's causal (and sliding-window) arguments; None if this torch's kernel has no window argument."""
    if window is None and "is_causal" in _VARLEN_PARAMS:
        return {"is_causal": True}
    if "window_size" in _VARLEN_PARAMS:  # causal in torch >= 2.12: (left, right) tokens around the query
        return {"window_size": (-1 if window is None else window - 1, 0)}
    return None


def _full_mask_kwargs() -> dict[str, Any] | None:
    """The kernel's arguments for attending to every key (no causal mask); None if this torch cannot say it."""
    if "is_causal" in _VARLEN_PARAMS:
        return {"is_causal": False}
    if "window_size" in _VARLEN_PARAMS:
        return {"window_size": (-1, -1)}
    return None


def _flash_varlen(query, key, value, cu, max_len, scaling, mask_kwargs, cu_k=None, max_k=None):
    """The varlen flash kernel on (1, heads, tokens, head_dim) inputs; keys laid out by `cu_k` if given."""
    dtype = flash_input_dtype(query, key, value)
    out_dtype = query.dtype
    query, key, value = (t.to(dtype) for t in (query, key, value))
    kwargs: dict[str, Any] = dict(mask_kwargs)
    if scaling is not None:
        if "scale" in _VARLEN_PARAMS:
            kwargs["scale"] = scaling
        elif not math.isclose(scaling, query.shape[-1] ** -0.5):
            query = query * (scaling * query.shape[-1] ** 0.5)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, head_dim)
    cu = cu.to(device=q.device, dtype=torch.int32)
    cu_k = cu if cu_k is None else cu_k.to(device=q.device, dtype=torch.int32)
    out = _VARLEN_ATTN(q, k, v, cu, cu_k, max_len, max_len if max_k is None else max_k, **kwargs)
    # SDPA under autocast returns the autocast dtype; without autocast, keep the query's dtype for what follows
    return out[None] if torch.is_autocast_enabled(out.device.type) else out[None].to(out_dtype)


def _image_block_layout(cu: torch.Tensor, blocks: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Where the image tokens of a packed batch are and what each may see: for every image block (in order), its
    tokens as queries and its row's tokens up to the block's end as keys. Built once per batch (host copy of
    `blocks` shared with `_rows_with_images`)."""
    cache = _MASK_CACHE["masks"]
    if ("layout", device) in cache:  # the layers of a model split over devices (device_map) each get their own
        return cache[("layout", device)]
    if "layout" not in cache:
        bounds = _boundaries(cu)
        host = _MASK_CACHE["host"]
        q_idx, k_idx, q_lens, k_lens = [], [], [], []
        for s, e in zip(bounds[:-1], bounds[1:]):
            row = host[s:e]
            for b in row[row >= 0].unique().tolist():
                where = (row == b).nonzero().flatten()
                first, last = int(where[0]) + s, int(where[-1]) + s + 1
                if len(where) != last - first:
                    raise ValueError(f"image block {b} of the packed row at {s} is not contiguous; image_block_ids "
                                     "must number each image's tokens as one run (packing.image_block_ids)")
                q_idx.append(torch.arange(first, last))
                k_idx.append(torch.arange(s, last))
                q_lens.append(last - first)
                k_lens.append(last - s)
        cache["layout"] = dict(q_idx=torch.cat(q_idx), k_idx=torch.cat(k_idx),
                               cu_q=torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32),
                               cu_k=torch.tensor([0, *k_lens]).cumsum(0).to(torch.int32),
                               max_q=max(q_lens), max_k=max(k_lens))
    cache[("layout", device)] = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cache["layout"].items()}
    return cache[("layout", device)]


def _flash_varlen_with_images(query, key, value, cu, max_len, scaling, blocks, causal_kwargs):
    """Causal attention within each packed row, except that the tokens of one image also see each other: the causal
    kernel over all rows (`causal_kwargs`), then for each image's tokens the kernel again, unmasked, over their row
    up to the image's end (exactly the keys the padded model's mask lets them see), written over their causal
    outputs."""
    out = _flash_varlen(query, key, value, cu, max_len, scaling, causal_kwargs)
    layout = _image_block_layout(cu, blocks, query.device)
    q_idx, k_idx = layout["q_idx"], layout["k_idx"]
    images = _flash_varlen(query[:, :, q_idx], key[:, :, k_idx], value[:, :, k_idx], layout["cu_q"],
                           layout["max_q"], scaling, _full_mask_kwargs(), layout["cu_k"], layout["max_k"])
    return out.index_copy(1, q_idx, images.to(out.dtype))


def _rows_with_images(cu: torch.Tensor, blocks: torch.Tensor | None) -> list[bool]:
    """Which packed sequences hold image tokens (`blocks >= 0`), once per batch: the tensor objects are the key of
    this and of `_row_masks`' cache (one host copy of `blocks`)."""
    key = _MASK_CACHE["key"]
    if key is None or key[0] is not cu or key[1] is not blocks:
        bounds = _boundaries(cu)
        host = None if blocks is None else blocks[0].cpu()
        _MASK_CACHE["key"], _MASK_CACHE["masks"], _MASK_CACHE["host"] = (cu, blocks), {}, host
        _MASK_CACHE["images"] = [host is not None and bool((host[s:e] >= 0).any())
                                 for s, e in zip(bounds[:-1], bounds[1:])]
    return _MASK_CACHE["images"]


def _row_mask(blocks: torch.Tensor, window: int | None) -> torch.Tensor:
    """One sequence's boolean mask (True: attend): causal or same image (`blocks`, -1 for text), within `window`."""
    idx = torch.arange(blocks.shape[0], device=blocks.device)
    mask = (idx[None, :] <= idx[:, None]) | (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0)
    if window is not None:
        mask &= idx[None, :] > idx[:, None] - window
    return mask


def _row_masks(cu: torch.Tensor, blocks: torch.Tensor | None, window: int | None,
               device: torch.device) -> list[torch.Tensor | None]:
    """Each sequence's `_row_mask`, or None where it is plain causal (no image, not longer than `window`: SDPA's
    `is_causal` then); built once per batch and window."""
    images = _rows_with_images(cu, blocks)
    cache = _MASK_CACHE["masks"]
    if window not in cache:
        bounds = _boundaries(cu)
        if blocks is None:
            blocks = torch.full((1, bounds[-1]), -1, device=device)
        cache[window] = [_row_mask(blocks[0, s:e].to(device), window)
                         if image or window is not None and e - s > window else None
                         for image, s, e in zip(images, bounds[:-1], bounds[1:])]
    return cache[window]


def _no_cudnn_sdpa() -> contextlib.AbstractContextManager:
    """SDPA without cuDNN for the per-sequence masked calls: cuDNN builds (and caches by shape) an execution plan for
    each new sequence length, ~1.7 ms of CPU time a call (Gemma 3 on an H100: GPU busy 34% of the step). The other
    backends stay as the user set them."""
    cuda = torch.backends.cuda
    enabled = [backend for backend, on in ((SDPBackend.FLASH_ATTENTION, cuda.flash_sdp_enabled()),
                                           (SDPBackend.EFFICIENT_ATTENTION, cuda.mem_efficient_sdp_enabled()),
                                           (SDPBackend.MATH, cuda.math_sdp_enabled())) if on]
    return sdpa_kernel(enabled) if enabled else contextlib.nullcontext()


def _loop_varlen(query, key, value, cu, scaling, masks=None, causal=True):
    bounds = _boundaries(cu)
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    backends = contextlib.nullcontext() if masks is None else _no_cudnn_sdpa()
    masks = masks or [None] * len(sizes)
    # `split`, not slicing: the backward of a split is one concatenation, that of n slices n full-size buffers
    with backends:
        outs = [torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None if m is None else m.to(q.device), is_causal=causal and m is None, scale=scaling)
            for (q, k, v), m in zip(zip(*(t.split(sizes, dim=2) for t in (query, key, value))), masks) if q.shape[2]]
    return torch.cat(outs, 2).transpose(1, 2).contiguous()


def varlen_sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None,
                                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal attention within each packed sequence, else plain SDPA.

    On packed batches, `kwargs` may carry the layer's `sliding_window` (transformers passes it) and the batch's
    `image_block_ids` (Gemma 3; the model passes inputs it does not know down to its attention): see the module
    docstring for how those are kept. A non-causal module (`is_causal=False`: a vision encoder's) given `cu_seq_lens_q`
    attends fully within each sequence.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    one_row = query.shape[0] == 1 and query.shape[2] == key.shape[2]
    bidirectional = cu is not None and one_row and (is_causal is False or not getattr(module, "is_causal", True))
    if bidirectional and (attention_mask is not None or dropout):  # plain SDPA would attend across the sequences
        raise ValueError(f"{type(module).__name__}: packed sequences (cu_seq_lens_q) of a non-causal attention "
                         "with attention dropout or a mask are not supported. Fix: set the vision config's "
                         "attention dropout to 0, or varlen_vision_attention=False.")
    packed = cu is not None and attention_mask is None and one_row and not dropout
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
    max_len = int(kwargs.get("max_length_q") or cu.diff().max())
    half = varlen_backend(query.device) == "flash" and flash_input_dtype(query, key, value) is not None
    if bidirectional:  # full attention within each sequence
        full = _full_mask_kwargs()
        if half and full is not None:
            return _flash_varlen(query, key, value, cu, max_len, scaling, full), None
        return _loop_varlen(query, key, value, cu, scaling, causal=False), None
    window = kwargs.get("sliding_window")
    window = window if window is not None and window < max_len else None  # no longer sequence: plain causal
    blocks = kwargs.get("image_block_ids")
    images = blocks is not None and any(_rows_with_images(cu, blocks))
    flash_kwargs = _flash_mask_kwargs(window)
    flash = flash_kwargs is not None and half
    if flash and not images:
        return _flash_varlen(query, key, value, cu, max_len, scaling, flash_kwargs), None
    if flash and window is None and _full_mask_kwargs() is not None:  # images, no binding window
        return _flash_varlen_with_images(query, key, value, cu, max_len, scaling, blocks, flash_kwargs), None
    masks = _row_masks(cu, blocks, window, query.device) if images or window is not None else None
    return _loop_varlen(query, key, value, cu, scaling, masks), None


def _varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """Mask builder for `"sdpa_varlen"`: none for packed/unpadded inputs, SDPA's own for padded ones."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register `"sdpa_varlen"` (and its vision-encoder name `"varlen_flash_sdpa"`) with transformers' attention and
    mask interfaces (idempotent); return `"sdpa_varlen"`."""
    from transformers import AttentionInterface, AttentionMaskInterface

    for name in (VARLEN_ATTENTION, VISION_VARLEN_ATTENTION):
        AttentionInterface.register(name, varlen_sdpa_attention_forward)
        AttentionMaskInterface.register(name, _varlen_mask)
    return VARLEN_ATTENTION


def _sub_config_path(config: Any, target: Any) -> list[str] | None:
    """The `sub_configs` keys leading from `config` to `target` (`[]`: `target` is `config`); None if not found."""
    if target is config:
        return []
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        path = None if sub is None else _sub_config_path(sub, target)
        if path is not None:
            return [key, *path]
    return None


def use_varlen_attention(model: Any) -> bool:
    """Switch the language model of `model` from `"sdpa"` to `"sdpa_varlen"`; False if it uses something else.

    One `model.set_attn_implementation` call, addressed to the text sub-config of a composite model (e.g.
    `{"text_config": "sdpa_varlen"}`), so the vision tower keeps its attention. Flash-attention implementations
    already read `cu_seq_lens_*`; eager and flex attention build a block-diagonal mask from the packed
    `position_ids` (correct, slower), so they are left alone - except for Gemma 3, whose image-token mask
    transformers gets wrong in packed batches (`trl_rejection.packing.IMAGE_BLOCK_PACKABLE`): a `ValueError` then.
    """
    config = model.config
    text = config.get_text_config()
    path = _sub_config_path(config, text)
    if text._attn_implementation not in ("sdpa", VARLEN_ATTENTION) or path is None:
        if config.model_type in IMAGE_BLOCK_PACKABLE:
            raise ValueError(f"Padding-free {config.model_type} batches need attn_implementation='sdpa' (switched to "
                             f"{VARLEN_ATTENTION!r} for the image-token mask), not {text._attn_implementation!r}. "
                             "Fix: load the model with attn_implementation='sdpa', or set padding_free=False.")
        return False
    request: str | dict[str, Any] = register_varlen_attention()
    for key in reversed(path):
        request = {key: request}
    model.set_attn_implementation(request)
    return True


def use_varlen_vision_attention(model: Any) -> bool:
    """Switch the vision encoder of a `VISION_CU_SEQLENS_MODELS` model from `"sdpa"` to `"varlen_flash_sdpa"`: one
    kernel call per layer for all its images / windows instead of one SDPA call each. False (nothing changed) for
    other models or another attention (a flash-attention implementation already gets the `cu_seqlens`)."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    if config.model_type not in VISION_CU_SEQLENS_MODELS or vision is None \
            or vision._attn_implementation not in ("sdpa", VISION_VARLEN_ATTENTION):
        return False
    register_varlen_attention()
    model.set_attn_implementation({"vision_config": VISION_VARLEN_ATTENTION})
    return True

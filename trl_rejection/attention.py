"""The `"sdpa_varlen"` attention: SDPA semantics, with the rows of a padding-free batch kept apart.

`register_varlen_attention` adds `"sdpa_varlen"` to transformers' `AttentionInterface` and `AttentionMaskInterface`.
For packed batches (`cu_seq_lens_q`, or `position_ids` restarting at 0, and no mask) it attends within each sequence
only, through PyTorch's flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`) on CUDA, or one
causal SDPA call per sequence elsewhere; for any other batch (padded, generation with a cache) it is transformers'
own SDPA, mask included. `use_varlen_attention` switches a model's language model to it with
`PreTrainedModel.set_attn_implementation` (the vision tower keeps its own attention).
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any

import torch

VARLEN_ATTENTION = "sdpa_varlen"


def _load_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    return varlen_attn, inspect.signature(varlen_attn).parameters


_VARLEN_ATTN, _VARLEN_PARAMS = _load_varlen_attn()
_CU_CACHE: dict[str, Any] = {"key": None, "value": None}
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
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
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
    `position_ids` (correct, slower), so they are left alone.
    """
    config = model.config
    text = config.get_text_config()
    path = _sub_config_path(config, text)
    if text._attn_implementation not in ("sdpa", VARLEN_ATTENTION) or path is None:
        return False
    request: str | dict[str, Any] = register_varlen_attention()
    for key in reversed(path):
        request = {key: request}
    model.set_attn_implementation(request)
    return True

"""Leaner LoRA forwards for PEFT's `Linear` layers: dropout that keeps no dropped copy of its input for the backward,
and the adapter's output added to the base layer's inside one matmul.

`recompute_lora_dropout`: PEFT computes `lora_B(lora_A(dropout(x)))`: autograd then keeps, for every LoRA layer, the dropped copy of `x` (for
`lora_A`'s weight gradient) and the dropout mask, although `x` itself is kept anyway (and shared by q, k and v). On
Llama-2-7B that is ~100 KB per token and layer, about 40% of what a layer keeps without gradient checkpointing.
`recompute_lora_dropout(model)` runs `lora_A(dropout(x))` of each vanilla LoRA `Linear` under a non-reentrant
`torch.utils.checkpoint`, which keeps `x` only and replays the dropout (same random state) in the backward: the same
masks, losses and gradients as PEFT's, for one extra rank-r matmul per layer in the backward.

Layers that gradient checkpointing already recomputes keep nothing anyway; there the plain path runs (checked at each
call, as `AutoLayerCheckpointing` changes the layers' checkpointing between micro-batches).

`fuse_lora_output`: PEFT adds `lora_B(a) * scaling` to the base output with a multiply and an add over the whole
`tokens x out_features` output (and a multiply again in the backward). `torch.addmm(result, a, lora_B.weight.T,
alpha=scaling)` does both in the matmul's epilogue: the same sum, rounded once instead of three times in half
precision (so equal to PEFT's within bf16 rounding, not bit for bit).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _owners(model: torch.nn.Module) -> dict[torch.nn.Module, torch.nn.Module]:
    """Each module inside a `GradientCheckpointingLayer` -> that (innermost) layer."""
    from transformers import GradientCheckpointingLayer

    owners: dict[torch.nn.Module, torch.nn.Module] = {}
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            for module in layer.modules():
                owners[module] = layer  # inner layers come later in `modules()` and win
    return owners


def _forward(lora_a: torch.nn.Module, linear: Callable[[torch.Tensor], torch.Tensor], p: float,
             owner: torch.nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    def dropped(y: torch.Tensor) -> torch.Tensor:
        return linear(torch.nn.functional.dropout(y, p, lora_a.training))

    recomputed_anyway = owner is not None and owner.gradient_checkpointing and owner.training
    if not lora_a.training or not torch.is_grad_enabled() or recomputed_anyway:
        return dropped(x)
    return checkpoint(dropped, x, use_reentrant=False)


def recompute_lora_dropout(model: torch.nn.Module) -> int:
    """Move the dropout of every vanilla LoRA adapter of PEFT's `Linear` layers into its `lora_A`, recomputed in the
    backward instead of kept (see the module docstring); return the number of adapters changed. Adapters with dropout
    0 or in-place dropout, variants (DoRA, ...) and other layer types are left alone; calling it twice changes nothing
    more."""
    from peft.tuners.lora import Linear as LoraLinear

    owners = _owners(model)
    changed = 0
    for module in model.modules():
        if type(module) is not LoraLinear:
            continue
        for name, lora_a in module.lora_A.items():
            dropout = module.lora_dropout[name]
            if name in module.lora_variant or type(dropout) is not torch.nn.Dropout or dropout.p == 0 \
                    or dropout.inplace:
                continue
            lora_a.forward = functools.partial(_forward, lora_a, lora_a.forward, dropout.p, owners.get(module))
            module.lora_dropout[name] = torch.nn.Identity()
            changed += 1
    return changed


def _fusable(layer: torch.nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether `layer`'s forward on `x` is PEFT's plain path for vanilla adapters, which `_fused_forward` replaces."""
    adapters = [name for name in layer.active_adapters if name in layer.lora_A]
    if args or kwargs or layer.disable_adapters or layer.merged or not adapters:
        return False
    for name in adapters:
        weight = layer.lora_B[name].weight
        if name in layer.lora_variant or layer.lora_B[name].bias is not None or hasattr(weight, "ds_id"):
            return False  # variants (DoRA, ...), LoRA biases, ZeRO-3-partitioned factors: PEFT's own forward
        if getattr(layer, "cast_input_dtype_enabled", True) and x.dtype != layer.lora_A[name].weight.dtype:
            return False  # PEFT would upcast the input (`cast_lora_inputs=True`, or no autocast)
    return True


def _fused_forward(layer: torch.nn.Module, original: Callable[..., torch.Tensor], x: torch.Tensor, *args,
                   **kwargs) -> torch.Tensor:
    if not _fusable(layer, x, args, kwargs):
        return original(x, *args, **kwargs)
    result = layer.base_layer(x)
    dtype = result.dtype
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        a = layer.lora_A[name](layer.lora_dropout[name](x))
        weight = layer.lora_B[name].weight
        if not torch.is_autocast_enabled(x.device.type) and not result.dtype == a.dtype == weight.dtype:
            result = result + layer.lora_B[name](a) * layer.scaling[name]  # mixed dtypes: PEFT's promotion
            continue
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]), weight.t(),
                           alpha=layer.scaling[name])
        result = flat.view(*result.shape[:-1], flat.shape[-1])
    return result.to(dtype)


def fuse_lora_output(model: torch.nn.Module) -> int:
    """Add each vanilla LoRA adapter's scaled output inside one `addmm` in PEFT's `Linear` layers (see the module
    docstring); return the number of layers changed. PEFT's own forward still runs for merged or disabled adapters,
    variants (DoRA, ...), LoRA biases, ZeRO-3-partitioned factors and inputs PEFT would upcast; calling it twice
    changes nothing more."""
    from peft.tuners.lora import Linear as LoraLinear

    changed = 0
    for module in model.modules():
        if type(module) is LoraLinear and "forward" not in vars(module):
            module.forward = functools.partial(_fused_forward, module, module.forward)
            changed += 1
    return changed

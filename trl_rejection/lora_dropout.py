"""LoRA dropout that keeps no dropped copy of its input for the backward.

PEFT computes `lora_B(lora_A(dropout(x)))`: autograd then keeps, for every LoRA layer, the dropped copy of `x` (for
`lora_A`'s weight gradient) and the dropout mask, although `x` itself is kept anyway (and shared by q, k and v). On
Llama-2-7B that is ~100 KB per token and layer, about 40% of what a layer keeps without gradient checkpointing.
`recompute_lora_dropout(model)` runs `lora_A(dropout(x))` of each vanilla LoRA `Linear` under a non-reentrant
`torch.utils.checkpoint`, which keeps `x` only and replays the dropout (same random state) in the backward: the same
masks, losses and gradients as PEFT's, for running each adapter's dropout and rank-r `lora_A` matmul again in the
backward (with a save and restore of the random state per adapter).

Layers that gradient checkpointing already recomputes keep nothing anyway; there the plain path runs (checked at each
call, as `AutoLayerCheckpointing` changes the layers' checkpointing between micro-batches).
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

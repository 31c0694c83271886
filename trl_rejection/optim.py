"""The projector's own optimizer parameter groups (`projector_lr`), built when the optimizer is created.

Example:
    >>> import torch
    >>> model = torch.nn.ModuleDict({"multi_modal_projector": torch.nn.Linear(2, 2), "lm": torch.nn.Linear(2, 2)})
    >>> groups = [{"params": list(model.parameters()), "weight_decay": 0.0}]
    >>> projector = projector_parameter_ids(model, ["multi_modal_projector"])
    >>> [(len(g["params"]), g.get("lr")) for g in split_projector_groups(groups, projector, 2e-5)]
    [(2, None), (2, 2e-05)]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch


def projector_parameter_ids(model: torch.nn.Module, fragments: Sequence[str]) -> set[int]:
    """`id`s of the trainable parameters whose name contains one of `fragments`; a clear error when there are none."""
    ids = {id(p) for n, p in model.named_parameters() if p.requires_grad and any(f in n for f in fragments)}
    if not ids:
        raise ValueError(f"projector_lr is set but no trainable parameter name contains any of {list(fragments)}. "
                         "Fix: with LoRA, add the projector to `modules_to_save` (e.g. ['multi_modal_projector']), "
                         "or set `projector_modules` to its name.")
    return ids


def split_projector_groups(groups: Sequence[dict[str, Any]], projector: set[int], lr: float) -> list[dict[str, Any]]:
    """Each parameter group split in two: its other parameters, then its projector parameters with learning rate
    `lr` (every other option of the group, such as `weight_decay`, is kept). Empty groups are left out."""
    out: list[dict[str, Any]] = []
    for group in groups:
        rest = [p for p in group["params"] if id(p) not in projector]
        own = [p for p in group["params"] if id(p) in projector]
        out += [{**group, "params": rest}] if rest else []
        out += [{**group, "params": own, "lr": lr}] if own else []
    return out


@contextlib.contextmanager
def fp32_masters(model: torch.nn.Module) -> Iterator[list[str]]:
    """Inside the block, every trainable half-precision parameter of `model` is float32 (the same `Parameter`
    objects, so an optimizer that holds them keeps working); after it, each is cast back to its own dtype, so the
    model leaves as it came (generation and saving see the checkpoint's dtype). Yields the names cast."""
    cast = [(name, param, param.dtype) for name, param in model.named_parameters()
            if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16)]
    for _, param, _ in cast:
        param.data = param.data.float()
    try:
        yield [name for name, _, _ in cast]
    finally:
        for _, param, dtype in cast:
            param.data = param.data.to(dtype)


def keep_embeddings_32bit(optimizer_cls: type, optimizer_kwargs: dict[str, Any], model: torch.nn.Module) -> None:
    """For an 8-bit bitsandbytes optimizer, keep the embeddings' optimizer states in 32 bits, as
    `Trainer.create_optimizer` does for the optimizers it builds."""
    if "bitsandbytes" not in str(optimizer_cls) or optimizer_kwargs.get("optim_bits") != 8:
        return
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})

"""No backward pass through a frozen vision encoder (`skip_frozen_vision_backward`).

With PEFT and gradient checkpointing, transformers' `enable_input_require_grads` (called by PEFT, TRL and
`gradient_checkpointing_enable`) marks the output of every sub-model's input embeddings as requiring grad, the vision
tower's patch embedding included. Every step then recomputes (checkpointing) and backpropagates through the whole
frozen vision tower, although no trainable parameter lies there: for Gemma 3's SigLIP at 896 px that is about as much
work as the language model's own backward. When nothing upstream of the projector trains, the projector's inputs can
be detached: the gradients of every trainable parameter stay what they were.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch


logger = logging.getLogger(__name__)

_TRAINED_ELSEWHERE_OK = ("language_model", "lm_head")
"""Name fragments of the parameters downstream of the projector (transformers 5 composite models)."""

DETACHING = weakref.WeakSet()
"""The projector modules whose inputs `skip_frozen_vision_backward` detaches."""


def _projector_entries(model: torch.nn.Module, fragments: Sequence[str]) -> list[tuple[str, torch.nn.Module]]:
    """The outermost modules whose name contains a projector fragment (PEFT's `modules_to_save` wrapper, not its
    copies), a module list replaced by its members (a list is never called itself)."""
    entries: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if not any(f in name for f in fragments) or any(name.startswith(e + ".") for e, _ in entries):
            continue
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            entries += [(f"{name}.{n}", m) for n, m in module.named_children()]
        else:
            entries.append((name, module))
    return entries


def _detach_inputs(module, args, kwargs):
    detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}


def skip_frozen_vision_backward(model: torch.nn.Module, projector_modules: Sequence[str]) -> list[str]:
    """Detach the inputs of the projector modules (names containing one of `projector_modules`) when every trainable
    parameter lies in a projector, the language model or the LM head, so that no gradient flows into the vision
    encoder. Returns the projector modules hooked; [] (nothing changed) if some other parameter trains (a LoRA on the
    vision tower, an unfrozen vision layer) or no projector is found."""
    entries = _projector_entries(model, projector_modules)
    if not entries:
        return []
    elsewhere = [n for n, p in model.named_parameters() if p.requires_grad
                 and not any(f in n for f in (*projector_modules, *_TRAINED_ELSEWHERE_OK))]
    if elsewhere:
        logger.info("Backpropagating through the vision encoder: %s trains.", elsewhere[0])
        return []
    for _, module in entries:
        if module not in DETACHING:  # once, however often this is called
            module.register_forward_pre_hook(_detach_inputs, with_kwargs=True)
            DETACHING.add(module)
    return [name for name, _ in entries]

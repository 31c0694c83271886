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

HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Projector module -> the handle of the pre-hook `skip_frozen_vision_backward` put on it."""


def _projector_entries(model: torch.nn.Module, fragments: Sequence[str]) -> list[tuple[str, torch.nn.Module]]:
    """The outermost modules whose name contains a projector fragment (PEFT's `modules_to_save` wrapper, not its
    copies), a module list replaced by its members (a list is never called itself)."""
    entries: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():
        if not any(f in name for f in fragments) or any(name == e or name.startswith(e + ".") for e, _ in entries):
            continue
        if isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            entries += [(f"{name}.{n}", m) for n, m in module.named_children()]
        else:
            entries.append((name, module))
    return entries


def _detaching_hook(upstream: list[torch.nn.Parameter]):
    """A forward pre-hook detaching a module's tensor inputs while none of `upstream` requires grad (checked at each
    call: a vision tower unfrozen later, e.g. by a callback or a second training stage, gets its gradients)."""

    def hook(module, args, kwargs):
        if any(p.requires_grad for p in upstream):
            return None
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        return tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()}

    return hook


def skip_frozen_vision_backward(model: torch.nn.Module, projector_modules: Sequence[str],
                                enabled: bool = True) -> list[str]:
    """While every trainable parameter lies in a projector (names containing one of `projector_modules`), the
    language model or the LM head, the projector modules' inputs are detached, so no gradient flows into the vision
    encoder. The condition is checked at every forward. Returns the projector modules hooked ([] if none is found);
    `enabled=False` removes hooks an earlier call put on this model's projectors."""
    entries = _projector_entries(model, projector_modules)
    upstream = [(n, p) for n, p in model.named_parameters()
                if not any(f in n for f in (*projector_modules, *_TRAINED_ELSEWHERE_OK))]
    hook = _detaching_hook([p for _, p in upstream])
    for _, module in entries:
        if module in HOOKS:
            HOOKS.pop(module).remove()
        if enabled:
            HOOKS[module] = module.register_forward_pre_hook(hook, with_kwargs=True)
    trained = next((n for n, p in upstream if p.requires_grad), None)
    if enabled and entries and trained:
        logger.info("Backpropagating through the vision encoder while %s trains.", trained)
    return [name for name, _ in entries] if enabled else []

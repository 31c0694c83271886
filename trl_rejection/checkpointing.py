"""Activation checkpointing sized to the GPU: checkpoint only as many trainable layers as free memory requires.

transformers checkpoints every layer (`gradient_checkpointing=True`): the backward then runs each layer's forward a
second time, a third more work than the training step needs, even when the memory it frees goes unused (24 of 80 GiB
on an H100 for LLaVA-1.5-7B at batch 16). `AutoLayerCheckpointing` decides before each micro-batch how many of the
trainable layers (`GradientCheckpointingLayer`s with a trainable parameter, e.g. LoRA) keep their activations instead,
from three measured numbers:

- `per_token`: the bytes one layer keeps for the backward, per token. Measured once, on the first micro-batch, by
  leaving one layer uncheckpointed and counting the distinct storages autograd saves in its forward
  (`torch.autograd.graph.saved_tensors_hooks`; parameters excluded).
- `transient`: the bytes per token that a step with every layer checkpointed needs on top of what is allocated before
  it (the checkpointed layers' inputs, one layer's recompute, the loss): the device's peak minus the memory allocated
  at the micro-batch's start. It only grows: whenever a micro-batch sets a new peak, the excess is added.
- the limit: `memory_fraction` of the device's memory.

Layers kept = (limit - allocated - transient x tokens) / (per_token x tokens), the last layers first. Checkpointing
does not change the maths (the recompute is exact and replays the random state), so losses are those of full
checkpointing. CUDA only; elsewhere every layer stays checkpointed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch

logger = logging.getLogger(__name__)


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's `GradientCheckpointingLayer`s that hold a trainable parameter, in forward order."""
    from transformers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)
            and any(p.requires_grad for p in m.parameters())]


def storage_pointer(t: torch.Tensor) -> int | None:
    """The data pointer of `t`'s storage; None for tensors without a plain storage (FSDP2's sharded DTensor
    parameters: their gathered copies, which the layer saves, then count as the layer's own, an overestimate)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


@contextlib.contextmanager
def count_saved_bytes(module: torch.nn.Module, exclude: set[int]) -> Iterator[list[int]]:
    """Count the bytes of the distinct storages (except those whose data pointer is in `exclude`: the parameters')
    that autograd saves for the backward while `module` runs its forward; the count is the yielded list's one item
    once the block ends."""
    seen: dict[int, int] = {}
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = storage_pointer(t)
        if ptr is not None and ptr not in exclude:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    active = []

    def enter(*_):
        hooks.__enter__()
        active.append(True)

    def leave(*_):
        if active:
            active.pop()
            hooks.__exit__(None, None, None)

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield count
    finally:
        leave()  # a forward that raised left the hooks on
        for handle in handles:
            handle.remove()
        count[0] = sum(seen.values())


class CudaMemory:
    """The allocator readings `AutoLayerCheckpointing` uses, for one CUDA device (a stand-in in CPU tests)."""

    def __init__(self, device: torch.device):
        self.device = device

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def total(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory


class AutoLayerCheckpointing:
    """Before each training micro-batch, un-checkpoint as many trainable layers as the measured memory allows.

    Args:
        model: The model, with gradient checkpointing enabled (each layer's flag is read at its forward).
        memory_fraction: Fraction of the device's memory the step may fill.
        memory: The device's allocator readings, e.g. `CudaMemory(device)`.
    """

    def __init__(self, model: torch.nn.Module, memory_fraction: float, memory: CudaMemory):
        self.model, self.memory_fraction, self.memory = model, memory_fraction, memory
        self.per_token: float | None = None
        self.transient: float | None = None
        self.kept: list[int] = []  # layers kept (not checkpointed) in each micro-batch since the last `pop`

    @contextlib.contextmanager
    def micro_batch(self, tokens: int) -> Iterator[None]:
        """Set the layers' checkpointing for a micro-batch of `tokens` tokens, then learn from its peak memory.

        Does nothing unless every trainable layer is checkpointed (checkpointing off, or a user's `every_n_layers`).
        """
        layers = checkpointed_layers(self.model)  # read each time: the model may have been wrapped since
        if not layers or not all(layer.gradient_checkpointing for layer in layers):
            yield
            return
        tokens = max(tokens, 1)
        if self.per_token is None:  # first micro-batch: measure the last layer, checkpoint the rest
            self.memory.reset_peak()  # loading peaks are not the step's
            params = {storage_pointer(p) for p in self.model.parameters()} - {None}
            probe = count_saved_bytes(layers[-1], params)
            n = 1
        else:
            probe, n = contextlib.nullcontext(), self.plan(len(layers), tokens)
        start = self.memory.allocated()
        peak_before = self.memory.peak()
        self._set(layers, n)
        try:
            with probe as counted:
                yield
        finally:
            self._set(layers, 0)
        if counted is not None:
            self.per_token = counted[0] / tokens
        peak = self.memory.peak()
        measured = max((peak - start) / tokens - n * self.per_token, 0.0)
        if self.transient is None or peak > peak_before:  # a new peak: what the estimate missed goes in
            self.transient = max(self.transient or 0.0, measured)
        self.kept.append(n)

    def plan(self, n_layers: int, tokens: int) -> int:
        """How many layers fit uncheckpointed in a micro-batch of `tokens` tokens, given what is allocated now."""
        limit = self.memory_fraction * self.memory.total()
        free = limit - self.memory.allocated() - (self.transient or 0.0) * tokens
        return max(0, min(n_layers, math.floor(free / (max(self.per_token or 0.0, 1.0) * tokens))))

    @staticmethod
    def _set(layers: list[torch.nn.Module], n: int) -> None:
        """Checkpoint every layer but the last `n`."""
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < len(layers) - n

    def pop(self) -> float | None:
        """Mean number of uncheckpointed layers per micro-batch since the last call (None: none measured)."""
        kept, self.kept = self.kept, []
        return sum(kept) / len(kept) if kept else None

"""Activation checkpointing sized to the GPU: checkpoint only as many trainable layers as free memory requires.

transformers checkpoints every layer (`gradient_checkpointing=True`): the backward then runs each layer's forward a
second time, a third more work than the training step needs, even when the memory it frees goes unused (24 of 80 GiB
on an H100 for LLaVA-1.5-7B at batch 16). `AutoLayerCheckpointing` decides before each micro-batch how many of the
trainable layers (`GradientCheckpointingLayer`s with a trainable parameter, e.g. LoRA) keep their activations instead,
from measured numbers:

- `per_token`: the bytes one layer keeps for the backward, per token: the distinct storages autograd saves while the
  last layer to run goes uncheckpointed once (`torch.autograd.graph.saved_tensors_hooks`; parameters excluded, but
  not the gathered copies of sharded FSDP / ZeRO-3 parameters, which make it an overestimate there).
- `transient`: the bytes per token a micro-batch needs on top of what is allocated at its start, beyond the layers
  kept: its peak (the device's peak statistics are reset at each micro-batch) minus its start. The second measure
  replaces the first (one-off allocations); after that the largest is kept.
- the limit: `memory_fraction` of the device's memory.

Layers kept = (limit - allocated - transient x tokens) / (per_token x tokens), the last ones to run. Checkpointing
does not change the maths (the recompute is exact and replays the random state), so losses are those of full
checkpointing. CUDA only; elsewhere every layer stays checkpointed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's `GradientCheckpointingLayer`s that hold a trainable parameter, in registration order (not
    necessarily the order they run in)."""
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

    Micro-batch 1 runs with every layer checkpointed and records the order the layers run in. The next one measures
    the last layer to run uncheckpointed (only if the memory a fully checkpointed step took fits twice more); from then
    on each micro-batch keeps the last `plan(...)` layers to run. The device's peak statistics are reset at each
    micro-batch's start, so each one is measured on its own; `peak_bytes` keeps the highest.

    Args:
        model: The model, with gradient checkpointing enabled (each layer's flag is read at its forward).
        memory_fraction: Fraction of the device's memory the step may fill.
        memory: The device's allocator readings, e.g. `CudaMemory(device)`.
        agree: Maps this process's number of layers to keep to the one every process uses (the minimum over processes
            when parameters are sharded, so that all of them recompute the same layers); None: keep its own.
    """

    def __init__(self, model: torch.nn.Module, memory_fraction: float, memory: CudaMemory,
                 agree: Callable[[int], int] | None = None):
        self.model, self.memory_fraction, self.memory, self.agree = model, memory_fraction, memory, agree
        self.per_token: float | None = None  # bytes one uncheckpointed layer keeps, per token
        self.transient: float | None = None  # bytes per token a fully checkpointed step adds to what is allocated
        self.peak_bytes = 0
        self.kept: list[int] = []  # layers kept (not checkpointed) in each micro-batch since the last `pop`
        self._layers: list[torch.nn.Module] | None = None  # the trainable layers, found at the first micro-batch
        self._order: list[torch.nn.Module] = []  # the trainable layers in the order they ran in micro-batch 1
        self._measured = 0

    @contextlib.contextmanager
    def micro_batch(self, tokens: int) -> Iterator[None]:
        """Set the layers' checkpointing for a micro-batch of `tokens` tokens, then learn from its peak memory.

        Does nothing unless every trainable layer is checkpointed (checkpointing off, or a user's `every_n_layers`).
        """
        if self._layers is None:  # at the first micro-batch: the trainer has wrapped the model by then
            self._layers = checkpointed_layers(self.model)
        layers = self._layers
        if not layers or not all(layer.gradient_checkpointing for layer in layers):
            yield
            return
        tokens = max(tokens, 1)
        probing = self.transient is not None and self.per_token is None and bool(self._order)
        if self.transient is None:
            n = 0
        elif probing:
            n = int(self._room(tokens) >= self.transient * tokens)  # a layer keeps less than a whole step's extra
        else:
            n = self.plan(len(self._order), tokens)
        if self.agree is not None:
            n = self.agree(n)
        keep = self._order[len(self._order) - n:] if n else []
        probe = contextlib.nullcontext()
        if probing and n:
            params = {storage_pointer(p) for p in self.model.parameters()} - {None}
            probe = count_saved_bytes(keep[0], params)
        hooks = [layer.register_forward_pre_hook(self._record) for layer in layers] if self.transient is None else []
        self.memory.reset_peak()
        start = self.memory.allocated()
        for layer in layers:
            layer.gradient_checkpointing = layer not in keep
        try:
            with probe as counted:
                yield
        finally:
            for layer in layers:
                layer.gradient_checkpointing = True
            for hook in hooks:
                hook.remove()
        peak = self.memory.peak()
        self.peak_bytes = max(self.peak_bytes, peak)
        if counted is not None and counted[0] > 0:  # (nothing saved: measured again next time)
            self.per_token = counted[0] / tokens
        measured = max((peak - start) / tokens - n * (self.per_token or 0.0), 0.0)
        self._measured += 1
        # micro-batch 1's peak holds one-off allocations (first gradients, kernel autotuning): replaced once, then
        # only raised
        self.transient = measured if self._measured <= 2 else max(self.transient, measured)
        self.kept.append(n)

    def _record(self, layer: torch.nn.Module, *_) -> None:
        if layer not in self._order:
            self._order.append(layer)

    def _room(self, tokens: int) -> float:
        """Bytes left under the limit once a fully checkpointed micro-batch of `tokens` tokens has run."""
        limit = self.memory_fraction * self.memory.total()
        return limit - self.memory.allocated() - (self.transient or 0.0) * tokens

    def plan(self, n_layers: int, tokens: int) -> int:
        """How many layers fit uncheckpointed in a micro-batch of `tokens` tokens, given what is allocated now."""
        if not self.per_token:
            return 0
        return max(0, min(n_layers, math.floor(self._room(tokens) / (self.per_token * tokens))))

    def pop(self) -> float | None:
        """Mean number of uncheckpointed layers per micro-batch since the last call (None: none measured)."""
        kept, self.kept = self.kept, []
        return sum(kept) / len(kept) if kept else None

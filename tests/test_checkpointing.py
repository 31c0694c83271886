"""`checkpoint_layers="auto"` (fewer checkpointed layers where memory allows) and `recompute_lora_dropout` (no dropped
copy of each LoRA input kept): both change what is kept for the backward, never the losses or gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from trl_rejection.checkpointing import AutoLayerCheckpointing, checkpointed_layers, count_saved_bytes
from trl_rejection.config import RejectionSFTConfig
from trl_rejection.lora_dropout import recompute_lora_dropout
from trl_rejection.testing.tiny import make_model, make_processor
from trl_rejection.validation import ConfigError

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lm(dropout: float = 0.3, layers: int = 4) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give the adapters a gradient path through A
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def loss_and_grads(model: torch.nn.Module, seed: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(7))
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def enable_checkpointing(model: torch.nn.Module) -> None:
    model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    model.get_base_model().enable_input_require_grads()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_recomputed_lora_dropout_gives_peft_dropouts_losses_and_gradients_bit_for_bit(checkpointing):
    plain = tiny_lm()
    patched = copy.deepcopy(plain)
    assert recompute_lora_dropout(patched) == 4 * len(TARGETS)
    assert recompute_lora_dropout(patched) == 0  # already moved
    if checkpointing:
        enable_checkpointing(plain)
        enable_checkpointing(patched)
    loss, grads = loss_and_grads(plain)
    loss_p, grads_p = loss_and_grads(patched)
    assert torch.equal(loss, loss_p)
    assert grads.keys() == grads_p.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        assert torch.equal(grads[name], grads_p[name]), name
    # the masks are live: another random state gives other gradients, and eval mode has no dropout at all
    assert not torch.equal(loss_and_grads(patched, seed=2)[1][name], grads_p[name])
    plain.eval(), patched.eval()
    ids = torch.arange(24)[None]
    with torch.no_grad():
        no_dropout = tiny_lm(dropout=0.0).eval()
        assert torch.equal(patched(input_ids=ids).logits, no_dropout(input_ids=ids).logits)


def test_recomputed_lora_dropout_keeps_neither_the_dropped_copies_nor_the_masks():
    """Saved for the backward by one layer: PEFT's dropout adds a dropped copy of the input and a mask per LoRA layer;
    with the recompute, at most the layer's other tensors."""
    tokens = 2 * 24
    saved = {}
    for recompute in (False, True):
        model = tiny_lm()
        if recompute:
            recompute_lora_dropout(model)
        layer = checkpointed_layers(model)[1]
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with count_saved_bytes(layer, params) as counted:
            loss_and_grads(model)
        saved[recompute] = counted[0]
    inputs = 4 * 32 + 32 + 2 * 32 + 48  # q/k/v (one input each), o, gate/up, down: in-features per LoRA layer
    dropped_copies = inputs * tokens * 4  # float32
    assert saved[False] - saved[True] >= dropped_copies, saved


def test_recompute_lora_dropout_leaves_zero_and_in_place_dropout_alone():
    assert recompute_lora_dropout(tiny_lm(dropout=0.0)) == 0
    model = tiny_lm()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.inplace = True
    assert recompute_lora_dropout(model) == 0


def test_recompute_lora_dropout_checkpoints_only_in_layers_not_recomputed_anyway(monkeypatch):
    from trl_rejection import lora_dropout

    calls = []
    real = lora_dropout.checkpoint
    monkeypatch.setattr(lora_dropout, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_lm()
    recompute_lora_dropout(model)
    loss_and_grads(model)
    assert len(calls) == 4 * len(TARGETS)  # no layer checkpointed: every adapter's dropout recomputed on its own
    calls.clear()
    enable_checkpointing(model)
    loss_and_grads(model)
    assert not calls  # every layer checkpointed: the plain path (the layer's recompute replays the dropout)


class FakeMemory:
    """Allocator readings set by the test: `allocated` now, the `peak` the next micro-batch reaches."""

    def __init__(self, total: int, allocated: int, peak: int):
        self.total_bytes, self.now, self.next_peak, self.max = total, allocated, peak, allocated
        self.resets = 0

    def allocated(self) -> int:
        return self.now

    def peak(self) -> int:
        return self.max

    def reset_peak(self) -> None:
        self.resets += 1
        self.max = self.now

    def total(self) -> int:
        return self.total_bytes


class FlagSpy:
    """Records each trainable layer's checkpointing flag as its forward starts; the micro-batch "reaches" the fake
    memory's `next_peak` when the last layer to run starts."""

    def __init__(self, model: torch.nn.Module, memory: FakeMemory, peak_layer: int = -1):
        self.flags: list[bool] = []
        layers = checkpointed_layers(model)
        for layer in layers:
            layer.register_forward_pre_hook(lambda m, *_: self.flags.append(m.gradient_checkpointing))
        layers[peak_layer].register_forward_pre_hook(lambda *_: setattr(memory, "max", max(memory.max, memory.next_peak)))


def run(auto: AutoLayerCheckpointing, model: torch.nn.Module, spy: FlagSpy, tokens: int = 48,
        layers_run: int | None = None) -> list[bool]:
    """The flags of the layers as the forward ran them (older transformers also rerun hooks in recomputes)."""
    spy.flags.clear()
    with auto.micro_batch(tokens):
        loss_and_grads(model)
    return spy.flags[:layers_run or len(checkpointed_layers(model))]


GIB = 1 << 30


def auto_on_tiny_lm(peak: int, total: int = 10 * GIB, allocated: int = 2 * GIB, **kwargs):
    """A checkpointed tiny LM with `AutoLayerCheckpointing` reading a `FakeMemory`, and a `FlagSpy` on its layers."""
    model = tiny_lm()
    enable_checkpointing(model)
    memory = FakeMemory(total=total, allocated=allocated, peak=peak)
    return model, memory, FlagSpy(model, memory), AutoLayerCheckpointing(model, 0.8, memory, **kwargs)


def test_auto_measures_the_last_layer_to_run_then_keeps_the_last_layers_that_fit():
    model, memory, spy, auto = auto_on_tiny_lm(peak=3 * GIB)

    # micro-batch 1: every layer checkpointed; the step's memory per token is measured from its own peak
    assert run(auto, model, spy) == [True] * 4
    assert memory.resets == 1 and auto.per_token is None and auto.transient == pytest.approx(GIB / 48)
    # micro-batch 2: the last layer runs uncheckpointed and its saved bytes are counted (parameters excluded)
    memory.next_peak = 3 * GIB
    assert run(auto, model, spy) == [True, True, True, False]
    last = checkpointed_layers(model)[-1]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    last.gradient_checkpointing = False
    with count_saved_bytes(last, params) as saved:
        loss_and_grads(model)
    with count_saved_bytes(last, set()) as with_params:
        loss_and_grads(model)
    last.gradient_checkpointing = True
    assert auto.per_token == saved[0] / 48 and with_params[0] > saved[0]
    assert auto.transient == pytest.approx(GIB / 48 - auto.per_token)  # replaces micro-batch 1's (one-off costs)
    assert all(layer.gradient_checkpointing for layer in checkpointed_layers(model))  # restored after each batch

    # then: (0.8 x 10 GiB - allocated - transient x tokens) / (per_token x tokens) layers, the last ones to run
    auto.per_token, auto.transient = 0.5 * GIB / 48, 1.0 * GIB / 48
    assert auto.plan(4, 48) == 4  # (8 - 2 - 1) / 0.5 = 10 layers' worth: all 4
    memory.now = 5 * GIB
    assert auto.plan(4, 48) == 4 and auto.plan(4, 96) == 1  # (8 - 5 - 2) / 1
    memory.now = 7 * GIB
    assert auto.plan(4, 48) == 0  # (8 - 7 - 1) / 0.5
    memory.now, memory.next_peak = 2 * GIB, 0
    auto.per_token = 2.0 * GIB / 48
    assert run(auto, model, spy) == [True, True, False, False]  # (8 - 2 - 1) / 2 = 2.5 -> 2
    assert auto.pop() == pytest.approx((0 + 1 + 2) / 3) and auto.pop() is None


def test_auto_probes_only_with_room_and_only_a_layer_that_runs():
    model = tiny_lm(layers=3)
    base = model.get_base_model()
    base.unused_block = copy.deepcopy(base.model.layers[-1])  # a 4th trainable layer, registered last, never run
    enable_checkpointing(model)
    memory = FakeMemory(total=10 * GIB, allocated=2 * GIB, peak=6 * GIB)
    spy = FlagSpy(model, memory, peak_layer=2)
    auto = AutoLayerCheckpointing(model, memory_fraction=0.8, memory=memory)
    assert len(checkpointed_layers(model)) == 4
    run(auto, model, spy)  # micro-batch 1: 4 GiB over the start
    memory.next_peak = 4 * GIB
    assert run(auto, model, spy, layers_run=3) == [True] * 3  # 8 - 2 - 4 GiB left < 4 GiB: no room to measure
    assert auto.per_token is None and auto.plan(3, 48) == 0
    # micro-batch 2 needed 2 GiB (replacing micro-batch 1's 4): 8 - 2 - 2 >= 2, so the probe runs, on the last layer
    # that ran (not the 4th, which never runs)
    assert run(auto, model, spy, layers_run=3) == [True, True, False]
    assert auto.per_token > 0 and checkpointed_layers(model)[3].gradient_checkpointing


def test_auto_replaces_the_first_estimate_once_then_only_raises_it():
    model, memory, spy, auto = auto_on_tiny_lm(peak=5 * GIB)
    run(auto, model, spy)
    assert auto.transient == pytest.approx(3 * GIB / 48)
    memory.next_peak = 3 * GIB  # lower: replaces the first estimate (micro-batch 1 holds one-off allocations)
    run(auto, model, spy)
    second = auto.transient
    assert second < 2 * GIB / 48
    memory.next_peak = 0  # a micro-batch that needs less does not lower it
    run(auto, model, spy)
    assert auto.transient == second
    kept = auto.kept[-1]
    memory.next_peak = 2 * GIB + kept * auto.per_token * 48 + 3 * GIB  # one that needs more raises it
    run(auto, model, spy)
    assert auto.transient > second


def test_auto_uses_the_number_of_layers_all_processes_agree_on():
    agreed = []
    model, memory, spy, auto = auto_on_tiny_lm(
        peak=GIB, total=100 * GIB, allocated=0,
        agree=lambda n: agreed.append(n) or (0 if len(agreed) == 2 else min(n, 2)))
    run(auto, model, spy)
    assert run(auto, model, spy) == [True] * 4 and auto.per_token is None  # another process had no room to probe
    assert run(auto, model, spy) == [True, True, True, False] and auto.per_token > 0
    assert run(auto, model, spy) == [True, True, False, False]  # 4 fit here; 2 agreed
    assert agreed == [0, 1, 1, 4]


def test_auto_leaves_layers_alone_when_not_every_layer_is_checkpointed():
    model = tiny_lm()
    memory = FakeMemory(total=1 << 34, allocated=0, peak=0)
    spy = FlagSpy(model, memory)
    auto = AutoLayerCheckpointing(model, memory_fraction=0.8, memory=memory)
    assert run(auto, model, spy) == [False] * 4  # checkpointing off: nothing measured, nothing changed
    model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False}, every_n_layers=2)
    flags = [layer.gradient_checkpointing for layer in checkpointed_layers(model)]
    assert run(auto, model, spy) == flags == [True, False, True, False]
    assert auto.transient is None and auto.pop() is None


def test_count_saved_bytes_takes_its_hooks_off_when_the_forward_raises():
    model = tiny_lm()
    layer = checkpointed_layers(model)[0]
    boom = layer.register_forward_hook(lambda *_: 1 / 0)
    with pytest.raises(ZeroDivisionError), count_saved_bytes(layer, set()) as counted:
        loss_and_grads(model)
    boom.remove()
    assert counted[0] > 0  # the layer's forward ran (and saved tensors) before the hook raised
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # no saved-tensor hooks left on


def test_auto_keeps_losses_and_gradients_of_full_checkpointing():
    """Layers kept or recomputed, the numbers are those of every layer checkpointed (dropout masks included)."""
    full, auto_model = tiny_lm(), tiny_lm()
    enable_checkpointing(full)
    enable_checkpointing(auto_model)
    recompute_lora_dropout(auto_model)
    gib = 1 << 30
    memory = FakeMemory(total=10 * gib, allocated=0, peak=0)
    auto = AutoLayerCheckpointing(auto_model, memory_fraction=0.8, memory=memory)
    for step in range(3):
        loss, grads = loss_and_grads(full, seed=step)
        torch.manual_seed(step)
        with auto.micro_batch(48):
            loss_a, grads_a = loss_and_grads(auto_model, seed=step)
        assert torch.equal(loss, loss_a)
        assert all(torch.equal(grads[n], grads_a[n]) for n in grads)
    assert auto.kept == [0, 1, 4]  # measured, probed, then every layer fit


def test_trainer_logs_the_layers_kept_and_config_is_checked(tmp_path):
    from tests.test_trainer import LORA_TARGETS, config, mix
    from trl_rejection.trainer import RejectionSFTTrainer

    proc = make_processor("llava-1.5")
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LORA_TARGETS,
                      modules_to_save=["multi_modal_projector"])
    losses = {}
    for mode in ("all", "auto"):
        args = config(tmp_path / mode, max_steps=3, gradient_checkpointing=True, checkpoint_layers=mode)
        trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=mix(),
                                      processing_class=proc, peft_config=peft)
        assert trainer._auto_checkpointing is None  # CPU: every layer stays checkpointed
        if mode == "auto":  # as on a GPU with room for every layer
            trainer._auto_checkpointing = AutoLayerCheckpointing(
                trainer.model, 0.8, FakeMemory(total=1 << 34, allocated=0, peak=0))
        trainer.train()
        history = trainer.state.log_history
        losses[mode] = [h["loss"] for h in history if "loss" in h]
        kept = [h.get("uncheckpointed_layers") for h in history if "loss" in h]
        n_layers = len(checkpointed_layers(trainer.model))
        assert kept == ([None] * 3 if mode == "all" else [0, 1, n_layers]), kept
    assert losses["all"] == losses["auto"]
    with pytest.raises(ConfigError, match="checkpoint_memory_fraction"):
        RejectionSFTConfig("out", checkpoint_memory_fraction=0.0)
    with pytest.raises((ConfigError, ValueError), match="checkpoint_layers"):
        RejectionSFTConfig("out", checkpoint_layers="some")

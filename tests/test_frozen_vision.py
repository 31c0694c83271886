"""`skip_frozen_vision_backward`: no gradient reaches the frozen vision tower, and every trainable parameter gets the
gradient it gets without the option, for each supported family."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image

from trl_rejection.collator import RejectionDataCollator
from trl_rejection.config import PROJECTOR_MODULES
from trl_rejection.constants import DEFAULT_REFUSAL
from trl_rejection.frozen_vision import HOOKS, skip_frozen_vision_backward
from trl_rejection.testing.tiny import make_model, make_processor

# family: (modules_to_save, projector_modules, the vision block whose forward calls are counted)
FAMILIES = {
    "llava-1.5": (["multi_modal_projector"], PROJECTOR_MODULES, "CLIPEncoderLayer"),
    "gemma3": (["multi_modal_projector"], PROJECTOR_MODULES, "SiglipEncoderLayer"),
    "qwen2.5-vl": (["visual.merger"], PROJECTOR_MODULES, "Qwen2_5_VLVisionBlock"),
    "qwen3-vl": (["visual.merger", "deepstack_merger_list.0", "deepstack_merger_list.1"],
                 ["visual.merger", "visual.deepstack_merger_list"], "Qwen3VLVisionBlock"),
}
ROWS = [{"images": [Image.new("RGB", (48, 40), (200, 30, 30))], "is_refusal": False, "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red square on white."}]}]},
        {"images": [Image.new("RGB", (40, 56), (20, 90, 220))], "is_refusal": True, "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "Explain."}]},
            {"role": "assistant", "content": [{"type": "text", "text": DEFAULT_REFUSAL}]}]}]


def _peft_model(family: str, proc, train_vision: bool = False):
    to_save, _, _ = FAMILIES[family]
    model = make_model(family, proc, seed=0)
    targets = r".*language_model.*\.(q_proj|v_proj)" + (r"|.*(vision_tower|visual).*\.(q_proj|qkv)" if train_vision
                                                         else "")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=to_save,
                                             init_lora_weights=False))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()  # what PEFT, TRL and transformers do for PEFT + gradient checkpointing
    return model.train()


def _step(model, batch, block: str) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of the trainable parameters after one backward, and how many gradients reached the first vision
    block's output (its backward, and gradient checkpointing's recompute of it, run only if one does)."""
    arrived = []

    def on_output(module, args, output):
        output = output[0] if isinstance(output, tuple) else output
        if output.requires_grad:
            output.register_hook(lambda grad: arrived.append(grad))

    first = next(m for m in model.modules() if type(m).__name__ == block)
    handle = first.register_forward_hook(on_output)
    model.zero_grad()
    model(**batch).loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return grads, len(arrived)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_gradients_without_the_vision_backward(family):
    proc = make_processor(family)
    batch = RejectionDataCollator(proc)(ROWS)
    _, projectors, block = FAMILIES[family]
    reference = _peft_model(family, proc)
    grads, runs = _step(reference, batch, block)
    # enable_input_require_grads hooks every sub-model's input embeddings; Qwen3-VL's vision model exposes none
    assert runs == (family != "qwen3-vl")  # the backward reaches the frozen tower
    model = _peft_model(family, proc)
    hooked = skip_frozen_vision_backward(model, projectors)
    assert hooked and all("merger" in h or "projector" in h for h in hooked) and len(set(hooked)) == len(hooked)
    assert skip_frozen_vision_backward(model, projectors) == hooked  # a second call replaces, never adds, hooks
    assert all(len(module._forward_pre_hooks) == 1 for module in HOOKS if module in set(model.modules()))
    got, runs = _step(model, batch, block)
    assert runs == 0
    assert got.keys() == grads.keys() and any("merger" in n or "projector" in n for n in got)
    for name in grads:
        torch.testing.assert_close(got[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_trained_vision_tower_keeps_its_backward():
    """A LoRA on the vision tower from the start, or a tower unfrozen after the hook was set (a second training
    stage, a callback): its gradients flow. The condition is read at every forward."""
    proc = make_processor("llava-1.5")
    batch = RejectionDataCollator(proc)(ROWS)
    model = _peft_model("llava-1.5", proc, train_vision=True)
    assert any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)
    assert skip_frozen_vision_backward(model, PROJECTOR_MODULES)
    grads, runs = _step(model, batch, "CLIPEncoderLayer")
    assert runs == 1 and any("vision_tower" in n and g.abs().sum() > 0 for n, g in grads.items())

    model = _peft_model("llava-1.5", proc)
    assert skip_frozen_vision_backward(model, PROJECTOR_MODULES)
    assert _step(model, batch, "CLIPEncoderLayer")[1] == 0
    tower = next(m for n, m in model.named_modules() if n.endswith("vision_tower"))
    tower.requires_grad_(True)  # stage 2 unfreezes the tower
    grads, runs = _step(model, batch, "CLIPEncoderLayer")
    assert runs == 1 and any("vision_tower" in n and g.abs().sum() > 0 for n, g in grads.items())


def test_turning_the_option_off_removes_the_hooks():
    proc = make_processor("llava-1.5")
    batch = RejectionDataCollator(proc)(ROWS)
    model = _peft_model("llava-1.5", proc)
    assert skip_frozen_vision_backward(model, PROJECTOR_MODULES)
    assert skip_frozen_vision_backward(model, PROJECTOR_MODULES, enabled=False) == []
    assert _step(model, batch, "CLIPEncoderLayer")[1] == 1
    assert not any(module in HOOKS for module in model.modules())


def test_no_projector_found_changes_nothing():
    proc = make_processor("llava-1.5")
    model = _peft_model("llava-1.5", proc)
    assert skip_frozen_vision_backward(model, ["no_such_module"]) == []


@pytest.mark.parametrize("enabled", [True, False])
def test_the_trainer_applies_the_option(enabled, tmp_path):
    from test_trainer import config, mix

    from trl_rejection import RejectionSFTTrainer

    proc = make_processor("llava-1.5")
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                      modules_to_save=["multi_modal_projector"])
    args = config(tmp_path, skip_frozen_vision_backward=enabled)
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=mix(), processing_class=proc,
                                  peft_config=peft)
    projector = next(m for n, m in trainer.model.named_modules() if n.endswith("multi_modal_projector"))
    assert (projector in HOOKS) is enabled

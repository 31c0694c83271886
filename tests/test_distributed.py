"""ZeRO-3 set-up on CPU: the settings filled into the DeepSpeed config and the leaf blocks handed to DeepSpeed."""

from __future__ import annotations

import os
import sys
import types
from types import SimpleNamespace

from trl_rejection.distributed import ZERO3_DEFAULTS, fsdp_layer_classes, setup_zero3, sharded_backend, without_zero3
from trl_rejection.testing.tiny import make_model, make_processor


def _accelerator(stage: int, zero: dict) -> SimpleNamespace:
    config = {"zero_optimization": {"stage": stage, **zero}}
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=config, hf_ds_config=SimpleNamespace(config=config))
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


def test_zero3_marks_the_blocks_as_leaves_and_fills_only_what_the_user_left_out(monkeypatch):
    leaves = []
    fake = types.ModuleType("deepspeed.utils")
    fake.set_z3_leaf_modules = lambda model, classes: leaves.append([c.__name__ for c in classes])
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake)
    model = make_model("llava-1.5", make_processor("llava-1.5"))
    acc = _accelerator(3, {"stage3_prefetch_bucket_size": "auto", "overlap_comm": False})
    applied = setup_zero3(acc, model)
    zero = acc.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
    assert leaves == [sorted(fsdp_layer_classes(model))] and applied["leaf_modules"] == fsdp_layer_classes(model)
    layer = next(m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer")
    biggest = max(sum(p.numel() for p in m.parameters()) for m in model.modules()
                  if type(m).__name__ in fsdp_layer_classes(model))
    assert zero["stage3_prefetch_bucket_size"] == 2 * biggest >= 2 * sum(p.numel() for p in layer.parameters())
    assert zero["overlap_comm"] is False  # the user's value stays
    assert zero["stage3_max_live_parameters"] == ZERO3_DEFAULTS["stage3_max_live_parameters"]
    assert "overlap_comm" not in applied


def test_zero3_setup_does_nothing_without_zero3_or_when_leaves_are_off(monkeypatch):
    model = make_model("llava-1.5", make_processor("llava-1.5"))
    for acc in (_accelerator(2, {}), SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)),
                SimpleNamespace(state=SimpleNamespace())):
        assert setup_zero3(acc, model) is None
    acc = _accelerator(3, {})
    applied = setup_zero3(acc, model, leaf_modules=False)  # no DeepSpeed import needed
    assert "leaf_modules" not in applied and applied["overlap_comm"] is True


def test_without_zero3_lets_one_process_generate_alone(monkeypatch):
    """Under ZeRO-3, `generate` syncs every step with the other processes (`synced_gpus` defaults to
    `is_deepspeed_zero3_enabled()`); the recipe evaluates on the main process alone inside `without_zero3`, where
    ZeRO-3 reads as off (and FSDP's loading flag is unset), and both come back afterwards."""
    from transformers.integrations import deepspeed as hf_ds
    from transformers.integrations import is_deepspeed_zero3_enabled

    class FakeZero3:
        def is_zero3(self) -> bool:
            return True

    config = FakeZero3()
    monkeypatch.setattr(hf_ds, "_hf_deepspeed_config_weak_ref", lambda: config)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert is_deepspeed_zero3_enabled() and sharded_backend() == "zero3"
    with without_zero3():
        assert not is_deepspeed_zero3_enabled() and sharded_backend() is None
        assert "ACCELERATE_USE_FSDP" not in os.environ
    assert is_deepspeed_zero3_enabled()
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"


def test_generation_never_waits_for_other_processes(monkeypatch):
    """The hang seen on 2 GPUs: after a ZeRO-3 run the main process generated alone while `generate` (whose
    `synced_gpus` defaults to on while ZeRO-3 is configured) waited every step for processes that had returned."""
    from transformers.integrations import deepspeed as hf_ds

    from trl_rejection.generation import greedy_generate

    class FakeZero3:
        def is_zero3(self) -> bool:
            return True

    processor = make_processor("llava-1.5")
    model = make_model("llava-1.5", processor)
    seen = {}
    original = model.generate

    def generate(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(hf_ds, "_hf_deepspeed_config_weak_ref", lambda: FakeZero3())
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                         add_generation_prompt=True)
    out = greedy_generate(model, processor, [text], max_new_tokens=2)
    assert seen["synced_gpus"] is False and len(out) == 1


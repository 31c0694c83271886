"""ZeRO-3 set-up on CPU: the settings filled into the DeepSpeed config and the leaf blocks handed to DeepSpeed."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

from trl_rejection.distributed import ZERO3_DEFAULTS, fsdp_layer_classes, setup_zero3
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

    spec = importlib.util.spec_from_file_location(
        "sft_recipe", Path(__file__).resolve().parents[1] / "recipes" / "sft_rejection.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)

    class FakeZero3:
        def is_zero3(self) -> bool:
            return True

    config = FakeZero3()
    monkeypatch.setattr(hf_ds, "_hf_deepspeed_config_weak_ref", lambda: config)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert is_deepspeed_zero3_enabled()
    with recipe.without_zero3():
        assert not is_deepspeed_zero3_enabled()
        assert "ACCELERATE_USE_FSDP" not in os.environ
    assert is_deepspeed_zero3_enabled()
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"

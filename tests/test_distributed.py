"""ZeRO-3 set-up on CPU: the settings filled into the DeepSpeed config and the leaf blocks handed to DeepSpeed."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

from trl_rejection.distributed import (ZERO3_DEFAULTS, fsdp_layer_classes, setup_deepspeed_autocast,
                                      setup_fsdp_precision, setup_zero3, sharded_backend, without_zero3)
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



def _fsdp_accelerator(version: int, mixed_precision: str, policy: object = "accelerate's") -> SimpleNamespace:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if policy == "accelerate's":  # what accelerate sets from `mixed_precision`
        half = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
        policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=half, output_dtype=half)
    plugin = SimpleNamespace(fsdp_version=version, mixed_precision_policy=policy)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision=mixed_precision)


def test_fsdp_autocast_precision_keeps_block_inputs_and_outputs_and_reduces_in_fp32():
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    acc = _fsdp_accelerator(2, "bf16")
    policy = setup_fsdp_precision(acc)
    assert acc.state.fsdp_plugin.mixed_precision_policy is policy
    assert policy == MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=None,
                                          cast_forward_inputs=False)
    assert setup_fsdp_precision(_fsdp_accelerator(2, "fp16")).param_dtype == torch.float16
    assert setup_fsdp_precision(_fsdp_accelerator(2, "bf16", policy=None)) == policy
    users = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for acc, enabled in ((_fsdp_accelerator(2, "bf16"), False), (_fsdp_accelerator(1, "bf16"), True),
                         (_fsdp_accelerator(2, "no"), True), (_fsdp_accelerator(2, "bf16", users), True),
                         (SimpleNamespace(state=SimpleNamespace(), mixed_precision="bf16"), True)):
        before = getattr(getattr(acc.state, "fsdp_plugin", None), "mixed_precision_policy", None)
        assert setup_fsdp_precision(acc, enabled) is None
        assert getattr(getattr(acc.state, "fsdp_plugin", None), "mixed_precision_policy", None) is before


def test_fsdp2_with_the_autocast_policy_passes_float32_activations_through_blocks_unrounded(tmp_path):
    """A real FSDP2 block (one gloo process): under accelerate's policy a float32 activation entering and leaving a
    sharded block is rounded to bf16; under `setup_fsdp_precision`'s policy it stays float32, as under autocast."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    class Residual(torch.nn.Module):  # a pre-norm block's residual add: float32 stream + half-precision branch
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            return x + self.linear(x)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        seen = {}
        for name, policy in (("accelerate", MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                 reduce_dtype=torch.bfloat16,
                                                                 output_dtype=torch.bfloat16)),
                             ("ours", setup_fsdp_precision(_fsdp_accelerator(2, "bf16")))):
            block = Residual()
            block.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[0].dtype}))
            fully_shard(block, mesh=mesh, mp_policy=policy)
            x = torch.randn(2, 8, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = block(x)
            out.float().sum().backward()
            seen[name] = (seen[name], out.dtype)
            if name == "ours":
                assert block.linear.weight.grad.dtype == torch.float32
        assert seen == {"accelerate": (torch.bfloat16, torch.bfloat16), "ours": (torch.float32, torch.float32)}
    finally:
        dist.destroy_process_group()


class _SkipsLast(torch.nn.Sequential):  # its last unit never runs a forward (TRL's fused LM head, an idle tower)
    def forward(self, x):
        return self[1](self[0](x))


def _accumulation_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from trl_rejection.distributed import gather_fsdp2_units_once

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = _SkipsLast(*(torch.nn.Linear(8, 8) for _ in range(3)))
    mesh = init_device_mesh("cpu", (2,))
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float64)  # a reduce dtype other than the parameters'
    for unit in (*model, model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    units = gather_fsdp2_units_once(model)
    sharded = all(p.to_local().numel() == p.numel() // 2 for p in model.parameters())  # freed again, not kept whole
    try:
        for micro_batch in range(2):  # gradient accumulation: no gradient sync in the first micro-batch
            model.set_requires_gradient_sync(micro_batch == 1)
            x = torch.arange(32, dtype=torch.float32).view(4, 8).add(rank * 32 + micro_batch * 64).div(100)
            model(x).square().sum().backward()
        grads = [p.grad.full_tensor().tolist() if p.grad is not None else None for p in model.parameters()]
        result = {"units": units, "sharded": sharded, "grads": grads}
    except AttributeError as error:
        result = {"units": units, "sharded": sharded, "error": str(error)}
    dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def test_fsdp2_gradient_accumulation_with_a_unit_whose_forward_never_runs(tmp_path):
    """Two gloo processes, FSDP2 with a reduce dtype and gradient accumulation (no sync in the first micro-batch), one
    unit never running a forward: torch fails in the unsynced backward (pytorch/pytorch#194058) unless
    `gather_fsdp2_units_once` all-gathered every unit first (what the trainer does before its first step) and freed
    it again. The gradients then equal one process's over both micro-batches of both ranks."""
    import torch.multiprocessing as mp

    from trl_rejection.distributed import gather_fsdp2_units_once

    assert gather_fsdp2_units_once(torch.nn.Linear(2, 2)) == 0  # not sharded: nothing to do
    mp.spawn(_accumulation_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    results = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    torch.manual_seed(0)
    reference = _SkipsLast(*(torch.nn.Linear(8, 8) for _ in range(3))).double()
    for rank in range(2):
        for micro_batch in range(2):
            x = torch.arange(32, dtype=torch.float64).view(4, 8).add(rank * 32 + micro_batch * 64).div(100)
            reference(x).square().sum().backward()
    expected = [p.grad.div(2).tolist() if p.grad is not None else None for p in reference.parameters()]
    for result in results:
        assert result["units"] == 4 and result["sharded"] and "error" not in result, result
        assert [g is None for g in result["grads"]] == [False] * 4 + [True] * 2
        for got, want in zip(result["grads"], expected):
            if want is not None:
                torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                           torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def _minimum_worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from trl_rejection.distributed import end_process_group, minimum_over_processes

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    value = minimum_over_processes([7, 3][rank])
    end_process_group()  # what the recipes do after a successful run
    Path(f"{out}.{rank}").write_text(f"{value} {dist.is_initialized()}")


def test_minimum_over_processes_agrees_across_two_processes(tmp_path):
    """`checkpoint_layers="auto"` under FSDP / ZeRO-3: every process keeps the same (smallest) number of layers; then
    `end_process_group` ends the group (a gloo group left alive can abort the interpreter's exit)."""
    import torch.multiprocessing as mp

    from trl_rejection.distributed import minimum_over_processes

    assert minimum_over_processes(5) == 5  # no process group: its own
    mp.spawn(_minimum_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    assert [(tmp_path / f"out.{rank}").read_text() for rank in (0, 1)] == ["3 False", "3 False"]


def test_deepspeed_autocast_runs_the_forward_under_autocast_inside_the_engine(tmp_path, monkeypatch):
    """Under DeepSpeed accelerate opens no autocast and the engine switches an outer one off; `setup_deepspeed_autocast`
    puts autocast inside the model's own forward (what the engine calls), only under DeepSpeed with half precision
    and the option on. A second call replaces the wrapper (the option off takes it off); a deep copy of a wrapped
    model runs its own weights; a forward set on the instance (a partial) is wrapped as it is. The trainer passes its
    model, the arguments' precision and the option."""
    import copy
    import functools

    import torch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.norm = torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(self.linear(x))

    def run(block):  # the autocast state the LayerNorm sees, with autocast off around the call as the engine has it
        seen = []
        hook = block.norm.register_forward_pre_hook(
            lambda m, args: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        with torch.autocast("cpu", enabled=False):
            block(torch.randn(2, 4))
        hook.remove()
        return seen[0]

    cpu = torch.device("cpu")
    deepspeed = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=object()), device=cpu)
    other = SimpleNamespace(state=SimpleNamespace(), device=cpu)
    for accelerator, half, enabled, expected in ((deepspeed, torch.bfloat16, True, torch.bfloat16),
                                                 (deepspeed, torch.float16, True, torch.float16),
                                                 (deepspeed, torch.bfloat16, False, None),
                                                 (deepspeed, None, True, None),
                                                 (other, torch.bfloat16, True, None)):
        block = Block()
        assert setup_deepspeed_autocast(accelerator, block, half, enabled) == expected
        assert run(block) == expected and ("forward" in vars(block)) == (expected is not None)
    block = Block()
    setup_deepspeed_autocast(deepspeed, block, torch.bfloat16)
    setup_deepspeed_autocast(deepspeed, block, torch.float16)  # replaces the bf16 wrapper, does not nest in it
    assert run(block) == torch.float16
    twin = copy.deepcopy(block)
    with torch.no_grad():
        twin.linear.weight.zero_()
        twin.linear.bias.zero_()
    x = torch.randn(2, 4)
    assert run(twin) == torch.float16 and torch.equal(twin(x), twin.norm(torch.zeros(2, 4)))
    assert not torch.equal(block(x), twin(x))
    setup_deepspeed_autocast(deepspeed, block, torch.float16, enabled=False)
    assert run(block) is None and "forward" not in vars(block)
    block.forward = functools.partial(Block.forward, block)
    setup_deepspeed_autocast(deepspeed, block, torch.bfloat16)
    assert run(block) == torch.bfloat16
    setup_deepspeed_autocast(deepspeed, block, torch.bfloat16, enabled=False)
    assert isinstance(block.forward, functools.partial)  # the user's own forward, back as it was

    import datasets

    from trl_rejection import distributed
    from trl_rejection.config import RejectionSFTConfig
    from trl_rejection.constants import DEFAULT_REFUSAL
    from trl_rejection.trainer import RejectionSFTTrainer

    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi?"},
                                                     {"role": "assistant", "content": reply}]}
                                       for reply in ("Hello.", DEFAULT_REFUSAL)])
    calls = []
    monkeypatch.setattr(distributed, "setup_deepspeed_autocast", lambda *a: calls.append(a[1:]))
    proc = make_processor("llava-1.5")
    models = []
    for bf16, option in ((True, True), (True, False), (False, True)):
        args = RejectionSFTConfig(str(tmp_path / "out"), use_cpu=True, report_to="none", bf16=bf16,
                                  deepspeed_autocast=option)
        trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=rows,
                                      processing_class=proc)
        models.append(trainer.model)
    assert [(m is model, half, option) for (m, half, option), model in zip(calls, models)] == [
        (True, torch.bfloat16, True), (True, torch.bfloat16, False), (True, None, True)]


def test_regional_compilation_on_an_accelerate_that_compiles_nothing_is_warned_about(caplog):
    """accelerate before 1.15 compiled none of the blocks under `--dynamo_use_regional_compilation` (checked with
    1.10.1 and 1.14.0): the trainer says so and names the fix; with 1.15, without regional compilation, or without a
    dynamo backend it stays silent."""
    from accelerate.utils import TorchDynamoPlugin

    from trl_rejection.distributed import check_regional_compilation

    def acc(backend: str, regional: bool) -> SimpleNamespace:
        plugin = TorchDynamoPlugin(backend=backend, use_regional_compilation=regional)
        return SimpleNamespace(state=SimpleNamespace(dynamo_plugin=plugin))

    with caplog.at_level("WARNING", logger="trl_rejection.distributed"):
        assert check_regional_compilation(acc("inductor", True), version="1.14.0") is False
    assert "accelerate 1.14.0 compiles none" in caplog.text and "accelerate>=1.15" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trl_rejection.distributed"):
        assert check_regional_compilation(acc("inductor", True), version="1.15.0")
        assert check_regional_compilation(acc("inductor", False), version="1.10.1")
        assert check_regional_compilation(acc("no", True), version="1.10.1")
        assert check_regional_compilation(SimpleNamespace(state=SimpleNamespace()), version="1.10.1")
    assert caplog.text == ""

"""Sharded training: which blocks FSDP shards one by one and ZeRO-3's fetch granularity (set up by
`RejectionSFTTrainer`), and the steps around a sharded run that need one process to hold a whole model (building the
tiny model, merging the adapter, generating), or one process to build what all read (the mix)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


logger = logging.getLogger(__name__)

ZERO3_DEFAULTS = {"overlap_comm": True, "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9}
"""ZeRO-3 settings filled in where the user's DeepSpeed config leaves them out (or "auto")."""


def class_name(module: torch.nn.Module) -> str:
    """The module's class name; for a module FSDP2 has sharded (`fully_shard` gives it a new class, `FSDP<Class>`,
    that subclasses `FSDPModule`, or a subclass of it, and its own class), the name of its own class."""
    if not torch.distributed.is_available():  # a torch build without distributed support: nothing is sharded
        return type(module).__name__
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module, FSDPModule):
        return next(base for base in type(module).__bases__ if not issubclass(base, FSDPModule)).__name__
    return type(module).__name__


def fsdp_layer_classes(model: torch.nn.Module) -> list[str]:
    """The block classes sharded (FSDP) or fetched (ZeRO-3) one by one for this model: every `_no_split_modules`
    entry of the model and of its sub-models that occurs in it, e.g. `CLIPEncoderLayer`, `CLIPVisionEmbeddings` and
    `LlamaDecoderLayer` for LLaVA-1.5, `Qwen2_5_VLDecoderLayer` and `Qwen2_5_VLVisionBlock` for Qwen2.5-VL. (A
    composite model's own list also names parts it does not hold, such as LLaVA's `CLIPTextEmbeddings`, which
    accelerate then cannot find.) A module FSDP2 has sharded (class `FSDPLlamaDecoderLayer`) counts as its own class."""
    present = {class_name(m) for m in model.modules()}
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return sorted(n for n in names if n in present)


def setup_fsdp_wrapping(accelerator: Any, model: torch.nn.Module) -> list[str] | None:
    """Under FSDP, shard the model's blocks one by one: the accelerate config's `fsdp_transformer_layer_cls_to_wrap`
    if it names classes of this model, else `fsdp_layer_classes(model)`. Returns the classes, None without FSDP."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        return None
    present = {type(m).__name__ for m in model.modules()}
    names = plugin.transformer_cls_names_to_wrap
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    if names:
        missing = [n for n in names if n not in present]
        if missing:
            raise ValueError(
                f"fsdp_transformer_layer_cls_to_wrap names {missing}, which this model "
                f"({type(accelerator.unwrap_model(model)).__name__}) does not have; its blocks are "
                f"{fsdp_layer_classes(model)}. Fix: drop the key from the accelerate config (the trainer "
                "then wraps this model's own blocks), or name classes of this model.")
    else:
        names = fsdp_layer_classes(model)
    plugin.transformer_cls_names_to_wrap = list(names)
    os.environ["FSDP_TRANSFORMER_CLS_TO_WRAP"] = ",".join(names)  # what PEFT's FSDP1 wrap policy reads
    logger.info("FSDP wraps %s", names)
    return list(names)


def setup_fsdp_precision(accelerator: Any, enabled: bool = True) -> Any:
    """Under FSDP2 with bf16/fp16 mixed precision, compute as autocast does on one GPU (`fsdp_autocast_precision`).

    accelerate's FSDP2 policy casts every sharded block's inputs and outputs to half precision and reduces gradients
    in half precision. Under autocast on one GPU, activations that autocast keeps in float32 (the CLIP vision tower's
    LayerNorm outputs, and so its residual stream) stay float32. This policy keeps the parameter cast (half-precision
    all-gathers and matmuls) but neither casts block inputs nor outputs, and reduces gradients in float32; the
    trainer runs the forward under `torch.autocast` in the returned policy's `param_dtype` (accelerate's FSDP2 path
    does not autocast). Returns
    the `MixedPrecisionPolicy` set on the plugin (read when `Trainer.train` prepares the model), None if unchanged (a
    policy other than accelerate's default, set by the user on the plugin, is kept)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))
    if not enabled or plugin is None or getattr(plugin, "fsdp_version", 1) != 2 or half is None:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    current = plugin.mixed_precision_policy
    if current is not None and current != MixedPrecisionPolicy(param_dtype=half, reduce_dtype=half, output_dtype=half):
        logger.info("FSDP2 mixed precision: keeping the plugin's own policy %s", current)
        return None

    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32,
                                                         output_dtype=None, cast_forward_inputs=False)
    logger.info("FSDP2 mixed precision: %s", plugin.mixed_precision_policy)
    return plugin.mixed_precision_policy


def gather_fsdp2_units_once(model: torch.nn.Module) -> int:
    """All-gather every FSDP2 unit of `model` once and free it again (`FSDPModule.unshard` / `reshard`), so that
    FSDP2 has created every parameter's unsharded parameter object (its memory is freed again) before the first
    backward. Returns the number of FSDP2 modules (each member of a unit sharded as a group counts, and gathers it
    again; 0 when `model` is not sharded with FSDP2).

    torch's FSDP2 (2.11 to 2.13 at least; the fix is pull request pytorch/pytorch#194058) fails in the backward of a
    micro-batch without gradient sync (gradient accumulation: accelerate turns the sync off for all but the last
    micro-batch) with `AttributeError: 'FSDPParam' object has no attribute '_unsharded_param'`, when the gradients are
    reduced in another dtype than the parameters' (`setup_fsdp_precision`'s policy: float32) and a unit has never
    been all-gathered: one whose forward did not run, such as the LM head under TRL's fused loss (it reads the
    weight, not the module) or a vision tower on a text-only batch. One all-gather of each unit at the start avoids
    it."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.reshard()
    return len(units)


@contextlib.contextmanager
def fsdp2_block_policy(accelerator: Any) -> Iterator[None]:
    """While `Trainer.train` prepares an FSDP2 model, keep the block wrap policy set by `setup_fsdp_wrapping`.

    With a PEFT model, transformers swaps the policy for PEFT's (an `_or_policy` of a lambda and a block policy),
    which accelerate's FSDP2 path does not recognise: it then shards only the root module, the whole model as one
    unit. FSDP2 shards per parameter, so the LoRA layers need no units of their own: keep the block policy, and
    whatever else PEFT's update sets (QLoRA's storage dtype). Patches `transformers.trainer.update_fsdp_plugin_peft`
    (listed in docs/internals.md)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "fsdp_version", 1) != 2:
        yield
        return
    import transformers.trainer as hf_trainer

    original = hf_trainer.update_fsdp_plugin_peft

    def keep_block_policy(model, accelerator):
        policy = accelerator.state.fsdp_plugin.auto_wrap_policy
        original(model, accelerator)
        accelerator.state.fsdp_plugin.auto_wrap_policy = policy

    hf_trainer.update_fsdp_plugin_peft = keep_block_policy
    try:
        yield
    finally:
        hf_trainer.update_fsdp_plugin_peft = original


def _zero3_configs(accelerator: Any) -> list[dict]:
    """The DeepSpeed config dicts `deepspeed.initialize` will read (the plugin's and its HF wrapper's), if ZeRO-3."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        return []
    configs = [plugin.deepspeed_config]
    hf_config = getattr(getattr(plugin, "hf_ds_config", None), "config", None)
    if isinstance(hf_config, dict) and hf_config is not plugin.deepspeed_config:
        configs.append(hf_config)
    return configs


def setup_zero3(accelerator: Any, model: torch.nn.Module, leaf_modules: bool = True) -> dict[str, Any] | None:
    """Under ZeRO-3, fetch whole blocks instead of every linear layer (and LoRA factor) on its own.

    Marks the model's blocks (`fsdp_layer_classes`) as ZeRO-3 leaf modules (`deepspeed.utils.set_z3_leaf_modules`):
    DeepSpeed then hooks, gathers and releases one block at a time, not each of its ~20 sub-modules, and prefetches
    the next block. Fills `stage3_prefetch_bucket_size` (two blocks) and `ZERO3_DEFAULTS` where the user's config
    leaves them out or "auto". Returns the settings applied, None without ZeRO-3. Call before `Trainer.train`."""
    configs = _zero3_configs(accelerator)
    if not configs:
        return None
    names = fsdp_layer_classes(model)
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    block_numel = max((sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters()) for m in blocks), default=0)
    wanted = {**ZERO3_DEFAULTS, "stage3_prefetch_bucket_size": int(2 * block_numel) or "auto"}
    applied: dict[str, Any] = {}
    for config in configs:
        zero = config.setdefault("zero_optimization", {})
        for key, value in wanted.items():
            if zero.get(key, "auto") == "auto":
                zero[key] = applied[key] = value
    if leaf_modules and blocks:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, sorted({type(m) for m in blocks}, key=lambda c: c.__name__))
        applied["leaf_modules"] = names
    logger.info("ZeRO-3 settings: %s", applied)
    return applied


def setup_deepspeed_autocast(accelerator: Any, model: torch.nn.Module, half: torch.dtype | None,
                             enabled: bool = True) -> torch.dtype | None:
    """Under DeepSpeed with bf16/fp16 (`half`, the training arguments' precision), run `model`'s forward under
    `torch.autocast(half)` inside the engine (`deepspeed_autocast`), as accelerate does to the model on one GPU and
    under DDP. Under DeepSpeed accelerate opens no autocast (it leaves precision to the engine, which keeps the whole
    model in half precision), and the engine's forward would switch an outer one off unless its own `torch_autocast`
    section is on (`deepspeed.runtime.torch_autocast.autocast_if_enabled`): ops that autocast runs in float32
    (LayerNorm: the CLIP vision tower's residual stream) ran in half precision. With the option off, a wrapper put on
    `model` earlier is taken off. Returns the dtype, None if the forward is not wrapped."""
    if half is None or getattr(accelerator.state, "deepspeed_plugin", None) is None:
        return None
    autocast_forward(model, accelerator.device.type, half if enabled else None)
    if enabled:
        logger.info("DeepSpeed: the model's forward runs under torch.autocast(%s)", half)
    return half if enabled else None


AUTOCAST_ORIGINAL = "trl_rejection_forward_before_autocast"
"""Attribute of a model whose forward `autocast_forward` wrapped: its own `forward` attribute before (or None)."""


def autocast_forward(model: torch.nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
    """Wrap `model.forward` in `torch.autocast(device_type, dtype)` as the instance's own `forward`, replacing (not
    stacking on) an earlier wrapper of this function; `dtype=None` only takes an earlier wrapper off. A bound method
    is rebound to `model`, so that a deep copy of the model runs its own forward."""
    if hasattr(model, AUTOCAST_ORIGINAL):
        (before,) = getattr(model, AUTOCAST_ORIGINAL)
        delattr(model, AUTOCAST_ORIGINAL)
        del model.forward
        if before is not None:
            model.forward = before
    if dtype is None:
        return
    setattr(model, AUTOCAST_ORIGINAL, (model.__dict__.get("forward"),))
    current = model.forward
    function = getattr(current, "__func__", None)
    if function is not None and getattr(current, "__self__", None) is model:
        def method(self, *args, **kwargs):
            with torch.autocast(device_type, dtype=dtype):
                return function(self, *args, **kwargs)

        model.forward = types.MethodType(functools.wraps(function)(method), model)
        return

    @functools.wraps(current)
    def forward(*args, **kwargs):  # a partial or plain function set on the instance: called as it is
        with torch.autocast(device_type, dtype=dtype):
            return current(*args, **kwargs)

    model.forward = forward


def sharded_backend() -> str | None:
    """"zero3" or "fsdp" when this process trains with sharded parameters (set by `accelerate launch`), else None."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return "zero3"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        return "fsdp"
    return None


@contextlib.contextmanager
def without_zero3() -> Iterator[None]:
    """Build or load a model in full on this process alone, not partitioned by DeepSpeed's `zero.Init` (which
    needs every process, and which fails for models built in code: `init.zeros_(weight[padding_idx])` on an empty
    partitioned weight)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    fsdp = os.environ.pop("ACCELERATE_USE_FSDP", None)  # transformers' FSDP loading puts non-rank-0 weights on meta
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref
        if fsdp is not None:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp


@contextlib.contextmanager
def build_once(training_args: Any, how: str, desc: str) -> Iterator[bool]:
    """Yields True on the one process (per node with `how="per_node"`) that must build something all processes
    then read; the others wait at a barrier until it is written (`main_process_first`, global or per node)."""
    local = how == "per_node"
    with training_args.main_process_first(local=local, desc=desc):
        index = training_args.local_process_index if local else training_args.process_index
        yield index == 0


def full_model_on_main(trainer: Any, base: str, adapter_dir: Path, dtype: Any) -> torch.nn.Module:
    """Main process only: the base checkpoint loaded whole on the CPU, with the trained adapter merged in.

    Under ZeRO-3 or FSDP no process holds the whole trained model, so `merge_and_unload` on the wrapped model
    would merge into shards; the adapter saved by the trainer (which gathers it) is merged into a fresh copy of
    the base instead."""
    from peft import PeftModel

    base_class = type(trainer.accelerator.unwrap_model(trainer.model).get_base_model())
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    with without_zero3():
        model = base_class.from_pretrained(base, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def minimum_over_processes(value: int) -> int:
    """The smallest `value` over the processes of the default process group (one all-reduce on the current device)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def end_process_group() -> None:
    """Destroy the default process group, if one was started, once a script's work is done on this process.

    A process that exits with a gloo group alive can abort in the interpreter's finalisation ("terminate called
    without an active exception": pytorch/pytorch#190489); call it after a successful run only (on an error other
    processes may still be inside a collective, and destroying the group would wait for them)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


REGIONAL_COMPILATION_MIN_ACCELERATE = "1.15"
"""The first accelerate whose regional compilation compiles this library's models (1.10.1 and 1.14.0 compiled none of
their blocks, without a word: checked on CPU, DDP and FSDP2)."""


def check_regional_compilation(accelerator: Any, version: str | None = None) -> bool:
    """Warn (and return False) when the launch asked for regional compilation (`--dynamo_use_regional_compilation`)
    and this accelerate (`version`, default the installed one) would leave every block eager; True otherwise."""
    from packaging.version import Version

    from accelerate.utils import DynamoBackend

    plugin = getattr(accelerator.state, "dynamo_plugin", None)
    if plugin is None or plugin.backend == DynamoBackend.NO or not plugin.use_regional_compilation:
        return True
    if version is None:
        import accelerate

        version = accelerate.__version__
    if Version(version) >= Version(REGIONAL_COMPILATION_MIN_ACCELERATE):
        return True
    logger.warning("Regional compilation was asked for, but accelerate %s compiles none of this model's blocks: "
                   "training runs eager. Fix: pip install 'accelerate>=%s'.", version,
                   REGIONAL_COMPILATION_MIN_ACCELERATE)
    return False

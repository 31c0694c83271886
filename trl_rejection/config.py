"""`RejectionSFTConfig`: TRL's `SFTConfig` plus the refusal-labelling options, with the paper's defaults."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from trl import SFTConfig

from .constants import DEFAULT_REFUSAL
from .validation import check_dataclass, check_range, non_empty_strings, non_negative, positive

PROJECTOR_MODULES = ["multi_modal_projector", "mm_projector", "connector", "visual.merger"]


def _non_blocking_by_default(accelerator_config: Any) -> Any:
    """`accelerator_config` with `non_blocking: true` unless it sets the key: None, a dict, a JSON string (the CLI's
    form) or a JSON file path become a dict; an `AcceleratorConfig` object is kept as it is."""
    if accelerator_config is None:
        return {"non_blocking": True}
    if isinstance(accelerator_config, str):
        text = accelerator_config
        try:
            if text.lstrip().startswith("{"):
                accelerator_config = json.loads(text)
            else:
                with open(text) as f:
                    accelerator_config = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"accelerator_config {text!r} is neither a JSON object nor a readable JSON file ({e}). "
                             "Fix: give a JSON object such as '{\"non_blocking\": true}', a path to a JSON file, or "
                             "a YAML mapping.") from None
    if isinstance(accelerator_config, dict):
        return {"non_blocking": True, **accelerator_config}
    return accelerator_config


@dataclass
class RejectionSFTConfig(SFTConfig):
    r"""
    Configuration class for the [`RejectionSFTTrainer`].

    This class adds the refusal-labelling, projector and throughput parameters to [`~trl.SFTConfig`]; every
    `SFTConfig` and [`~transformers.TrainingArguments`] parameter is accepted too. The parameters below whose name
    `SFTConfig` also has are listed for their different default. Measured throughput effects of each lever are in
    `bench/RESULTS.md`.

    Parameters:
        > Parameters that control the refusal labels

        refusal_sentences (`list[str]`, *optional*, defaults to `["I'm sorry, but I cannot assist with your request"]`):
            Replies that mark a row as a refusal row when the dataset has no `is_refusal` column.
        refusal_label_tokens (`int`, *optional*):
            Supervise only the first N tokens of a refusal reply. If `None`, all of its tokens are supervised.
        mask_refusal_eos (`bool`, *optional*, defaults to `True`):
            Never supervise the end-of-turn / EOS token after a refusal (the method's masking). Turn it off only to
            reproduce the ablation.
        truncation_policy (`str`, *optional*, defaults to `"drop"`):
            What to do with a row that `max_length` would cut inside an image or a refusal reply: `"drop"` it from
            its batch with a warning, or raise an `"error"`.
        add_eos_when_missing (`bool`, *optional*, defaults to `True`):
            Insert EOS after replies whose chat template closes them without a special token (llava-hf LLaVA-1.5),
            as LLaVA's own training format does.

        > Parameters that control the projector

        projector_lr (`float`, *optional*):
            Learning rate of the vision-language projector's parameters (the paper: 2e-5), in their own optimizer
            parameter groups. If `None`, the projector uses `learning_rate`. With LoRA, list the projector in
            `modules_to_save` so it trains.
        projector_modules (`list[str]`, *optional*, defaults to `["multi_modal_projector", "mm_projector", "connector", "visual.merger"]`):
            Parameter-name fragments that identify the projector (LLaVA, Qwen2-VL, Idefics3, Gemma 3 names).

        > Parameters whose defaults follow the paper

        learning_rate (`float`, *optional*, defaults to `2e-4`):
            Initial AdamW learning rate (the paper: 2e-4).
        lr_scheduler_type (`str`, *optional*, defaults to `"cosine"`):
            Learning rate scheduler (the paper: cosine).
        warmup_steps (`float`, *optional*, defaults to `0.03`):
            Warm-up steps, or a fraction of the training steps when below 1 (the paper: 0.03).
        num_train_epochs (`float`, *optional*, defaults to `3.0`):
            Number of training epochs (the paper: 3).
        max_length (`int`, *optional*, defaults to `2048`):
            Maximum number of tokens per row (the paper: 2048). If `None`, rows are not truncated.

        > Parameters that control the data pipeline

        dataset_kwargs (`dict[str, Any]`, *optional*, defaults to `{"skip_prepare_dataset": True}`):
            Dataset preparation options of `SFTConfig`. Preparation is skipped: the collator renders and tokenizes
            the rows itself.
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Must stay `False`: the collator reads the `messages`, `images`, `is_refusal` and `id` columns, which are
            not arguments of the model's forward.
        dataloader_num_workers (`int`, *optional*, defaults to `4`):
            Dataloader worker processes that collate batches (render, tokenize, process images) while the GPU
            trains. At 0 the image processing runs between steps on the training process.
        data_wait_warning (`float`, *optional*, defaults to `0.1`):
            Warn once when, over the steps since the last log, training spent more than this fraction of its wall time
            waiting for the dataloader (measured from the fourth optimizer step on; on GPUs and other accelerators, not
            on CPU). The measured fraction is logged as `data_wait_fraction` whatever this is. If `None`, no warning.

        > Parameters that control the throughput

        padding_free (`bool`, *optional*, defaults to `True`):
            Concatenate each batch's rows into one sequence without padding. Unlike TRL's option of this name it
            works for vision-language models and with SDPA: the trainer switches the language model's attention from
            `"sdpa"` to `"sdpa_varlen"` (PyTorch's varlen flash-attention kernel on CUDA, one causal SDPA call per
            row elsewhere), so rows never attend to each other and the loss is the padded batch's. Qwen2-VL,
            Qwen2.5-VL and Qwen3-VL rows get their own 3-D RoPE positions; Gemma 3 rows keep their bidirectional
            image-token mask and sliding windows (SDPA only: with eager/flex attention Gemma 3 trains on padded
            batches); other multimodal RoPE or token-type masks (Qwen3-VL-MoE, GLM-4V, PaliGemma, ...) fall back to
            padded batches. A `data_collator` given to
            the trainer decides for itself (its own `padding_free` if it is a `RejectionDataCollator`, else off).
        cast_lora_inputs (`bool`, *optional*, defaults to `False`):
            Keep PEFT's upcast of every LoRA layer's input to the adapters' fp32 dtype. Under bf16/fp16 autocast the
            LoRA matmuls run in half precision anyway, so the upcast only adds copies; `False` skips it during
            training and evaluation steps whenever autocast is on (bit-identical results with LoRA dropout 0).
        fp32_trainable_params (`bool`, *optional*, defaults to `True`):
            Keep every trainable parameter (LoRA adapters, the projector and other `modules_to_save`) in float32 when
            the model is loaded in bf16/fp16 and training runs in bf16/fp16 mixed precision, as FSDP and DeepSpeed do
            with their fp32 master weights, while `train` runs (then cast back to the checkpoint's dtype). The forward
            still runs in half precision under autocast, but optimizer updates smaller than a half-precision step (the
            projector's lr 2e-5 on weights of ~1e-2) are no longer rounded away. FSDP and DeepSpeed, which keep fp32
            masters themselves, are left alone.
        skip_frozen_vision_backward (`bool`, *optional*, defaults to `True`):
            Detach the projector's inputs when every trainable parameter lies in the projector, the language model or
            the LM head. With PEFT and gradient checkpointing, transformers' `enable_input_require_grads` also marks
            the vision tower's patch embeddings as requiring grad, so every step recomputes and backpropagates the
            whole frozen vision tower for no parameter's gradient. The gradients of the trainable parameters are
            unchanged. No effect while something upstream of the projector trains (a LoRA on the vision tower;
            checked at every forward).
        varlen_vision_attention (`bool`, *optional*, defaults to `True`):
            Run the vision encoder's attention of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (one block per image, or per
            window of Qwen2.5-VL's window attention) as one varlen flash-attention call per layer
            (`"varlen_flash_sdpa"`) instead of transformers' one SDPA call per block under `"sdpa"`. Same attention;
            no effect on other models, on a vision encoder loaded with another attention, or on CPU (one SDPA call
            per block there, as before).
        fuse_elementwise_ops (`bool`, *optional*):
            Run the language model's RMSNorms and SiLU-gated MLP activations (Llama, Mistral, Qwen2/3 layers) as
            `torch.compile`-fused kernels, compiled once at the first step; matmuls and LoRA stay eager. If `None`,
            on when training on CUDA.
        checkpoint_layers (`str`, *optional*, defaults to `"auto"`):
            With `gradient_checkpointing`, which trainable layers (those holding a LoRA or other trained parameter)
            are checkpointed: `"all"` (transformers: every layer's forward runs again in the backward), or `"auto"`:
            before each micro-batch, as many layers as fit keep their activations instead, from the bytes per token
            one layer keeps (measured once, on the second micro-batch), the memory a micro-batch needs per token
            (measured at each, the largest kept) and `checkpoint_memory_fraction`. Same losses; the mean number of
            layers kept is logged as `uncheckpointed_layers`. CUDA only (elsewhere `"all"`); no effect when
            `gradient_checkpointing_kwargs` sets `every_n_layers`. Resets the device's peak-memory statistics at each
            micro-batch.
        checkpoint_memory_fraction (`float`, *optional*, defaults to `0.85`):
            Fraction of the GPU's memory that `checkpoint_layers="auto"` plans a micro-batch to fill. Lower it when
            the GPU is shared with another process or runs out of memory.
        recompute_lora_dropout (`bool`, *optional*, defaults to `True`):
            Recompute each LoRA adapter's dropout and `lora_A` in the backward instead of keeping the dropped copy of
            its input and the mask (PEFT keeps both per LoRA layer: ~100 KB per token and layer on Llama-2-7B, ~40% of
            what an uncheckpointed layer keeps). The same random masks, so the same losses; it only acts in layers
            that gradient checkpointing does not recompute anyway.

        > Parameters that control multi-GPU training

        balance_micro_batches (`bool`, *optional*, defaults to `True`):
            With padding-free batches and `train_sampling_strategy="random"`, split the rows of each optimizer step over
            processes and accumulation steps so that every micro-batch gets about the same number of tokens (estimated
            without tokenizing): data-parallel processes then wait less for the slowest one. The rows of each optimizer
            step, and so the loss, are those of a plain shuffle.
        zero3_leaf_modules (`bool`, *optional*, defaults to `True`):
            Under DeepSpeed ZeRO-3, gather each transformer block's weights at once (the blocks marked as ZeRO-3 leaf
            modules, with a two-block prefetch) instead of each linear layer and LoRA factor on its own. No effect
            without ZeRO-3.
        fsdp_autocast_precision (`bool`, *optional*, defaults to `True`):
            Under FSDP2 with bf16/fp16 mixed precision, compute as autocast does on one GPU: parameters are still
            gathered and multiplied in half precision, but the forward runs under `torch.autocast` (accelerate applies
            only FSDP2's policy there, no autocast), the sharded blocks' inputs and outputs are not cast to half
            precision (FSDP2's `cast_forward_inputs` / `output_dtype`, which accelerate turns on) and gradients are
            reduced in float32. Without it, ops that autocast runs in float32 (LayerNorm: the CLIP vision tower's
            residual stream) run in half precision, and the losses drift from one GPU's. Off: accelerate's policy.
            No effect without FSDP2.
        deepspeed_autocast (`bool`, *optional*, defaults to `True`):
            Under DeepSpeed with bf16/fp16, run the model's forward under `torch.autocast` inside the engine, as
            accelerate does on one GPU and under DDP. Under DeepSpeed accelerate opens no autocast (the bf16/fp16
            engine keeps the whole model in half precision), and the engine would switch an outer one off unless its
            own `torch_autocast` section is on, so ops that autocast runs in float32 (LayerNorm: the CLIP vision
            tower's residual stream) run in half precision, and the losses drift from one GPU's. Off: DeepSpeed's own
            numerics (a wrapper set by an earlier trainer on the same model is taken off). No effect without
            DeepSpeed.

    > [!NOTE]
    > Batches move to the GPU without making the host wait: with `dataloader_pin_memory` (the default),
    > `accelerator_config`'s `non_blocking` defaults to True here; an `accelerator_config` that sets it keeps its value.

    > [!NOTE]
    > `train_sampling_strategy="group_by_length"` groups rows by a length estimated without tokenizing (text
    > characters / 4 + tokens per image; or the `length` column if the dataset has one), image rows and text-only
    > rows apart, like LLaVA's `group_by_modality_length`. With `padding_free` there is no padding to remove, so the
    > default keeps random order.

    Example:
        >>> RejectionSFTConfig("out", refusal_label_tokens=8, projector_lr=2e-5).mask_refusal_eos
        True
    """

    # Parameters that control the refusal labels
    refusal_sentences: list[str] = field(default_factory=lambda: [DEFAULT_REFUSAL], metadata={
        "help": "Replies that mark a row as a refusal row when the dataset has no `is_refusal` column."})
    refusal_label_tokens: int | None = field(default=None, metadata={
        "help": "Supervise only the first N tokens of a refusal reply. If `None`, all of its tokens are supervised."})
    mask_refusal_eos: bool = field(default=True, metadata={
        "help": "Never supervise the end-of-turn / EOS token after a refusal (the method's masking). Turn it off "
        "only to reproduce the ablation."})
    truncation_policy: Literal["drop", "error"] = field(default="drop", metadata={
        "help": "What to do with a row that `max_length` would cut inside an image or a refusal reply: `\"drop\"` "
        "it from its batch with a warning, or raise an `\"error\"`."})
    add_eos_when_missing: bool = field(default=True, metadata={
        "help": "Insert EOS after replies whose chat template closes them without a special token (llava-hf "
        "LLaVA-1.5), as LLaVA's own training format does."})

    # Parameters that control the projector
    projector_lr: float | None = field(default=None, metadata={
        "help": "Learning rate of the vision-language projector's parameters (the paper: 2e-5), in their own "
        "optimizer parameter groups. If `None`, the projector uses `learning_rate`. With LoRA, list the projector "
        "in `modules_to_save` so it trains."})
    projector_modules: list[str] = field(default_factory=lambda: list(PROJECTOR_MODULES), metadata={
        "help": "Parameter-name fragments that identify the projector (LLaVA, Qwen2-VL, Idefics3, Gemma 3 names)."})

    # Parameters whose defaults follow the paper
    learning_rate: float = field(default=2e-4, metadata={"help": "Initial AdamW learning rate (the paper: 2e-4)."})
    lr_scheduler_type: str = field(default="cosine", metadata={
        "help": "Learning rate scheduler (the paper: cosine)."})
    warmup_steps: float = field(default=0.03, metadata={
        "help": "Warm-up steps, or a fraction of the training steps when below 1 (the paper: 0.03)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Number of training epochs (the paper: 3)."})
    max_length: int | None = field(default=2048, metadata={
        "help": "Maximum number of tokens per row (the paper: 2048). If `None`, rows are not truncated."})

    # Parameters that control the data pipeline
    dataset_kwargs: dict[str, Any] | str | None = field(
        default_factory=lambda: {"skip_prepare_dataset": True}, metadata={
            "help": "Dataset preparation options of `SFTConfig`. Preparation is skipped: the collator renders and "
            "tokenizes the rows itself."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Must stay `False`: the collator reads the `messages`, `images`, `is_refusal` and `id` columns, "
        "which are not arguments of the model's forward."})
    dataloader_num_workers: int = field(default=4, metadata={
        "help": "Dataloader worker processes that collate batches (render, tokenize, process images) while the GPU "
        "trains. At 0 the image processing runs between steps on the training process."})

    data_wait_warning: float | None = field(default=0.1, metadata={
        "help": "Warn once when, over the steps since the last log, training spent more than this fraction of its wall "
        "time waiting for the dataloader (measured from the fourth optimizer step on; on GPUs and other "
        "accelerators, not on CPU). The measured fraction is logged as `data_wait_fraction` whatever this is. If "
        "`None`, no warning."})

    # Parameters that control the throughput
    padding_free: bool = field(default=True, metadata={
        "help": "Concatenate each batch's rows into one sequence without padding. Unlike TRL's option of this name "
        "it works for vision-language models and with SDPA: the trainer switches the language model's attention "
        "from `\"sdpa\"` to `\"sdpa_varlen\"` (PyTorch's varlen flash-attention kernel on CUDA, one causal SDPA "
        "call per row elsewhere), so rows never attend to each other and the loss is the padded batch's. Qwen2-VL, "
        "Qwen2.5-VL and Qwen3-VL rows get their own 3-D RoPE positions; Gemma 3 rows keep their bidirectional "
        "image-token mask and sliding windows (SDPA only: with eager/flex attention Gemma 3 trains on padded "
        "batches); other multimodal RoPE or token-type masks (Qwen3-VL-MoE, GLM-4V, PaliGemma, ...) fall back to "
        "padded batches. A `data_collator` given to "
        "the trainer decides for itself (its own `padding_free` if it is a `RejectionDataCollator`, else off)."})
    cast_lora_inputs: bool = field(default=False, metadata={
        "help": "Keep PEFT's upcast of every LoRA layer's input to the adapters' fp32 dtype. Under bf16/fp16 "
        "autocast the LoRA matmuls run in half precision anyway, so the upcast only adds copies; `False` skips it "
        "during training and evaluation steps whenever autocast is on (bit-identical results with LoRA dropout 0)."})
    fp32_trainable_params: bool = field(default=True, metadata={
        "help": "Keep every trainable parameter (LoRA adapters, the projector and other `modules_to_save`) in float32 "
        "when the model is loaded in bf16/fp16 and training runs in bf16/fp16 mixed precision, as FSDP and DeepSpeed "
        "do with their fp32 master weights, while `train` runs (then cast back to the checkpoint's dtype). The forward "
        "still runs in half precision under autocast, but optimizer updates smaller than a half-precision step (the "
        "projector's lr 2e-5 on weights of ~1e-2) are no longer rounded away. FSDP and DeepSpeed, which keep fp32 "
        "masters themselves, are left alone."})
    skip_frozen_vision_backward: bool = field(default=True, metadata={
        "help": "Detach the projector's inputs when every trainable parameter lies in the projector, the language model "
        "or the LM head. With PEFT and gradient checkpointing, transformers' `enable_input_require_grads` also marks "
        "the vision tower's patch embeddings as requiring grad, so every step recomputes and backpropagates the "
        "whole frozen vision tower for no parameter's gradient. The gradients of the trainable parameters are "
        "unchanged. No effect while something upstream of the projector trains (a LoRA on the vision tower; "
        "checked at every forward)."})
    varlen_vision_attention: bool = field(default=True, metadata={
        "help": "Run the vision encoder's attention of Qwen2-VL, Qwen2.5-VL and Qwen3-VL (one block per image, or "
        "per window of Qwen2.5-VL's window attention) as one varlen flash-attention call per layer "
        "(`\"varlen_flash_sdpa\"`) instead of transformers' one SDPA call per block under `\"sdpa\"`. Same "
        "attention; no effect on other models, on a vision encoder loaded with another attention, or on CPU (one "
        "SDPA call per block there, as before)."})
    fuse_elementwise_ops: bool | None = field(default=None, metadata={
        "help": "Run the language model's RMSNorms and SiLU-gated MLP activations (Llama, Mistral, Qwen2/3 layers) "
        "as `torch.compile`-fused kernels, compiled once at the first step; matmuls and LoRA stay eager. If `None`, "
        "on when training on CUDA."})
    checkpoint_layers: Literal["all", "auto"] = field(default="auto", metadata={
        "help": "With `gradient_checkpointing`, which trainable layers (those holding a LoRA or other trained "
        "parameter) are checkpointed: `\"all\"` (transformers: every layer's forward runs again in the backward), "
        "or `\"auto\"`: before each micro-batch, as many layers as fit keep their activations instead, from the "
        "bytes per token one layer keeps (measured once, on the second micro-batch), the memory a micro-batch needs "
        "per token (measured at each, the largest kept) and `checkpoint_memory_fraction`. Same losses; the mean "
        "number of layers kept is logged as `uncheckpointed_layers`. CUDA only (elsewhere `\"all\"`); no effect "
        "when `gradient_checkpointing_kwargs` sets `every_n_layers`. Resets the device's peak-memory statistics at "
        "each micro-batch."})
    checkpoint_memory_fraction: float = field(default=0.85, metadata={
        "help": "Fraction of the GPU's memory that `checkpoint_layers=\"auto\"` plans a micro-batch to fill. Lower it "
        "when the GPU is shared with another process or runs out of memory."})
    recompute_lora_dropout: bool = field(default=True, metadata={
        "help": "Recompute each LoRA adapter's dropout and `lora_A` in the backward instead of keeping the dropped "
        "copy of its input and the mask (PEFT keeps both per LoRA layer: ~100 KB per token and layer on Llama-2-7B, "
        "~40% of what an uncheckpointed layer keeps). The same random masks, so the same losses; it only acts in "
        "layers that gradient checkpointing does not recompute anyway."})

    # Parameters that control multi-GPU training
    balance_micro_batches: bool = field(default=True, metadata={
        "help": "With padding-free batches and `train_sampling_strategy=\"random\"`, split the rows of each optimizer "
        "step over processes and accumulation steps so that every micro-batch gets about the same number of "
        "tokens (estimated without tokenizing): data-parallel processes then wait less for the slowest one. The "
        "rows of each optimizer step, and so the loss, are those of a plain shuffle."})
    zero3_leaf_modules: bool = field(default=True, metadata={
        "help": "Under DeepSpeed ZeRO-3, gather each transformer block's weights at once (the blocks marked as ZeRO-3 "
        "leaf modules, with a two-block prefetch) instead of each linear layer and LoRA factor on its own. No "
        "effect without ZeRO-3."})
    fsdp_autocast_precision: bool = field(default=True, metadata={
        "help": "Under FSDP2 with bf16/fp16 mixed precision, compute as autocast does on one GPU: parameters are still "
        "gathered and multiplied in half precision, but the forward runs under `torch.autocast` (accelerate applies "
        "only FSDP2's policy there, no autocast), the sharded blocks' inputs and outputs are not cast to half "
        "precision (FSDP2's `cast_forward_inputs` / `output_dtype`, which accelerate turns on) and gradients are "
        "reduced in float32. Without it, ops that autocast runs in float32 (LayerNorm: the CLIP vision tower's "
        "residual stream) run in half precision, and the losses drift from one GPU's. Off: accelerate's policy. "
        "No effect without FSDP2."})
    deepspeed_autocast: bool = field(default=True, metadata={
        "help": "Under DeepSpeed with bf16/fp16, run the model's forward under `torch.autocast` inside the engine, as "
        "accelerate does on one GPU and under DDP. Under DeepSpeed accelerate opens no autocast (the bf16/fp16 "
        "engine keeps the whole model in half precision), and the engine would switch an outer one off unless its "
        "own `torch_autocast` section is on, so ops that autocast runs in float32 (LayerNorm: the CLIP vision "
        "tower's residual stream) run in half precision, and the losses drift from one GPU's. Off: DeepSpeed's own "
        "numerics (a wrapper set by an earlier trainer on the same model is taken off). No effect without "
        "DeepSpeed."})

    def __post_init__(self) -> None:
        """Check this class's own fields (types and ranges) before `SFTConfig`'s own post-init runs."""
        check_dataclass(self)
        if self.dataloader_pin_memory:  # (from pageable memory a copy waits anyway; transformers would warn)
            self.accelerator_config = _non_blocking_by_default(self.accelerator_config)
        check_range(self, "refusal_sentences", lambda v: v and non_empty_strings(v), "a non-empty list of non-blank "
                    "sentences", f"give at least one sentence, e.g. refusal_sentences: [{DEFAULT_REFUSAL!r}]")
        check_range(self, "projector_modules", non_empty_strings, "a list of non-blank name fragments (a blank one "
                    "matches every parameter)", "remove the blank entries")
        check_range(self, "refusal_label_tokens", positive, "a number of tokens >= 1",
                    "give a positive number, or null (None) to supervise the whole refusal")
        check_range(self, "max_length", positive, "a number of tokens >= 1", "give a positive number, e.g. 2048")
        check_range(self, "projector_lr", positive, "a finite learning rate > 0",
                    "give e.g. 2.0e-5 (the paper), or null (None) to use learning_rate")
        check_range(self, "learning_rate", non_negative, "a finite learning rate >= 0", "give e.g. 2.0e-4")
        check_range(self, "warmup_steps", non_negative, "a step count or fraction >= 0", "give e.g. 0.03")
        check_range(self, "num_train_epochs", non_negative, "a number of epochs >= 0", "give e.g. 3")
        check_range(self, "data_wait_warning", lambda v: 0 < v < 1, "a fraction of the training time between 0 and "
                    "1", "give e.g. 0.1, or null for no warning")
        check_range(self, "checkpoint_memory_fraction", lambda v: 0 < v <= 1, "a fraction of the GPU's memory in "
                    "(0, 1]", "give e.g. 0.85, or checkpoint_layers: all to checkpoint every layer")
        check_range(self, "dataloader_num_workers", lambda v: v >= 0, "a number of processes >= 0", "give e.g. 4")
        check_range(self, "remove_unused_columns", lambda v: not v, "False (the collator reads the `messages`, "
                    "`images` and `is_refusal` columns, which the model's forward does not take)",
                    "remove the option or set remove_unused_columns: false")
        super().__post_init__()

"""`RejectionSFTConfig`: TRL's `SFTConfig` plus the refusal-labelling options, with the paper's defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from trl import SFTConfig

from .data.mix import DEFAULT_REFUSAL
from .validation import check_dataclass, check_range, non_empty_strings, non_negative, positive

PROJECTOR_MODULES = ["multi_modal_projector", "mm_projector", "connector", "visual.merger"]


@dataclass
class RejectionSFTConfig(SFTConfig):
    r"""Configuration for [`RejectionSFTTrainer`]: every `SFTConfig` field, plus:

    Parameters:
        refusal_sentences (`list[str]`, defaults to the paper's sentence):
            Replies that mark a row as a refusal row when the dataset has no `is_refusal` column.
        refusal_label_tokens (`int` or `None`, defaults to `None`):
            Supervise only the first N tokens of a refusal reply; `None` supervises all of them.
        mask_refusal_eos (`bool`, defaults to `True`):
            Never supervise the end-of-turn / EOS token after a refusal (the method's masking). Turn it off only
            to reproduce the ablation.
        truncation_policy (`"drop"` or `"error"`, defaults to `"drop"`):
            What to do with a row that `max_length` would cut inside an image or a refusal reply.
        add_eos_when_missing (`bool`, defaults to `True`):
            Insert EOS after replies whose chat template closes them without a special token (llava-hf
            LLaVA-1.5), as LLaVA's own training format does.
        projector_lr (`float` or `None`, defaults to `None`):
            Learning rate of the vision-language projector's parameters (the paper: 2e-5); `None` uses
            `learning_rate`. With LoRA, list the projector in `modules_to_save` so it trains.
        projector_modules (`list[str]`):
            Parameter-name fragments that identify the projector (LLaVA, Qwen2-VL, Idefics3, Gemma 3 names).

    Throughput options. Measured effects: one H100, LLaVA-1.5-7B-shaped model, LoRA r=128 (dropout 0.05) on the
    language model, projector trained, gradient checkpointing, batch 16, real (non-padding) tokens/s, each lever
    changed alone and compared with the defaults in the same call (8,079; 8,140 for `fuse_elementwise_ops` and LoRA
    dropout). Medians: defaults 8,178, stock TRL `SFTTrainer` 3,845. Details and the commands: `bench/RESULTS.md`.

        padding_free (`bool`, defaults to `True`):
            Concatenate each batch's rows into one sequence without padding. Unlike TRL's option of this name it
            works for vision-language models and with SDPA: the trainer switches the language model's attention
            from `"sdpa"` to `"sdpa_varlen"` (PyTorch's varlen flash-attention kernel on CUDA, one causal SDPA call
            per row elsewhere), so rows never attend to each other and the loss is the padded batch's (within bf16
            noise on the GPU, 1e-5 in fp32). Qwen2-VL and Qwen2.5-VL rows get their own 3-D RoPE positions; models
            with token-type masks (Gemma 3) or other multimodal RoPE (Qwen3-VL, ...) fall back to padded batches.
            Measured: padded batches 4,824 tokens/s (-40%), peak memory 34.0 vs 24.8 GiB.
        train_sampling_strategy (`str`, defaults to `"random"`):
            `"group_by_length"` groups rows of similar estimated length (text characters / 4 + tokens per image; or
            the `length` column if the dataset has one) into batches, image rows and text-only rows apart, like
            LLaVA's `group_by_modality_length`. With padded batches it cuts padding from 37% to 9.5% (6,976 vs
            4,824 tokens/s); with `padding_free` there is no padding to remove, so the default keeps random order.
        cast_lora_inputs (`bool`, defaults to `False`):
            PEFT upcasts every LoRA layer's input to the adapters' fp32 dtype before dropout and the LoRA matmuls.
            Under bf16/fp16 autocast those matmuls run in half precision anyway, so the upcast only adds copies
            (several full-size activation tensors per LoRA layer, forward and backward). `False` skips it during
            training and evaluation steps whenever autocast is on; with LoRA dropout 0 the results are bit-identical.
            `True` keeps PEFT's behaviour. Measured: with the upcast 7,081 tokens/s (-12%), peak 25.9 GiB.
        fuse_elementwise_ops (`bool` or `None`, defaults to `None`):
            Run the language model's RMSNorms and SiLU-gated MLP activations (Llama, Mistral, Qwen2/3 layers) as
            `torch.compile`-fused kernels; matmuls and LoRA stay eager. Two small pure functions are compiled once
            (dynamic shapes; ~10 s at the first step on the H100) and shared by all layers. `None`: on when
            training on CUDA. Measured: eager ops 6,991 tokens/s (-14%), peak 25.5 GiB.
        balance_micro_batches (`bool`, defaults to `True`):
            With padding-free batches and `train_sampling_strategy="random"`, split the rows of each optimizer step
            over processes and accumulation steps so that every micro-batch gets about the same number of tokens
            (estimated without tokenizing): data-parallel processes then wait less for the slowest one. The rows of
            each optimizer step, and so the loss, are those of a plain shuffle.
        zero3_leaf_modules (`bool`, defaults to `True`):
            Under DeepSpeed ZeRO-3, gather each transformer block's weights at once (its blocks marked as ZeRO-3 leaf
            modules) instead of each linear layer and LoRA factor on its own. No effect without ZeRO-3.
        dataloader_num_workers (`int`, defaults to `4`):
            Processes that collate (render, tokenize, process images) while the GPU trains. At 0 the image
            processing runs between steps on the training process: 6,845 tokens/s (-15%; the benchmark uses 8).
            One worker collates ~99 rows/s on the H100 machine's CPU (torchvision CLIP processor) against ~11 rows/s
            consumed, so 4 leave ample headroom.

    LoRA dropout is the `LoraConfig`'s: 0 instead of 0.05 measured +5% (8,541).

    Defaults differing from `SFTConfig` follow the paper: `learning_rate=2e-4`, cosine schedule, 3% warm-up,
    3 epochs, `max_length=2048`; `skip_prepare_dataset` is on because the collator renders rows itself.

    Example:
        >>> RejectionSFTConfig("out", refusal_label_tokens=8, projector_lr=2e-5).mask_refusal_eos
        True
    """

    refusal_sentences: list[str] = field(default_factory=lambda: [DEFAULT_REFUSAL], metadata={
        "help": "Replies that mark a row as a refusal row when there is no `is_refusal` column."})
    refusal_label_tokens: int | None = field(default=None, metadata={
        "help": "Supervise only the first N tokens of a refusal reply (None: all of them)."})
    mask_refusal_eos: bool = field(default=True, metadata={
        "help": "Never supervise the end-of-turn / EOS token after a refusal."})
    truncation_policy: Literal["drop", "error"] = field(default="drop", metadata={
        "help": "A row cut inside an image or a refusal reply by max_length is dropped (with a warning) or raises."})
    add_eos_when_missing: bool = field(default=True, metadata={
        "help": "Insert EOS after replies whose chat template closes them without a special token."})
    projector_lr: float | None = field(default=None, metadata={
        "help": "Learning rate of the projector parameters (the paper: 2e-5). None: learning_rate."})
    projector_modules: list[str] = field(default_factory=lambda: list(PROJECTOR_MODULES), metadata={
        "help": "Parameter-name fragments identifying the vision-language projector."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Initial AdamW learning rate (the paper: 2e-4)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Scheduler (the paper: cosine)."})
    warmup_steps: float = field(default=0.03, metadata={
        "help": "Warm-up steps, or a fraction of the training steps when below 1 (the paper: 0.03)."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs (the paper: 3)."})
    max_length: int | None = field(default=2048, metadata={"help": "Maximum tokens per row (the paper: 2048)."})
    padding_free: bool = field(default=True, metadata={
        "help": "Concatenate each batch's rows into one unpadded sequence, attention kept within rows (VLMs too)."})
    cast_lora_inputs: bool = field(default=False, metadata={
        "help": "Keep PEFT's fp32 upcast of LoRA inputs under bf16/fp16 autocast (False: skip the extra copies)."})
    fuse_elementwise_ops: bool | None = field(default=None, metadata={
        "help": "torch.compile-fused RMSNorm and SiLU*up kernels in the language model (None: on for CUDA)."})
    balance_micro_batches: bool = field(default=True, metadata={
        "help": "With padding-free batches and `train_sampling_strategy=\"random\"`, split the rows of each optimizer "
                "step over processes and accumulation steps so that every micro-batch gets about the same number of "
                "tokens (estimated without tokenizing): data-parallel processes then wait less for the slowest one. "
                "The rows of each optimizer step, and so the loss, are those of a plain shuffle."})
    zero3_leaf_modules: bool = field(default=True, metadata={
        "help": "Under DeepSpeed ZeRO-3, gather each transformer block's weights at once (its blocks marked as ZeRO-3 "
                "leaf modules) instead of each linear layer and LoRA factor on its own. No effect without ZeRO-3."})
    dataloader_num_workers: int = field(default=4, metadata={
        "help": "Dataloader worker processes collating batches (image processing) while the GPU trains."})
    dataset_kwargs: dict[str, Any] | str | None = field(default_factory=lambda: {"skip_prepare_dataset": True},
                                                        metadata={"help": "Kept: the collator renders rows."})

    def __post_init__(self) -> None:
        """Check this class's own fields (types and ranges) before `SFTConfig`'s own post-init runs."""
        check_dataclass(self)
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
        check_range(self, "dataloader_num_workers", lambda v: v >= 0, "a number of processes >= 0", "give e.g. 4")
        super().__post_init__()

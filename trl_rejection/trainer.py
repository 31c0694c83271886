"""`RejectionSFTTrainer`: TRL's `SFTTrainer` with refusal-prefix labels, split loss logging and a projector LR.

Example:
    >>> from peft import LoraConfig
    >>> from datasets import load_from_disk
    >>> trainer = RejectionSFTTrainer(
    ...     model="llava-hf/llava-1.5-7b-hf",
    ...     args=RejectionSFTConfig("llava-rejection", projector_lr=2e-5),
    ...     train_dataset=load_from_disk("outputs/mix"),
    ...     peft_config=LoraConfig(r=128, lora_alpha=256, target_modules="all-linear",
    ...                            modules_to_save=["multi_modal_projector"]),
    ... )  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from torch.profiler import record_function
from transformers import AutoConfig, AutoProcessor
from trl import SFTTrainer

from . import distributed
from .attention import use_varlen_attention, use_varlen_vision_attention
from .balance import TokenBalancedSampler
from .callbacks import ANNOTATION
from .checkpointing import AutoLayerCheckpointing, CudaMemory
from .collator import RejectionDataCollator
from .config import RejectionSFTConfig
from .data_wait import DataWaitMeter
from .dataset_checks import check_dataset, drop_empty_images
from .extras import keep_trained_modules_unquantized
from .frozen_vision import skip_frozen_vision_backward
from .fused import fuse_elementwise_ops
from .lora_dropout import recompute_lora_dropout
from .optim import fp32_masters, keep_embeddings_32bit, projector_parameter_ids, split_projector_groups
from .packing import mrope_packed_inputs, padding_free_supported, rope_index_module, token_row_index
from .processing import is_vlm_processor
from .sampler import ModalityLengthGroupedSampler, estimate_lengths, image_token_count
from .split_loss import split_loss_sums


logger = logging.getLogger(__name__)


def _padding_free(args: RejectionSFTConfig, data_collator: Any, model_config: Any,
                  attn_implementation: str | None = None) -> bool:
    """Whether this trainer's batches are padding-free: `args.padding_free` for the default collator, the flag a given
    `RejectionDataCollator` was built with, never for other collators; only for models that keep packed rows apart
    (a warning, or for a given packing collator an error, says why not)."""
    if data_collator is not None and not isinstance(data_collator, RejectionDataCollator):
        if args.padding_free:
            logger.warning("padding_free=True is ignored: it needs a RejectionDataCollator.")
        return False
    wanted = args.padding_free if data_collator is None else data_collator.padding_free
    if data_collator is not None and wanted != args.padding_free:
        logger.warning("padding_free=%s is ignored: the given data_collator was built with padding_free=%s.",
                       args.padding_free, wanted)
    supported, why = padding_free_supported(model_config, attn_implementation)
    if wanted and not supported and data_collator is not None:
        raise ValueError(f"The data_collator packs rows (padding_free=True) but this model cannot keep packed rows "
                         f"apart ({why}). Fix: build it with padding_free=False.")
    if wanted and not supported:
        logger.warning("padding_free=True is ignored for this model (%s): training on padded batches.", why)
    return wanted and supported


class RejectionSFTTrainer(SFTTrainer):
    """`SFTTrainer` for refusal-swap safety alignment of VLMs (and text-only chat models).

    Differences from `SFTTrainer`, all driven by [`RejectionSFTConfig`]:

    - the default collator is [`RejectionDataCollator`]: normal rows are supervised on every assistant reply and its
      end-of-turn token; refusal rows only on the leading refusal tokens, never on their end-of-turn/EOS token;
    - logs `loss_refusal`, `loss_normal`, `refusal_tokens` and `normal_tokens` beside the usual loss;
    - puts the projector's parameters in their own optimizer parameter groups when `projector_lr` is set;
    - `padding_free` batches for vision-language models with SDPA (rows concatenated by the collator, attention kept
      within rows by the `"sdpa_varlen"` attention of `trl_rejection.attention`), and
      `train_sampling_strategy="group_by_length"` with modality-aware lengths estimated without tokenizing (see
      `trl_rejection.sampler`).

    Everything else (LoRA / QLoRA via `peft_config`, gradient checkpointing, `report_to`, checkpoints and
    `resume_from_checkpoint`, `push_to_hub`) is `SFTTrainer`'s.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`]):
            The model to train: a Hub id or local folder (loaded by `SFTTrainer` with `args.model_init_kwargs`), or
            a loaded vision-language or causal language model.
        args ([`RejectionSFTConfig`], *optional*):
            Configuration for this trainer. If `None`, a default configuration is used (output dir
            `<model name>-rejection`). `padding_free` is this trainer's own: `self.args` is a copy of `args` with
            TRL's `padding_free` off (TRL's refuses vision data and custom collators); `self.padding_free` tells
            whether batches are padding-free. `args` itself is not modified.
        data_collator ([`~transformers.DataCollator`], *optional*):
            Collator of the rows. If `None`, a [`RejectionDataCollator`] configured from `args`. A given
            `RejectionDataCollator` keeps its own `padding_free`; any other collator turns `padding_free` off.
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Conversational rows: a `messages` column, optionally `images` and `is_refusal` (else a row is a refusal
            row when its last reply is one of `args.refusal_sentences`), as built by `trl_rejection.data.build_mix`.
        eval_dataset ([`~datasets.Dataset`], [`~datasets.IterableDataset`] or `dict[str, Dataset]`, *optional*):
            Evaluation rows, in the same format; the split losses are logged for them too (`eval_loss_refusal`, ...).
        processing_class ([`~transformers.ProcessorMixin`] or [`~transformers.PreTrainedTokenizerBase`], *optional*):
            The model's processor, or tokenizer for a text-only model. If `None`, loaded with
            [`~transformers.AutoProcessor.from_pretrained`] from the model's name.
        compute_loss_func (`Callable`, *optional*):
            Passed to `SFTTrainer` (deprecated there).
        compute_metrics (`Callable[[EvalPrediction], dict]`, *optional*):
            Passed to `SFTTrainer`: metrics computed at evaluation.
        callbacks (`list[TrainerCallback]`, *optional*):
            Passed to `SFTTrainer`: callbacks added to the default ones.
        optimizers (`tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]`, *optional*, defaults to `(None, None)`):
            A ready optimizer and scheduler. A ready optimizer keeps its own parameter groups, so it cannot be
            combined with `args.projector_lr` (a `ValueError` says so); use `optimizer_cls_and_kwargs` instead.
        optimizer_cls_and_kwargs (`tuple[type[torch.optim.Optimizer], dict[str, Any]]`, *optional*):
            Optimizer class and keyword arguments, used instead of `args.optim`; the projector groups of
            `projector_lr` are built for it too.
        preprocess_logits_for_metrics (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`, *optional*):
            Passed to `SFTTrainer`.
        quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
            Passed to `SFTTrainer`: quantization of a model loaded from its name (QLoRA with `peft_config`). The
            modules of `peft_config.modules_to_save` (the projector) are added to its `llm_int8_skip_modules`.
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration the model is wrapped with. With LoRA and `projector_lr`, list the projector in
            `modules_to_save`.
        formatting_func (`Callable`, *optional*):
            Passed to `SFTTrainer`; unused while `args.dataset_kwargs` skips dataset preparation (the default).
    """

    _tag_names = ["trl", "sft", "trl-rejection", "safety-alignment"]

    def __init__(
        self,
        model: str | torch.nn.Module,
        args: RejectionSFTConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: Any = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        quantization_config: Any = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path or "model"
            args = RejectionSFTConfig(f"{name.split('/')[-1]}-rejection")
        elif not isinstance(args, RejectionSFTConfig):
            raise TypeError(f"args must be a RejectionSFTConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        if args.projector_lr is not None and optimizers[0] is not None:
            raise ValueError("projector_lr is set but `optimizers` passes a ready optimizer, whose parameter groups "
                             "the trainer does not change. Fix: pass `optimizer_cls_and_kwargs` instead, or give the "
                             "projector its own group in your optimizer and leave projector_lr unset.")
        if isinstance(model, str):
            model_id = model
            model_config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code,
                                                      revision=(args.model_init_kwargs or {}).get("revision"))
        else:
            model_id, model_config = model.config.name_or_path, model.config
        if processing_class is None:
            processing_class = AutoProcessor.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset} if eval_dataset else {}
        check_dataset(train_dataset, "train", args.refusal_sentences)
        for key, ds in evals.items():
            check_dataset(ds, key, args.refusal_sentences)
        if not is_vlm_processor(processing_class):
            train_dataset = drop_empty_images(train_dataset, "train")
            evals = {k: drop_empty_images(v, k) for k, v in evals.items()}
            if eval_dataset is not None:
                eval_dataset = evals if isinstance(eval_dataset, dict) else evals["eval"]
        load_attn = (args.model_init_kwargs or {}).get("attn_implementation") if isinstance(model, str) else None
        padding_free = _padding_free(args, data_collator, model_config, load_attn)
        if data_collator is None:
            data_collator = RejectionDataCollator(
                processing_class, refusal_sentences=list(args.refusal_sentences),
                refusal_label_tokens=args.refusal_label_tokens, mask_refusal_eos=args.mask_refusal_eos,
                max_length=args.max_length, truncation=args.truncation_policy,
                add_eos_when_missing=args.add_eos_when_missing, pad_to_multiple_of=args.pad_to_multiple_of,
                padding_free=padding_free)
        # TRL's `padding_free` is its own collator's (it refuses vision data and other collators); ours is done by
        # the collator built above, so TRL gets a copy of the config with TRL's off.
        if quantization_config is not None and getattr(peft_config, "modules_to_save", None):
            quantization_config = keep_trained_modules_unquantized(quantization_config, peft_config.modules_to_save)
        trl_args = copy.copy(args)
        trl_args.padding_free = False
        super().__init__(model, args=trl_args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_loss_func=compute_loss_func, compute_metrics=compute_metrics, callbacks=callbacks,
                         optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                         preprocess_logits_for_metrics=preprocess_logits_for_metrics,
                         quantization_config=quantization_config, peft_config=peft_config,
                         formatting_func=formatting_func)
        self.padding_free = padding_free
        self._split_sums: dict[str, tuple[torch.Tensor, int]] = {}  # mode -> (on-device sums, micro-batches)
        self._fsdp2_units_gathered = False
        if padding_free:
            use_varlen_attention(self.model)
        if args.varlen_vision_attention:
            use_varlen_vision_attention(self.model)
        self._rope_module = rope_index_module(self.model) if padding_free else None
        distributed.check_regional_compilation(self.accelerator)
        distributed.setup_fsdp_wrapping(self.accelerator, self.model)
        policy = distributed.setup_fsdp_precision(self.accelerator, args.fsdp_autocast_precision)
        # accelerate autocasts the model's forward in every setup but FSDP2, where it applies only the policy
        self._forward_autocast_dtype = policy.param_dtype if policy is not None else None
        distributed.setup_zero3(self.accelerator, self.model, leaf_modules=args.zero3_leaf_modules)
        half = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        distributed.setup_deepspeed_autocast(self.accelerator, self.model, half, args.deepspeed_autocast)
        hooked = skip_frozen_vision_backward(self.model, args.projector_modules, args.skip_frozen_vision_backward)
        if hooked:
            logger.info("No backward through a frozen vision encoder: %s take detached inputs while it stays frozen.",
                        hooked)
        fuse = args.fuse_elementwise_ops
        if fuse or (fuse is None and self.args.device.type == "cuda"):
            fuse_elementwise_ops(self.model)
        if args.recompute_lora_dropout:
            recompute_lora_dropout(self.model)
        every_n = (args.gradient_checkpointing_kwargs or {}).get("every_n_layers", 1) \
            if isinstance(args.gradient_checkpointing_kwargs, dict) else 1
        self._auto_checkpointing = None
        if args.gradient_checkpointing and args.checkpoint_layers == "auto" and every_n == 1 \
                and self.args.device.type == "cuda":
            sharded = (self.is_deepspeed_enabled or self.is_fsdp_enabled) and self.args.world_size > 1
            self._auto_checkpointing = AutoLayerCheckpointing(
                self.model, args.checkpoint_memory_fraction, CudaMemory(self.args.device),
                agree=distributed.minimum_over_processes if sharded else None)
        self._data_wait = DataWaitMeter(args.data_wait_warning, on_accelerator=self.args.device.type != "cpu",
                                        workers=args.dataloader_num_workers)

    def train(self, *args, **kwargs):
        with distributed.fsdp2_block_policy(self.accelerator), self._fp32_masters():
            return super().train(*args, **kwargs)

    @contextlib.contextmanager
    def _fp32_masters(self):
        """`fp32_trainable_params`: fp32 masters of the trainable half-precision parameters while training, under
        bf16/fp16 mixed precision; FSDP (accelerate upcasts them) and DeepSpeed (its own masters) are left alone."""
        if not self.args.fp32_trainable_params or self.accelerator.mixed_precision not in ("bf16", "fp16") \
                or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            yield
            return
        with fp32_masters(self.model) as cast:
            if cast:
                logger.info("fp32_trainable_params: %d trainable half-precision parameters trained as float32 "
                            "(e.g. %s), cast back after training.", len(cast), cast[0])
            yield

    def _lora_input_cast_context(self):
        """Skip PEFT's fp32 upcast of LoRA inputs while autocast runs the LoRA matmuls in half precision anyway."""
        if self.args.cast_lora_inputs or self.accelerator.mixed_precision not in ("bf16", "fp16"):
            return contextlib.nullcontext()
        try:
            from peft.helpers import disable_input_dtype_casting
        except ImportError:
            return contextlib.nullcontext()
        return disable_input_dtype_casting(self.model)

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager:
        """`Trainer`'s autocast for the loss computation: under FSDP2 with `fsdp_autocast_precision`, `torch.autocast`
        in the policy's half precision, as accelerate applies it to the forward on one GPU and under DDP (float32 ops
        such as LayerNorm then see float32 inputs); otherwise `Trainer`'s (none: accelerate's)."""
        if self._forward_autocast_dtype is None:
            return super().autocast_smart_context_manager(cache_enabled)
        return torch.autocast(self.accelerator.device.type, dtype=self._forward_autocast_dtype,
                              cache_enabled=cache_enabled)

    def training_step(self, model, inputs, *args, **kwargs):
        if not self._fsdp2_units_gathered:  # FSDP2 with gradient accumulation: see gather_fsdp2_units_once
            self._fsdp2_units_gathered = True
            if distributed.gather_fsdp2_units_once(model):
                logger.info("FSDP2: every unit all-gathered once before the first backward")
        # The backward (and gradient checkpointing's recompute) runs inside, so both see the same forward. The range
        # names this phase in `--profile_steps` profiles (as `compute_loss`'s does).
        with record_function(f"{ANNOTATION}training_step"), self._lora_input_cast_context(), \
                self._checkpointing_context(inputs):
            return super().training_step(model, inputs, *args, **kwargs)

    def _checkpointing_context(self, inputs: dict[str, Any]):
        """`checkpoint_layers="auto"`: this micro-batch's layers to checkpoint, chosen from its token count."""
        ids = inputs.get("input_ids")
        if self._auto_checkpointing is None or ids is None:
            return contextlib.nullcontext()
        return self._auto_checkpointing.micro_batch(ids.numel())

    def prediction_step(self, *args, **kwargs):
        with self._lora_input_cast_context():
            return super().prediction_step(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        # transformers' only hook for the training sampler (private; contract in tests/test_contracts.py)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        strategy = self.args.train_sampling_strategy
        chunks = self.args.world_size * self.args.gradient_accumulation_steps
        balance = self.args.balance_micro_batches and self.padding_free and strategy == "random" and chunks > 1
        if not isinstance(dataset, Dataset) or not (strategy == "group_by_length" or balance):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.args.length_column_name in dataset.column_names:
            lengths, has_image = [int(x) for x in dataset[self.args.length_column_name]], None
        else:
            lengths, has_image = estimate_lengths(dataset, image_tokens=image_token_count(self.processing_class))
        if balance:
            return TokenBalancedSampler(lengths, self.args.per_device_train_batch_size, chunks, seed=seed)
        if has_image is None:  # the modality split only: a scan of the messages, without counting image tokens
            _, has_image = estimate_lengths(dataset, image_tokens=1)
        return ModalityLengthGroupedSampler(lengths, has_image, batch_size=self.args.per_device_train_batch_size,
                                            world_size=self.args.world_size, seed=seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        is_refusal = inputs.pop("is_refusal", None)
        if self.padding_free:
            inputs = mrope_packed_inputs(self._rope_module, inputs)
        captured: dict[str, Any] = {}

        def keep_output(module, args, kwargs, output):
            captured["out"] = output

        # TRL's loss forward (fused LM head: per-token `log_probs`, no logits) is read with a hook: asking
        # `compute_loss` for the outputs would run a second forward to rebuild the logits.
        handle = model.register_forward_hook(keep_output, with_kwargs=True)
        try:
            with record_function(f"{ANNOTATION}compute_loss"):
                result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        if is_refusal is not None and "out" in captured:
            rows = token_row_index(inputs, inputs["labels"].shape)
            self._log_split_loss(captured["out"], inputs["labels"], is_refusal, rows)
        return result

    def _log_split_loss(self, outputs: Any, labels: torch.Tensor, is_refusal: torch.Tensor,
                        token_rows: torch.Tensor | None) -> None:
        """Add this micro-batch's `split_loss_sums` to this process's running sums, on the device (no host sync).

        `log` sums them over the processes: pooled over every token since the last log (all processes, all
        accumulation steps), the same number however a global batch is split across processes and micro-batches, as
        the loss itself is. The micro-batches are counted to average the token counts over them.
        """
        stats = split_loss_sums(outputs, labels, is_refusal, token_rows).to(torch.float64)
        mode = "train" if self.model.training else "eval"
        sums, count = self._split_sums.get(mode, (0, 0))
        self._split_sums[mode] = (stats + sums, count + 1)

    def _pop_split_loss(self, mode: str) -> list[float] | None:
        """The sums `_log_split_loss` kept for `mode` since the last call, summed over the processes (a collective:
        `log` runs on every process), and this process's micro-batch count; None if there are none."""
        sums, count = self._split_sums.pop(mode, (None, 0))
        if sums is None:
            return None
        return [*self.accelerator.reduce(sums, reduction="sum").tolist(), count]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        start = time.perf_counter()
        batches = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._data_wait.record(start, time.perf_counter())
        return batches

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        measured = self._data_wait.pop() if mode == "train" and "loss" in logs else None
        if measured is not None:
            logs["data_wait_fraction"] = round(measured.fraction, 4)
            if warning := self._data_wait.warning(measured):
                logger.warning(warning)
        kept = self._auto_checkpointing.pop() if mode == "train" and "loss" in logs and self._auto_checkpointing \
            else None
        if kept is not None:
            logs["uncheckpointed_layers"] = round(kept, 2)
        sums = self._pop_split_loss(mode)
        if sums is not None:
            prefix = "eval_" if mode == "eval" else ""
            ref_nll, ref_n, norm_nll, norm_n, steps = sums
            if ref_n:
                logs[f"{prefix}loss_refusal"] = ref_nll / ref_n
            if norm_n:
                logs[f"{prefix}loss_normal"] = norm_nll / norm_n
            logs[f"{prefix}refusal_tokens"] = ref_n / steps
            logs[f"{prefix}normal_tokens"] = norm_n / steps
        super().log(logs, start_time)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """`Trainer.create_optimizer`; with `projector_lr`, the optimizer is created with each parameter group split
        in two, the projector's parameters getting `projector_lr`: the weight-decay groups of
        `get_decay_parameter_names`, or the groups that `optim` builds itself (`optim_target_modules` of GaLore /
        Apollo)."""
        if self.args.projector_lr is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        projector = projector_parameter_ids(opt_model, self.args.projector_modules)
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs = dict(kwargs)
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) \
                or {"model", "optimizer_dict"} & kwargs.keys():
            raise ValueError(f"projector_lr cannot be combined with optim={self.args.optim!r}: that optimizer "
                             "assigns the parameters itself (a factory, layer-wise or LOMO optimizer). Fix: leave "
                             "projector_lr unset, or use an optimizer such as adamw_torch.")
        if "params" in kwargs:  # parameter groups the optimizer handler built (optim_target_modules)
            groups = kwargs.pop("params")
        else:
            decay = set(self.get_decay_parameter_names(opt_model))
            params = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in params if n in decay], "weight_decay": self.args.weight_decay},
                      {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0}]
        self.optimizer = optimizer_cls(split_projector_groups(groups, projector, self.args.projector_lr), **kwargs)
        keep_embeddings_32bit(optimizer_cls, kwargs, opt_model)
        return super().create_optimizer(model)

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
import logging
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import AutoProcessor, ProcessorMixin
from trl import SFTTrainer

from . import batching, distributed
from .balance import TokenBalancedSampler
from .collator import IGNORE_INDEX, RejectionDataCollator
from .config import RejectionSFTConfig
from .spans import message_text


logger = logging.getLogger(__name__)


def _check_dataset(ds: Dataset | IterableDataset, name: str, refusal_sentences: list[str]) -> None:
    columns = ds.column_names or list(next(iter(ds)).keys())
    if "messages" not in columns:
        raise ValueError(f"The {name} dataset has columns {columns} but RejectionSFTTrainer needs a `messages` column "
                         "(TRL conversational format) and optionally `images` and `is_refusal`. Fix: build it with "
                         "`trl-rejection mix` / `trl_rejection.data.build_mix`, or rename your conversation column.")
    if "is_refusal" in columns or not isinstance(ds, Dataset):
        return
    wanted = {s.strip() for s in refusal_sentences}
    for messages in ds["messages"]:
        replies = [m for m in messages if m["role"] == "assistant"]
        if replies and message_text(replies[-1]).strip() in wanted:
            return
    raise ValueError(f"No row of the {name} dataset ends with one of the refusal sentences {sorted(wanted)} and it "
                     "has no `is_refusal` column, so there is nothing to learn a refusal from. Fix: set "
                     "`refusal_sentences` in RejectionSFTConfig to the sentences your data uses, or add `is_refusal`.")


def _drop_empty_images(ds: Any, name: str) -> Any:
    """A text-only model may train on a mix whose `images` lists are all empty; image rows are an error."""
    if not isinstance(ds, Dataset) or "images" not in ds.column_names:
        return ds
    for i, images in enumerate(ds.with_format("arrow")["images"].to_pylist()):
        if images:
            rid = ds[i].get("id", i)
            raise ValueError(f"Row {rid!r} of the {name} dataset has {len(images)} image(s) but the model is not a "
                             "vision-language model (its processing class is a tokenizer). Fix: use a VLM and its "
                             "processor, or filter out image rows.")
    return ds.remove_columns("images")


class RejectionSFTTrainer(SFTTrainer):
    """`SFTTrainer` for refusal-swap safety alignment of VLMs (and text-only chat models).

    Differences from `SFTTrainer`, all driven by [`RejectionSFTConfig`]:

    - the default collator is [`RejectionDataCollator`]: normal rows are supervised on every assistant reply and its
      end-of-turn token; refusal rows only on the leading refusal tokens, never on their end-of-turn/EOS token;
    - logs `loss_refusal`, `loss_normal`, `refusal_tokens` and `normal_tokens` beside the usual loss;
    - puts the projector's parameters in their own optimizer group when `projector_lr` is set;
    - `padding_free` batches for vision-language models with SDPA (rows concatenated, attention kept within rows by
      the `"sdpa_varlen"` attention), and `train_sampling_strategy="group_by_length"` with modality-aware lengths
      estimated without tokenizing (see `trl_rejection.batching`).

    Everything else (LoRA / QLoRA via `peft_config`, gradient checkpointing, `report_to`, checkpoints and
    `resume_from_checkpoint`, `push_to_hub`) is `SFTTrainer`'s.
    """

    _tag_names = ["trl", "sft", "trl-rejection", "safety-alignment"]

    def __init__(self, model: Any, args: RejectionSFTConfig | None = None, data_collator: Any = None,
                 train_dataset: Dataset | IterableDataset | None = None, eval_dataset: Any = None,
                 processing_class: Any = None, **kwargs: Any):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path or "model"
            args = RejectionSFTConfig(f"{name.split('/')[-1]}-rejection")
        elif not isinstance(args, RejectionSFTConfig):
            raise TypeError(f"args must be a RejectionSFTConfig, got {type(args).__name__}.")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required.")
        if processing_class is None:
            model_id = model if isinstance(model, str) else model.config._name_or_path
            processing_class = AutoProcessor.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset} if eval_dataset else {}
        _check_dataset(train_dataset, "train", args.refusal_sentences)
        for key, ds in evals.items():
            _check_dataset(ds, key, args.refusal_sentences)
        if not isinstance(processing_class, ProcessorMixin):
            train_dataset = _drop_empty_images(train_dataset, "train")
            evals = {k: _drop_empty_images(v, k) for k, v in evals.items()}
            if eval_dataset is not None:
                eval_dataset = evals if isinstance(eval_dataset, dict) else evals["eval"]
        if data_collator is None:
            data_collator = RejectionDataCollator(
                processing_class, refusal_sentences=list(args.refusal_sentences),
                refusal_label_tokens=args.refusal_label_tokens, mask_refusal_eos=args.mask_refusal_eos,
                max_length=args.max_length, truncation=args.truncation_policy,
                add_eos_when_missing=args.add_eos_when_missing, pad_to_multiple_of=args.pad_to_multiple_of)
        # TRL's own padding-free refuses vision data and custom collators: ours is done by our collator, so TRL must
        # not see the flag while it sets up.
        padding_free, args.padding_free = args.padding_free, False
        try:
            super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        finally:
            args.padding_free = padding_free
        self._split_sums: dict[str, list[float]] = {}
        self.padding_free = padding_free and self._setup_padding_free()
        distributed.setup_fsdp_wrapping(self.accelerator, self.model)
        distributed.setup_zero3(self.accelerator, self.model, leaf_modules=args.zero3_leaf_modules)
        fuse = args.fuse_elementwise_ops
        if fuse or (fuse is None and self.args.device.type == "cuda"):
            batching.fuse_elementwise_ops(self.model)

    def train(self, *args, **kwargs):
        with distributed.fsdp2_block_policy(self.accelerator):
            return super().train(*args, **kwargs)

    def _setup_padding_free(self) -> bool:
        """Turn on our collator's padding-free batches if the model can keep packed rows apart."""
        if not isinstance(self.data_collator, RejectionDataCollator):
            logger.warning("padding_free=True is ignored: it needs the default RejectionDataCollator.")
            return False
        supported, why = batching.padding_free_supported(self.model.config)
        if not supported:
            logger.warning("padding_free=True is ignored for this model (%s): training on padded batches.", why)
            return False
        batching.use_varlen_attention(self.model)
        self.data_collator.padding_free = True
        self._rope_module = batching.rope_index_module(self.model)
        return True

    def _lora_input_cast_context(self):
        """Skip PEFT's fp32 upcast of LoRA inputs while autocast runs the LoRA matmuls in half precision anyway."""
        if self.args.cast_lora_inputs or self.accelerator.mixed_precision not in ("bf16", "fp16"):
            return contextlib.nullcontext()
        try:
            from peft.helpers import disable_input_dtype_casting
        except ImportError:
            return contextlib.nullcontext()
        return disable_input_dtype_casting(self.model)

    def training_step(self, *args, **kwargs):
        # The backward (and gradient checkpointing's recompute) runs inside, so both see the same forward.
        with self._lora_input_cast_context():
            return super().training_step(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        with self._lora_input_cast_context():
            return super().prediction_step(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        strategy = self.args.train_sampling_strategy
        balance = self.args.balance_micro_batches and self.padding_free and strategy == "random"
        chunks = self.args.world_size * self.args.gradient_accumulation_steps
        if not isinstance(dataset, Dataset) or not (strategy == "group_by_length" or (balance and chunks > 1)):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.args.length_column_name in dataset.column_names:
            lengths = [int(x) for x in dataset[self.args.length_column_name]]
            _, has_image = batching.estimate_lengths(dataset, image_tokens=1)
        else:
            image_tokens = batching.image_token_count(self.processing_class)
            lengths, has_image = batching.estimate_lengths(dataset, image_tokens=image_tokens)
        if strategy != "group_by_length":
            return TokenBalancedSampler(lengths, self.args.per_device_train_batch_size, chunks, seed=seed)
        return batching.ModalityLengthGroupedSampler(
            lengths, has_image, batch_size=self.args.per_device_train_batch_size,
            world_size=self.args.world_size, seed=seed)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["messages", "images", "image", "is_refusal", "id"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        is_refusal = inputs.pop("is_refusal", None)
        if self.padding_free:
            inputs = batching.mrope_packed_inputs(self._rope_module, inputs)
        captured: dict[str, Any] = {}

        def keep_output(module, args, kwargs, output):
            captured["out"] = output

        handle = model.register_forward_hook(keep_output, with_kwargs=True)
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            handle.remove()
        if is_refusal is not None and "out" in captured:
            rows = batching.token_row_index(inputs, inputs["labels"].shape)
            self._log_split_loss(captured["out"], inputs["labels"], is_refusal, rows)
        return result

    @torch.no_grad()
    def _log_split_loss(self, outputs: Any, labels: torch.Tensor, is_refusal: torch.Tensor,
                        token_rows: torch.Tensor | None = None) -> None:
        """Loss and labelled-token counts of refusal rows and normal rows, kept apart.

        `token_rows` maps each token of a padding-free batch to its row; None for padded batches.
        """
        targets = labels[:, 1:]
        labelled = targets != IGNORE_INDEX
        log_probs = getattr(outputs, "log_probs", None)
        if log_probs is None:  # a forward that returned full logits
            logits = outputs.logits[:, :-1].float()
            log_probs = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = -log_probs.float() * labelled
        is_refusal = is_refusal.to(labelled.device)
        if token_rows is None:
            rows = is_refusal[:, None]
        else:  # tokens of a `pad_to_multiple_of` tail (never labelled) count as the last row's
            rows = is_refusal[token_rows.to(labelled.device)[:, 1:].clamp(max=is_refusal.numel() - 1)]
        mode = "train" if self.model.training else "eval"
        stats = torch.stack([(nll * rows).sum(), (labelled & rows).sum(), (nll * ~rows).sum(), (labelled & ~rows).sum()])
        ref_nll, ref_n, norm_nll, norm_n = self.accelerator.gather_for_metrics(stats[None]).sum(0).tolist()
        self._metrics[mode]["refusal_tokens"].append(ref_n)
        self._metrics[mode]["normal_tokens"].append(norm_n)
        # Pooled over every token since the last log (all processes, all accumulation steps): the same number
        # however a global batch is split across processes and micro-batches, as the loss itself is.
        sums = self._split_sums.setdefault(mode, [0.0, 0.0, 0.0, 0.0])
        for i, x in enumerate((ref_nll, ref_n, norm_nll, norm_n)):
            sums[i] += x

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        sums = getattr(self, "_split_sums", {}).pop(mode, None)
        if sums is not None:
            prefix = "eval_" if mode == "eval" else ""
            ref_nll, ref_n, norm_nll, norm_n = sums
            if ref_n:
                logs[f"{prefix}loss_refusal"] = ref_nll / ref_n
            if norm_n:
                logs[f"{prefix}loss_normal"] = norm_nll / norm_n
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        lr = self.args.projector_lr
        if lr is None:
            return optimizer
        opt_model = self.model if model is None else model
        projector = {id(p) for n, p in opt_model.named_parameters()
                     if p.requires_grad and any(f in n for f in self.args.projector_modules)}
        if not projector:
            raise ValueError(f"projector_lr is set but no trainable parameter name contains any of "
                             f"{self.args.projector_modules}. Fix: with LoRA, add the projector to `modules_to_save` "
                             "(e.g. ['multi_modal_projector']), or set `projector_modules` to its name.")
        groups = []
        for group in optimizer.param_groups:
            rest = [p for p in group["params"] if id(p) not in projector]
            own = [p for p in group["params"] if id(p) in projector]
            groups += [{**group, "params": rest}] if rest else []
            groups += [{**group, "params": own, "lr": lr}] if own else []
        optimizer.param_groups.clear()  # no step was taken yet: regroup in place
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

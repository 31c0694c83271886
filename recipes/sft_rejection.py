"""Refusal-swap safety fine-tuning, end to end: build the mix, train with LoRA, save, evaluate, publish.

    accelerate launch recipes/sft_rejection.py                                   # the embedded default (tiny.yaml)
    accelerate launch recipes/sft_rejection.py --config recipes/configs/llava-1.5-7b.yaml
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml recipes/sft_rejection.py \
        --config recipes/configs/llava-1.5-7b.yaml --per_device_train_batch_size 8

Every option is a YAML key of `--config` and a flag overriding it: this script's own (below), every
`RejectionSFTConfig` / `TrainingArguments` field, and TRL's `ModelConfig` (model, dtype, attention, LoRA, 4-bit).
The `mix:` block of the YAML holds `MixConfig` fields (sources, counts, seed) unless `--dataset_path` points at a
prepared mix. With no `--config`, `recipes/configs/tiny.yaml` runs: a tiny random LLaVA on the bundled sample data,
on CPU, in about a minute.
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from accelerate import PartialState
from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_rejection import RejectionSFTConfig, RejectionSFTTrainer
from trl_rejection.callbacks import RecordingCollator, StepMetrics, StepProfiler, parse_step_range
from trl_rejection.constants import TINY_MODEL
from trl_rejection.data import MixConfig, build_mix
from trl_rejection.data.formats import load_dataset_location
from trl_rejection.distributed import (build_once, end_process_group, full_model_on_main, sharded_backend,
                                      without_zero3)
from trl_rejection.errors import UserError, user_errors
from trl_rejection.extras import check_extras
from trl_rejection.hub import push_dataset, push_model
from trl_rejection.io import check_work_dir
from trl_rejection.model_card import model_card
from trl_rejection.parsing import StrictTrlParser
from trl_rejection.validation import ConfigError, check_dataclass, check_range, from_mapping, json_mapping

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"


@dataclass
class ScriptArguments:
    """What to train on, and what to do after training."""

    dataset_path: str | None = field(default=None, metadata={
        "help": "A prepared mix (save_to_disk folder or Hub id); unset: build one from the `mix` block."})
    mix: dict | str | None = field(default=None, metadata={
        "help": "MixConfig fields (YAML block, or a JSON string on the command line)."})
    eval_bundled: bool = field(default=False, metadata={
        "help": "After training, score the model on the bundled typographic safety set."})
    eval_max_new_tokens: int = field(default=64, metadata={"help": "Generation length for that evaluation."})
    merge_adapter: bool = field(default=False, metadata={"help": "Save (and push) the merged model, not the adapter."})
    push_dataset_to_hub: str | None = field(default=None, metadata={"help": "Hub dataset repo for the built mix."})
    record_data_order: bool = field(default=False, metadata={
        "help": "Append the ids of every collated batch to <output_dir>/data_order_rank<N>.jsonl."})
    mix_build: Literal["once", "per_node"] = field(default="once", metadata={
        "help": "Where the mix (and the tiny model's init checkpoint) is built: `once` on the global main process, "
                "every other process of every node waiting until it is written, then reading it from `output_dir` "
                "(nodes must share that disk); `per_node` on each node's local main process into its own "
                "`output_dir` (nodes without a shared disk; the build is deterministic, so every copy is the same)."})
    metrics_file: str | None = field(default=None, metadata={
        "help": "Append one JSON line per logged step (loss, split losses, seconds since the start of training "
                "after a device sync, input tokens seen by all processes, peak GPU GiB of each process)."})
    profile_steps: str | None = field(default=None, metadata={
        "help": "Profile these optimizer steps (`first-last`, e.g. `5-7`) with torch.profiler in every process: "
                "<output_dir>/profile/rank<N>.txt (top operators by GPU and CPU time) and rank<N>.json (seconds a "
                "step, the share of it the GPU ran kernels, top kernels)."})

    def __post_init__(self) -> None:
        check_dataclass(self)
        check_range(self, "eval_max_new_tokens", lambda v: v >= 1, "a number of tokens >= 1")
        if self.profile_steps is not None:
            try:
                parse_step_range(self.profile_steps)
            except ValueError as e:
                raise ConfigError("profile_steps", str(e), "give first-last optimizer steps, e.g. 5-7") from None


def load_model(model_args: ModelConfig, training_args: RejectionSFTConfig, mix_build: str = "once"):
    """The tiny random LLaVA for dry runs, or the real model id (loaded by the trainer) and its processor.

    Under ZeRO-3 or FSDP the tiny model is built once, saved with `save_pretrained` to `<output_dir>/tiny-llava-init`
    and loaded from there by the trainer (`from_pretrained`), as a real checkpoint is: ZeRO-3 then partitions it
    while loading, and FSDP loads it as it loads any checkpoint."""
    if model_args.model_name_or_path in (None, TINY_MODEL):
        from trl_rejection.testing.tiny import make_model, make_processor

        processor = make_processor("llava-1.5")
        if sharded_backend() is None:
            return make_model("llava-1.5", processor), processor  # a fixed base, as eval_safety.py builds it
        init_dir = Path(training_args.output_dir) / "tiny-llava-init"
        with build_once(training_args, mix_build, "building the tiny model") as builder:
            if builder:
                with without_zero3():
                    make_model("llava-1.5", processor).save_pretrained(init_dir)
                processor.save_pretrained(init_dir)
        training_args.model_init_kwargs = {"dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
        return str(init_dir), processor
    from transformers import AutoProcessor

    check_extras(model_args.attn_implementation, model_args.load_in_4bit or model_args.load_in_8bit)
    training_args.model_init_kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype,
                                       "attn_implementation": model_args.attn_implementation,
                                       **(training_args.model_init_kwargs or {})}
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    return model_args.model_name_or_path, processor


def lora_config(model_args: ModelConfig):
    """TRL's `get_peft_config`, except that a single regex in `lora_target_modules` is used as a regex (e.g. the
    language model's linear layers only), not as a module name."""
    peft_config = get_peft_config(model_args)
    if peft_config is not None and isinstance(peft_config.target_modules, (list, set)) \
            and len(peft_config.target_modules) == 1 and ".*" in next(iter(peft_config.target_modules)):
        peft_config.target_modules = next(iter(peft_config.target_modules))
    return peft_config


def mix_config(script_args: ScriptArguments) -> MixConfig:
    """The `mix:` block (or `--mix` JSON) as a checked `MixConfig`, its counts included."""
    cfg = from_mapping(MixConfig, json_mapping("mix", script_args.mix, "MixConfig fields") or {}, "mix")
    cfg.counts()
    return cfg


def check_run_paths(script_args: ScriptArguments, training_args: RejectionSFTConfig,
                    model_args: ModelConfig) -> MixConfig | None:
    """Before any model is built: the output folder is one the recipe may write into (see `check_work_dir`), the
    measurement files and the checkpoint to resume are usable (`check_fresh_records`), and the mix block is complete
    and well typed. Returns the checked mix block (None with `--dataset_path`)."""
    inputs = [script_args.dataset_path, model_args.model_name_or_path]
    cfg = None if script_args.dataset_path else mix_config(script_args)
    if cfg is not None:
        inputs += [cfg.refusal_source, cfg.normal_source, cfg.refusal_image_root, cfg.normal_image_root]
    check_work_dir(training_args.output_dir, inputs=inputs, what="training run")
    check_fresh_records(script_args, training_args)
    return cfg


def check_fresh_records(script_args: ScriptArguments, training_args: RejectionSFTConfig) -> None:
    """`--resume_from_checkpoint` names a checkpoint folder, and `--metrics_file` is a file in an existing folder. Both
    record files append, so that a run resumed from its last checkpoint continues its records (one resumed from an
    earlier checkpoint appends those steps again); a run that does not resume refuses records an earlier run left
    there, which its own would silently be pooled with. Nothing is written or removed."""
    resume, metrics = training_args.resume_from_checkpoint, script_args.metrics_file
    if resume is not None and not os.path.isdir(resume):
        raise UserError(f"--resume_from_checkpoint {resume!r} is not a folder. Fix: give a checkpoint folder of an "
                        "earlier run, e.g. <output_dir>/checkpoint-500, or leave it out to start a new run")
    if metrics and (os.path.isdir(metrics) or not os.path.isdir(os.path.dirname(os.path.abspath(metrics)))):
        raise UserError(f"--metrics_file {metrics} is a folder or lies in a folder that does not exist. Fix: give a "
                        "file path in an existing folder")
    if resume is not None:
        return
    if metrics and os.path.isfile(metrics) and os.path.getsize(metrics):
        raise UserError(f"--metrics_file {metrics} already holds records of an earlier run, and this run (not a "
                        "resume) would append its own to them. Fix: pass another --metrics_file, move that file "
                        "away, or resume that run with --resume_from_checkpoint")
    orders = sorted(map(str, Path(training_args.output_dir).glob("data_order_rank*.jsonl"))) \
        if script_args.record_data_order else []
    if orders:
        raise UserError(f"{', '.join(orders)}: the data order of an earlier run in this output_dir, which this run "
                        "(not a resume) would append its own to. Fix: pass another --output_dir, move those files "
                        "away, or resume that run with --resume_from_checkpoint")


def load_mix(script_args: ScriptArguments, training_args: RejectionSFTConfig, cfg: MixConfig | None):
    """The prepared dataset, or the mix of `cfg` built where `mix_build` says (once, or once per node); every other process
    waits at a barrier until it is written (the builder writes to a temporary folder and renames it), then reads it.
    """
    import datasets

    if script_args.dataset_path:
        return load_dataset_location(script_args.dataset_path, file_fix="build a mix from it first (`trl-rejection "
                                     "mix`, or the `mix:` block) and pass its folder"), script_args.dataset_path
    mix_dir = Path(training_args.output_dir) / "mix"
    with build_once(training_args, script_args.mix_build, "building the mix") as builder:
        if builder:
            build_mix(cfg, mix_dir, overwrite=True, command=" ".join(sys.argv))
        if not mix_dir.is_dir():
            raise UserError(
                f"Process {training_args.process_index} cannot see the mix built at {mix_dir} by the main process. "
                "Fix: put `output_dir` on a disk every node shares, or pass `--mix_build per_node` so that each "
                "node builds its own copy, or build it beforehand (`trl-rejection mix`) and pass `--dataset_path`.")
        return datasets.load_from_disk(str(mix_dir)), str(mix_dir)


def evaluate_bundled(trainer, processor, output_dir: Path, max_new_tokens: int) -> str:
    """Generate on the bundled typographic set with the trained model; return the Markdown report."""
    from trl_rejection.eval.benchmarks import load_benchmark
    from trl_rejection.eval.generate import generate
    from trl_rejection.eval.report import markdown_table, report_run

    run_dir = output_dir / "eval_bundled"
    # generations of an earlier training run into this output_dir belong to another model: never resume from them
    (run_dir / "generations.jsonl").unlink(missing_ok=True)
    records = load_benchmark("bundled", run_dir / "bundled")
    generate(trainer.model.eval(), processor, records, run_dir / "generations.jsonl", max_new_tokens=max_new_tokens)
    return markdown_table(report_run(run_dir))


def main(script_args: ScriptArguments, training_args: RejectionSFTConfig, model_args: ModelConfig) -> None:
    push_model_to = (training_args.hub_model_id or Path(training_args.output_dir).name) \
        if training_args.push_to_hub else None
    training_args.push_to_hub = False  # push once at the end, with this project's model card
    if script_args.metrics_file and training_args.include_num_input_tokens_seen in ("no", False, None):
        training_args.include_num_input_tokens_seen = "non_padding"
    mix = check_run_paths(script_args, training_args, model_args)
    PartialState().wait_for_everyone()  # every process checked before any writes a record (`check_fresh_records`)
    model, processor = load_model(model_args, training_args, script_args.mix_build)
    dataset, mix_location = load_mix(script_args, training_args, mix)
    peft_config = lora_config(model_args)
    metrics = StepMetrics(Path(script_args.metrics_file)) if script_args.metrics_file else None
    callbacks = [metrics] if metrics else []
    if script_args.profile_steps:
        callbacks.append(StepProfiler(*parse_step_range(script_args.profile_steps),
                                      Path(training_args.output_dir) / "profile", training_args.process_index))
    trainer = RejectionSFTTrainer(model, args=training_args, train_dataset=dataset, processing_class=processor,
                                  peft_config=peft_config, quantization_config=get_quantization_config(model_args),
                                  callbacks=callbacks or None)
    if metrics:
        metrics.trainer = trainer
    output_dir = Path(training_args.output_dir)
    if script_args.record_data_order:
        trainer.data_collator = RecordingCollator(
            trainer.data_collator, output_dir / f"data_order_rank{training_args.process_index}.jsonl")
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finally:
        for callback in callbacks:
            if isinstance(callback, StepProfiler):
                callback.close()  # a run that stopped inside the profiled steps
    trainer.save_state()  # <output_dir>/trainer_state.json: the whole log history (split losses), tokens seen

    final = output_dir / "final"
    sharded = sharded_backend()
    base = model if isinstance(model, str) else None
    full_model = None  # under ZeRO-3 / FSDP: the trained model, whole, on the main process
    if script_args.merge_adapter and peft_config is not None and not sharded:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(final)
    elif script_args.merge_adapter and peft_config is not None:
        adapter_dir = output_dir / "adapter"
        trainer.save_model(str(adapter_dir))  # every process: the trainer gathers the sharded adapter
        if trainer.accelerator.is_main_process:
            full_model = full_model_on_main(trainer, base, adapter_dir, model_args.dtype)
            full_model.save_pretrained(final)
    else:
        trainer.save_model(str(final))
    if not trainer.accelerator.is_main_process:
        return
    processor.save_pretrained(final)
    if script_args.eval_bundled and sharded and full_model is None:
        full_model = full_model_on_main(trainer, base, final, model_args.dtype) if peft_config is not None \
            else type(trainer.accelerator.unwrap_model(trainer.model)).from_pretrained(final)
    if full_model is not None:  # generation needs the whole model on one process, not shards
        trainer.model = full_model.to(trainer.args.device)
    results = evaluate_bundled(trainer, processor, output_dir, script_args.eval_max_new_tokens) \
        if script_args.eval_bundled else None
    base = model_args.model_name_or_path or TINY_MODEL
    (final / "README.md").write_text(model_card(base, mix_location, training_args, model_args, results))
    if push_model_to:
        print(f"Model pushed to {push_model(final, push_model_to, training_args.hub_private_repo)}")
    if script_args.push_dataset_to_hub:
        print(f"Mix pushed to {push_dataset(mix_location, script_args.push_dataset_to_hub)}")
    summary(trainer, final, mix_location, results, base == TINY_MODEL)


def summary(trainer, final: Path, mix_location: str, results: str | None, tiny: bool) -> None:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if logs:
        first, last = logs[0], logs[-1]
        print(f"\n| | step {first['step']} | step {last['step']} |\n|---|---|---|")
        for key in ("loss", "loss_refusal", "loss_normal"):
            if key in first and key in last:
                print(f"| {key} | {first[key]:.4f} | {last[key]:.4f} |")
    print(f"\nOptimizer steps: {trainer.state.global_step}. Mix: {mix_location}. Model and card: {final}.")
    if results:
        print("\nSafety on the bundled typographic set:\n" + results)
    if tiny:
        print("\nNote: this was a tiny random-weight model. It shows the pipeline works end to end (data, labels, "
              "training, saving, evaluation); it does not make any model safe. Use a real config for that.")


if __name__ == "__main__":
    parser = StrictTrlParser((ScriptArguments, RejectionSFTConfig, ModelConfig), nested={"mix": MixConfig})
    argv = sys.argv[1:] if "--config" in sys.argv else ["--config", str(DEFAULT_CONFIG), *sys.argv[1:]]
    with user_errors():
        main(*parser.parse_args_and_config(argv))
    end_process_group()

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

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, get_peft_config, get_quantization_config

from trl_rejection import RejectionSFTConfig, RejectionSFTTrainer
from trl_rejection.data import MixConfig, build_mix
from trl_rejection.errors import user_errors
from trl_rejection.hub import check_extras, model_card, push_dataset, push_model
from trl_rejection.parsing import StrictTrlParser

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny.yaml"
TINY = "tiny-llava"


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


class RecordingCollator:
    """Wraps a collator and appends each batch's row ids to a file (debugging data order and sharding)."""

    def __init__(self, collator, path: Path):
        self.collator, self.path = collator, path

    def __call__(self, examples):
        with open(self.path, "a") as f:
            f.write(json.dumps([ex.get("id") for ex in examples]) + "\n")
        return self.collator(examples)


def load_model(model_args: ModelConfig, training_args: RejectionSFTConfig):
    """The tiny random LLaVA for dry runs, or the real model id (loaded by the trainer) and its processor."""
    if model_args.model_name_or_path in (None, TINY):
        from trl_rejection.tiny import make_model, make_processor

        processor = make_processor("llava-1.5")
        return make_model("llava-1.5", processor, seed=training_args.seed), processor
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


def load_mix(script_args: ScriptArguments, training_args: RejectionSFTConfig):
    """The prepared dataset, or the mix built on the main process (others wait, then read it)."""
    import datasets

    if script_args.dataset_path:
        if Path(script_args.dataset_path).is_dir():
            return datasets.load_from_disk(script_args.dataset_path), script_args.dataset_path
        return datasets.load_dataset(script_args.dataset_path, split="train"), script_args.dataset_path
    mix = json.loads(script_args.mix) if isinstance(script_args.mix, str) else dict(script_args.mix or {})
    mix_dir = Path(training_args.output_dir) / "mix"
    with training_args.main_process_first(desc="building the mix"):
        if training_args.process_index == 0:
            build_mix(MixConfig(**mix), mix_dir, overwrite=True, command=" ".join(sys.argv))
        return datasets.load_from_disk(str(mix_dir)), str(mix_dir)


def evaluate_bundled(trainer, processor, output_dir: Path, max_new_tokens: int) -> str:
    """Generate on the bundled typographic set with the trained model; return the Markdown report."""
    from trl_rejection.eval.benchmarks import load_benchmark
    from trl_rejection.eval.generate import generate
    from trl_rejection.eval.report import markdown_table, report_run

    run_dir = output_dir / "eval_bundled"
    records = load_benchmark("bundled", run_dir / "bundled")
    generate(trainer.model.eval(), processor, records, run_dir / "generations.jsonl", max_new_tokens=max_new_tokens)
    return markdown_table(report_run(run_dir))


def main(script_args: ScriptArguments, training_args: RejectionSFTConfig, model_args: ModelConfig) -> None:
    push_model_to = (training_args.hub_model_id or Path(training_args.output_dir).name) \
        if training_args.push_to_hub else None
    training_args.push_to_hub = False  # push once at the end, with this project's model card
    model, processor = load_model(model_args, training_args)
    dataset, mix_location = load_mix(script_args, training_args)
    peft_config = lora_config(model_args)
    trainer = RejectionSFTTrainer(model, args=training_args, train_dataset=dataset, processing_class=processor,
                                  peft_config=peft_config, quantization_config=get_quantization_config(model_args))
    output_dir = Path(training_args.output_dir)
    if script_args.record_data_order:
        trainer.data_collator = RecordingCollator(
            trainer.data_collator, output_dir / f"data_order_rank{training_args.process_index}.jsonl")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    final = output_dir / "final"
    if script_args.merge_adapter and peft_config is not None:
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(final)
    else:
        trainer.save_model(str(final))
    if not trainer.accelerator.is_main_process:
        return
    processor.save_pretrained(final)
    results = evaluate_bundled(trainer, processor, output_dir, script_args.eval_max_new_tokens) \
        if script_args.eval_bundled else None
    base = model_args.model_name_or_path or TINY
    (final / "README.md").write_text(model_card(base, mix_location, training_args, model_args, results))
    if push_model_to:
        print(f"Model pushed to {push_model(final, push_model_to, training_args.hub_private_repo)}")
    if script_args.push_dataset_to_hub:
        print(f"Mix pushed to {push_dataset(mix_location, script_args.push_dataset_to_hub)}")
    summary(trainer, final, mix_location, results, base == TINY)


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

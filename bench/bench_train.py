"""Training throughput on a LLaVA-1.5-7B-shaped model: stock TRL `SFTTrainer` vs `RejectionSFTTrainer` (and levers).

The model is LLaVA-1.5-7B's exact shape (CLIP ViT-L/14-336 vision tower, 2-layer GELU projector, Llama-2-7B language
model, vocabulary 32064), built from config classes with random bf16 weights on the GPU (nothing is downloaded).
LoRA r=128, alpha=256 on the language model's linear layers, the projector trained (`modules_to_save`), the vision
tower frozen, gradient checkpointing, SDPA, bf16. Data: synthetic rows shaped like the LLaVA/refusal mix (one JPEG
image per row -> 576 image tokens at 336 px, text lengths log-normal around 120 tokens, 2/7 refusal rows), processed
on the fly by each trainer's own collator with a CLIP image processor at 336 px and the llava-hf chat template.

Every variant trains on the same rows with the same arguments; only the trainer / lever differs. Each variant runs in a
fresh process of its own (run after another in one process, a variant's peak memory included what the previous one
still held: 28.9 vs 24.8 GiB for the defaults), and a name may be repeated to measure run-to-run spread. Prints one
JSON line per variant (and appends it to $OUT/bench_train.jsonl): real (non-padding) tokens/s, samples/s, step time,
padding, peak GPU memory, and model TFLOP/s counted as 6 x 6.74e9 x real tokens (Llama-2-7B parameters; the frozen
vision tower, attention scores and LoRA matmuls are not counted); then a Markdown table of the training variants.

Variants (VARIANTS, comma-separated):
    stock          trl.SFTTrainer, its own DataCollatorForVisionLanguageModeling
    ours           RejectionSFTTrainer with its defaults: padding_free=True, cast_lora_inputs=False,
                   fuse_elementwise_ops on (CUDA), checkpoint_layers="auto", recompute_lora_dropout=True, random
                   order, the same LoRA config as stock
    ours_<levers>  the defaults with levers changed, "_"-joined, e.g. ours_nofuse_padded:
                     nofuse / fused   fuse_elementwise_ops=False / True
                     padded           padding_free=False (padded batches, random order)
                     grouped          padding_free=False, train_sampling_strategy="group_by_length"
                     upcast           cast_lora_inputs=True (PEFT's fp32 upcast of every LoRA input)
                     loop             padding-free attention as one SDPA call per row, not the varlen flash kernel
                     drop0            LoRA dropout 0 (otherwise LORA_DROPOUT, default 0.05, as for stock)
                     w0               dataloader_num_workers=0
                     nockpt           gradient_checkpointing=False (every activation kept)
                     ckptall          checkpoint_layers="all" (every trainable layer checkpointed; default "auto":
                                      as many layers kept as the measured memory allows, `uncheckpointed_layers` in
                                      the JSON line per step)
                     keepdrop         recompute_lora_dropout=False (PEFT's dropout keeps its dropped input + mask)
                     mem<NN>          checkpoint_memory_fraction=NN/100 (default 0.85)
                     ckpt<N>          gradient_checkpointing_kwargs={"every_n_layers": N} (transformers: only every
                                      N-th block, vision and language layers counted together, recomputes)
    check          no training: loss + hidden states of one fixed batch, padded vs padding-free (bf16 on the GPU),
                   each also against an fp32 run of the padded batch (the bf16 noise floor)
    collate        no model: collator samples/s in this process (one worker), ours vs stock

Environment knobs: BS (16), STEPS (14, of which WARM=3 untimed), WORKERS (8), LORA_DROPOUT (0.05), VARIANTS,
PROFILE ("6-7": torch.profiler over those steps, tables in $OUT/profile-<MODEL>-<variant>/; skews tokens/s),
SMALL=1 (tiny model on CPU: a dry run of the harness), OUT (folder for results, default /tmp), ROWS_SEED (0),
MODEL ("llava-1.5", "qwen2.5-vl", "qwen3-vl", "gemma3", "gemma3-12b": the shapes, image sizes, trained projectors and
parameter counts are in bench/model_shapes.py).

Example:
    BS=16 STEPS=14 VARIANTS=check,stock,ours,ours_nofuse,ours_nofuse_padded python bench/bench_train.py
    BS=16 VARIANTS=ours,stock,ours,stock python bench/bench_train.py  # alternating repeats; table shows medians
    SMALL=1 BS=4 STEPS=4 WARM=1 WORKERS=0 VARIANTS=check,stock,ours,ours_nofuse_grouped,collate \
        python bench/bench_train.py  # CPU dry run
    MODEL=qwen3-vl BS=16 VARIANTS=check,stock,ours,ours_padded python bench/bench_train.py  # Qwen3-VL-8B's shape
    MODEL=gemma3 BS=16 VARIANTS=check,stock,ours,ours_padded python bench/bench_train.py  # Gemma-3-4B-it's shape
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402
from model_shapes import (CUDA, LORA_TARGETS, MODEL, N_LM, PROJECTOR, SMALL, build_model, build_rows,  # noqa: E402
                          processor)

BS = int(os.environ.get("BS", "16"))
STEPS = int(os.environ.get("STEPS", "14"))
WARM = int(os.environ.get("WARM", "3"))
WORKERS = int(os.environ.get("WORKERS", "8"))
LORA_DROPOUT = float(os.environ.get("LORA_DROPOUT", "0.05"))
VARIANTS = os.environ.get("VARIANTS", "check,stock,ours").split(",")
OUT = os.environ.get("OUT", "/tmp")
PROFILE = os.environ.get("PROFILE")


def log(**record):
    line = json.dumps(record)
    print(line, flush=True)
    with open(os.path.join(OUT, "bench_train.jsonl"), "a") as f:
        f.write(line + "\n")


class Meter(transformers.TrainerCallback):
    """Step end times (after a device sync) and the real / padded tokens of each step's batch."""

    def __init__(self):
        self.times, self.real, self.padded, self.rows = [], [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        if CUDA:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def wrap(self, trainer):
        inner = trainer.compute_loss

        def compute_loss(model, inputs, *a, **k):
            ids = inputs["input_ids"]
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.shape[1]
            self.real.append(real)
            self.padded.append(ids.numel())
            cu = inputs.get("cu_seq_lens_q")
            self.rows.append(cu.numel() - 1 if cu is not None else ids.shape[0])
            return inner(model, inputs, *a, **k)

        trainer.compute_loss = compute_loss


def train_variant(name: str, proc, ds):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from trl_rejection import RejectionSFTConfig, RejectionSFTTrainer

    ours = name != "stock"
    flags = set(name.split("_")[1:])  # e.g. ours_nofuse_padded -> {"nofuse", "padded"}
    ckpt = {f for f in flags if f.startswith("ckpt") and f[4:].isdigit()}  # ckpt2: every 2nd layer checkpointed
    mem = {f for f in flags if f.startswith("mem") and f[3:].isdigit()}  # mem92: checkpoint_memory_fraction=0.92
    unknown = flags - {"nofuse", "fused", "drop0", "upcast", "padded", "grouped", "w0", "loop", "nockpt", "ckptall",
                       "keepdrop"} - ckpt - mem
    if unknown:
        raise ValueError(f"unknown lever(s) {sorted(unknown)} in variant {name!r}")
    dropout = 0.0 if "drop0" in flags else LORA_DROPOUT
    workers = 0 if "w0" in flags else WORKERS
    common = dict(per_device_train_batch_size=BS, max_steps=STEPS, learning_rate=2e-4, lr_scheduler_type="cosine",
                  warmup_steps=1, bf16=CUDA, use_cpu=not CUDA, gradient_checkpointing=True, max_length=2048,
                  report_to="none", logging_steps=1, save_strategy="no", dataloader_num_workers=workers,
                  seed=0, disable_tqdm=True)
    extra = {}
    if flags & {"padded", "grouped"}:
        extra["padding_free"] = False
    if "grouped" in flags:
        extra["train_sampling_strategy"] = "group_by_length"
    if "upcast" in flags:
        extra["cast_lora_inputs"] = True
    if "nofuse" in flags or "fused" in flags:
        extra["fuse_elementwise_ops"] = "fused" in flags
    if "ckptall" in flags:
        extra["checkpoint_layers"] = "all"
    if mem:
        extra["checkpoint_memory_fraction"] = int(next(iter(mem))[3:]) / 100
    if "keepdrop" in flags:
        extra["recompute_lora_dropout"] = False
    if "nockpt" in flags:
        common["gradient_checkpointing"] = False
    elif ckpt:  # transformers' every_n_layers
        extra["gradient_checkpointing_kwargs"] = {"every_n_layers": int(next(iter(ckpt))[4:])}
    if "loop" in flags:
        os.environ["TRL_REJECTION_VARLEN"] = "loop"
    peft = LoraConfig(r=128, lora_alpha=256, lora_dropout=dropout, task_type="CAUSAL_LM", target_modules=LORA_TARGETS,
                      modules_to_save=PROJECTOR)
    meter = Meter()
    callbacks = [meter]
    if PROFILE:  # e.g. "6-7": torch.profiler over those optimizer steps (their timing is then off)
        from pathlib import Path

        from trl_rejection.callbacks import StepProfiler, parse_step_range

        prof_dir = Path(OUT) / f"profile-{MODEL}-{name}"
        callbacks.append(StepProfiler(*parse_step_range(PROFILE), prof_dir, rank=0))
    model = build_model(proc)
    with tempfile.TemporaryDirectory() as d:
        if ours:
            args = RejectionSFTConfig(d, **common, **extra)
            trainer = RejectionSFTTrainer(model, args=args, train_dataset=ds, processing_class=proc,
                                          peft_config=peft, callbacks=callbacks)
        else:
            args = SFTConfig(d, **common)
            trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=proc, peft_config=peft,
                                 callbacks=callbacks)
        meter.wrap(trainer)
        forward = trainer.model.get_base_model().forward  # TRL's add_fused_lm_head patches it (functools.wraps)
        fused = getattr(getattr(forward, "__func__", forward), "__code__", None)
        fused = fused is not None and fused.co_name == "_fused_forward"
        attn = trainer.model.config.get_text_config()._attn_implementation
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
        losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
        kept = [h["uncheckpointed_layers"] for h in trainer.state.log_history if "uncheckpointed_layers" in h]
        peak = torch.cuda.max_memory_allocated() if CUDA else 0
        auto = getattr(trainer, "_auto_checkpointing", None)
        peak = max(peak, auto.peak_bytes if auto is not None else 0)  # auto resets the device's peak each micro-batch
    os.environ.pop("TRL_REJECTION_VARLEN", None)
    dt = meter.times[-1] - meter.times[WARM - 1]
    real, padded, rows = sum(meter.real[WARM:STEPS]), sum(meter.padded[WARM:STEPS]), sum(meter.rows[WARM:STEPS])
    result = dict(variant=name, levers=sorted(flags) if ours else [], bs=BS, workers=workers, lora_dropout=dropout,
                  timed_steps=STEPS - WARM,
                  step_s=dt / (STEPS - WARM), real_tok_s=real / dt, samples_s=rows / dt, padded_tok_s=padded / dt,
                  pad_frac=1 - sum(meter.real) / sum(meter.padded),
                  mean_real_tokens_per_row=sum(meter.real) / (BS * STEPS),
                  peak_gib=peak / 2**30,
                  tflops_6N=6 * N_LM * real / dt / 1e12, attn=attn, fused_lm_head=fused,
                  padding_free=getattr(trainer, "padding_free", False) if ours else False,
                  total_train_s=total, losses=losses, uncheckpointed_layers=kept)
    if PROFILE and (prof_dir / "rank0.json").exists():
        result["profile"] = json.loads((prof_dir / "rank0.json").read_text())
    log(**result)
    return result


def check_equivalence(proc, ds, n: int = 8):
    """One fixed batch: loss and final hidden states, padded (SDPA + mask) vs padding-free (varlen flash / loop),
    in bf16 with the benchmark's model. A deliberately leaky packing (plain causal SDPA over the packed row: rows see
    earlier rows) is the control that shows the check can fail."""
    from trl_rejection import attention, packing
    from trl_rejection.collator import RejectionDataCollator

    rows = [dict(ds[i]) for i in range(min(n, len(ds)))]
    padded = RejectionDataCollator(proc, max_length=2048)(rows)
    packed = RejectionDataCollator(proc, max_length=2048, padding_free=True)(rows)
    for b in (padded, packed):
        b.pop("is_refusal")
    model = build_model(proc).eval()
    dev = next(model.parameters()).device
    mask = padded["attention_mask"].bool()

    def run(batch, attn, varlen=None, bf16=CUDA):
        model.config.get_text_config()._attn_implementation = attn
        if varlen:
            os.environ["TRL_REJECTION_VARLEN"] = varlen
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        batch = packing.mrope_packed_inputs(packing.rope_index_module(model), batch)  # Qwen: per-row 3-D RoPE
        if not bf16:
            batch["pixel_values"] = batch["pixel_values"].float()
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch, use_cache=False, output_hidden_states=True)
        os.environ.pop("TRL_REJECTION_VARLEN", None)
        hidden = out.hidden_states[-1].float()
        hidden = hidden[mask.to(dev)] if hidden.shape[0] > 1 else hidden[0]
        return float(out.loss), hidden

    attention.register_varlen_attention()
    ref_loss, ref_h = run(padded, "sdpa")
    result = dict(variant="check", rows=len(rows), real_tokens=int(mask.sum()), padded_tokens=mask.numel(),
                  loss_padded=ref_loss)
    leaky = {k: v for k, v in packed.items() if not k.startswith(("cu_seq", "max_length"))}
    leaky["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]  # one long sequence: no isolation
    cases = [("varlen_flash", packed, "sdpa_varlen", "flash"), ("varlen_loop", packed, "sdpa_varlen", "loop"),
             ("leaky_control", leaky, "sdpa", None)]
    hidden = {"padded": ref_h}
    for tag, batch, attn, varlen in cases:
        if varlen == "flash" and not CUDA:
            continue
        loss, h = run(batch, attn, varlen)
        hidden[tag] = h
        result[f"loss_{tag}"] = loss
        result[f"loss_absdiff_{tag}"] = abs(loss - ref_loss)
        result[f"hidden_reldiff_{tag}"] = float((h - ref_h).norm() / ref_h.norm())
    # The same padded batch in fp32: how far is each bf16 run from exact arithmetic?
    model.float()
    loss32, h32 = run(padded, "sdpa", bf16=False)
    result["loss_fp32_padded"] = loss32
    for tag, h in hidden.items():
        result[f"hidden_reldiff_vs_fp32_{tag}"] = float((h - h32).norm() / h32.norm())
    log(**result)


def bench_collate(proc, ds, batches: int = 6):
    """Collator samples/s in one process (= per dataloader worker), row decoding from the dataset included."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from trl_rejection.collator import RejectionDataCollator

    collators = {"ours_padding_free": RejectionDataCollator(proc, max_length=2048, padding_free=True),
                 "ours_padded": RejectionDataCollator(proc, max_length=2048),
                 "stock": DataCollatorForVisionLanguageModeling(proc, max_length=2048)}
    n = min(len(ds) // BS, batches)
    for name, collate in collators.items():
        collate([dict(ds[i]) for i in range(BS)])  # warm-up
        t0 = time.perf_counter()
        for b in range(n):
            collate([dict(ds[i]) for i in range(b * BS, (b + 1) * BS)])
        dt = time.perf_counter() - t0
        log(variant=f"collate_{name}", bs=BS, samples_s_per_worker=n * BS / dt, cpu_count=os.cpu_count(),
            image_processor=type(proc.image_processor).__name__)


def run_isolated(variants: list[str]) -> None:
    """Run each variant in a fresh process, one after another, so no variant inherits another's GPU memory, caching
    allocator state or compiled kernels; then print a Markdown table (median of repeats when a name is repeated)."""
    import statistics
    import subprocess

    results: dict[str, list[dict]] = {}
    for name in variants:
        env = {**os.environ, "VARIANTS": name, "BENCH_CHILD": "1"}
        proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True)
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"variant": "' + name)]
        for rec in lines:
            print(json.dumps(rec), flush=True)
        if proc.returncode or not lines:
            print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
            errors = [x for x in proc.stderr.splitlines() if "Error" in x or "error:" in x]
            log(variant=name, failed=True, returncode=proc.returncode,  # kept in the JSON lines, e.g. CUDA OOM
                error=(errors or proc.stderr.splitlines() or ["no output"])[-1][:500])
        results.setdefault(name, []).extend(r for r in lines if "real_tok_s" in r)
    stock = [r["real_tok_s"] for r in results.get("stock", [])]
    base = statistics.median(stock) if stock else None
    print("\n| variant | runs | real tokens/s (median; each run) | vs stock | padding | peak GiB |")
    print("|---|---|---|---|---|---|")
    for name, recs in results.items():
        if not recs:
            continue
        tps = [r["real_tok_s"] for r in recs]
        med = statistics.median(tps)
        ratio = f"{med / base:.2f}x" if base else "-"
        print(f"| {name} | {len(recs)} | {med:,.0f} ({', '.join(f'{t:,.0f}' for t in tps)}) | {ratio} | "
              f"{recs[0]['pad_frac']:.1%} | {max(r['peak_gib'] for r in recs):.1f} |")


def main():
    import trl

    info = dict(variant="info", model=MODEL, torch=torch.__version__, transformers=transformers.__version__,
                trl=trl.__version__, device=torch.cuda.get_device_name(0) if CUDA else "cpu", small=SMALL, bs=BS,
                steps=STEPS, warm=WARM, workers=WORKERS, variants=VARIANTS)
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        info["torch_varlen_attn"] = True
    except ImportError:
        info["torch_varlen_attn"] = False
    child = bool(os.environ.get("BENCH_CHILD"))  # a variant run by `run_isolated`: the parent logged the info
    if not child:
        log(**info)
        if len(VARIANTS) > 1:
            run_isolated(VARIANTS)
            return
    proc = processor()
    t0 = time.perf_counter()
    ds = build_rows(proc, BS * STEPS, seed=int(os.environ.get("ROWS_SEED", "0")))
    if not child:
        log(variant="data", rows=len(ds), build_s=time.perf_counter() - t0)
    name = VARIANTS[0]
    if name == "check":
        check_equivalence(proc, ds)
    elif name == "collate":
        bench_collate(proc, ds)
    else:
        train_variant(name, proc, ds)


if __name__ == "__main__":
    main()

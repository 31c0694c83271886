"""Scale-out through the real recipe: DDP, FSDP2 and ZeRO-3 on 2 GPUs against 1 GPU, same global batch and data.

    python bench/bench_scale.py prepare                 # random LLaVA-1.5-7B checkpoint + synthetic rows, in $WORK
    RUNS=ref1,ddp,fsdp,zero3 python bench/bench_scale.py run

`prepare` saves, under $WORK (default /tmp/scale): `model/` - LLaVA-1.5-7B's exact shape with random bf16 weights
(`bench/model_shapes.py`'s `build_model`), written with `save_pretrained` with its processor, so every config loads it through
`from_pretrained` as it would a real checkpoint (ZeRO-3 partitions it while loading); `data/` - ROWS (320) synthetic
LLaVA-mix-like rows (`model_shapes.build_rows`: one JPEG each, 576 image tokens, log-normal text, 2/7 refusals).

`run` launches, for each name in RUNS, one
`accelerate launch --config_file recipes/accelerate_configs/<cfg>.yaml --num_processes <n> recipes/sft_rejection.py
--config bench/scale_llava7b.yaml --model_name_or_path $WORK/model --dataset_path $WORK/data ...` (10 steps, LoRA
r=128 + projector, padding-free, bf16, per-device batch 16) with `--metrics_file` and `--record_data_order`, and
appends one JSON line per run to $OUT/bench_scale.jsonl: per-step loss / loss_refusal / loss_normal, real tokens/s
over steps WARM+1..10 (the trainer's non-padding input tokens of all processes; step ends after a device sync), peak
allocated GiB of each GPU, and whether the run saw the same batches as `ref1`. Then a Markdown table against `ref1`.

Runs (global batch 32 each, or GLOBAL; the accumulation below is for 32):
    ref1      1 GPU (single_gpu.yaml), batch 16 x 2 accumulation steps: the reference
    ref1_b32  1 GPU, batch 32 x 1: the same global batch and data, summed differently (the bf16 noise floor)
    ref1_rep, ref1_rep2, ref1_rep3   ref1 again (run-to-run spread: the noise floor)
    ref1_bf16 ref1 with --fp32_trainable_params false (the projector trained in bf16, as before that option)
    fsdp1     fsdp.yaml on 1 GPU, 16 x 2 (FSDP's precision regime without sharding: bf16 parameters in compute,
              bf16 gradient reduction, fp32 trainable masters)
    zero3x1   zero3.yaml on 1 GPU, 16 x 2 (DeepSpeed's bf16 regime without sharding)
    fsdp1_b32, zero3x1_b32   the same on 1 GPU, 32 x 1 (the noise floor of those regimes)
    ddp_nofind      ddp with --ddp_find_unused_parameters false
    ddp_unbalanced  ddp with --balance_micro_batches false (each GPU's 16 rows as a plain shuffle splits them)
    zero3_noleaf    zero3 with --zero3_leaf_modules false (DeepSpeed fetches every linear layer on its own)
    fsdp_keep       fsdp launched with --fsdp_reshard_after_forward false (blocks stay gathered from forward to backward)
    fsdp_simple, zero3_simple   fsdp / zero3 with NCCL_PROTO=Simple (NCCL picks its low-latency protocol, LL, for
                    the sharded configs' all-gathers on 2 GPUs)
    fsdp_sync       fsdp with blocking batch copies (accelerate's non_blocking false, the default before session 23)
                    and --logging_nan_inf_filter true (Trainer's NaN/inf check of each micro-batch loss)
    fsdp_nosync     fsdp with --logging_nan_inf_filter false (neither host sync)
    fsdp_vis        fsdp launched with --fsdp_transformer_layer_cls_to_wrap LlamaDecoderLayer (the frozen vision tower
                    is not sharded block by block: it joins the root unit, gathered once a micro-batch)
    fsdp_keepvis    fsdp_keep and fsdp_vis together
    fsdp_cta8, zero3_cta8, fsdp_cta4, zero3_cta4   fsdp / zero3 with NCCL_MAX_CTAS=8 or 4 (NCCL's kernels on at
                    most 8 or 4 SMs: fewer SMs taken from the compute kernels that the all-gathers overlap)
    fsdp_accel      fsdp with --fsdp_autocast_precision false (accelerate's FSDP2 policy: block inputs/outputs and
                    gradient reduction in bf16)
    ref1_compile, ddp_compile, fsdp_compile, zero3_compile   ref1 / ddp / fsdp / zero3 launched with accelerate's
                    regional compilation (`--dynamo_backend inductor --dynamo_use_regional_compilation
                    --dynamo_use_dynamic`: each repeated block compiled once; zero3_compile also sets the
                    ACCELERATE_DYNAMO_* variables, which accelerate's DeepSpeed launcher does not pass on)
    qlora           1 GPU, --load_in_4bit true (QLoRA: 4-bit NF4 base), batch 4 x 8 accumulation
    ref1_b4         1 GPU, bf16 base, batch 4 x 8 (qlora's batch without quantization)
Runs joined by "+" (e.g. `fsdp1+zero3x1`) run side by side, one per GPU: for their losses, not their speed.
    ddp       multi_gpu.yaml, 2 processes x 16        zero2  zero2.yaml, 2 x 16
    fsdp      fsdp.yaml (FSDP2), 2 x 16               zero3  zero3.yaml, 2 x 16
A suffix `_ckpt` adds `--save_strategy steps --save_steps 5` (sharded checkpoints at step 5 and 10); `_resume`
resumes that run's output directory from checkpoint-5 (losses of steps 6-10 must equal the uninterrupted run's);
`_prof` profiles steps 5-7 of that run (as PROFILE=5-7 does for all; profiled runs get 90 s more than RUN_TIMEOUT to
write their profiles), in its own output directory; `_spy` (on a plain run only) samples every process's Python
stacks with py-spy ($PYSPY, else py-spy on PATH; 200 Hz, not pausing them) into $OUT/<run>.pyspy.txt.gz (collapsed
stacks; `bench/pyspy_summary.py` sums them by function).

PROFILE=5-7: runs also profile those optimizer steps (`--profile_steps`; each process's top kernels, seconds a step and
GPU-busy share go into the run's JSON line, tables in <run>/profile/); the profiled steps' overhead skews tokens/s.

GLOBAL=64 (with ROWS >= GLOBAL x steps at `prepare`; `run` checks): every run's global batch (default 32), the
accumulation steps scaled to match (ref1 16 x 4, the 2-GPU runs 16 x 2 as recipes/configs/llava-1.5-7b.yaml ships
for the paper's per-device batch; GLOBAL=128 is the paper's global batch).

STEPS=20 (with ROWS >= GLOBAL x 20 at `prepare`): longer runs, for a steadier rate (10 steps time 7 of them;
between calls on the same machine kind a 2-GPU rate moved by up to 21% in session 23). The cosine schedule then
spans 20 steps, so compare losses only between runs of one STEPS.

SMALL=1: a CPU dry run of the harness (tiny model, gloo processes, `multi_cpu.yaml` for every 2-process config).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

WORK = Path(os.environ.get("WORK", "/tmp/scale"))
OUT = Path(os.environ.get("OUT", "/tmp"))
SMALL = os.environ.get("SMALL") == "1"
ROWS = int(os.environ.get("ROWS", "320"))
WARM = int(os.environ.get("WARM", "3"))
STEPS = os.environ.get("STEPS")  # optimizer steps a run (the config's 10 if unset); needs ROWS >= GLOBAL x STEPS
TIMEOUT = int(os.environ.get("RUN_TIMEOUT", "400"))
PROFILE_TIMEOUT = 90  # seconds a profiled run gets on top of RUN_TIMEOUT: writing its profiles takes tens of seconds
GLOBAL = int(os.environ.get("GLOBAL", "32"))  # global batch of every run; RUNS' accumulation is given for 32
if GLOBAL <= 0 or GLOBAL % 32:
    sys.exit(f"GLOBAL={GLOBAL}: give a positive multiple of 32 (RUNS' accumulation steps are scaled by GLOBAL / 32)")
PROFILE = os.environ.get("PROFILE")  # e.g. "5-7": profile those steps (--profile_steps); their timing is then off
RUNS = {  # name: (accelerate config, processes, per-device batch, accumulation, extra recipe flags)
    "ref1": ("single_gpu", 1, 16, 2, ()), "ref1_b32": ("single_gpu", 1, 32, 1, ()),
    "ref1_rep": ("single_gpu", 1, 16, 2, ()), "ref1_rep2": ("single_gpu", 1, 16, 2, ()),
    "ref1_rep3": ("single_gpu", 1, 16, 2, ()),
    "ref1_bf16": ("single_gpu", 1, 16, 2, ("--fp32_trainable_params", "false")),
    "ddp": ("multi_gpu", 2, 16, 1, ()), "fsdp": ("fsdp", 2, 16, 1, ()),
    "zero3": ("zero3", 2, 16, 1, ()), "zero2": ("zero2", 2, 16, 1, ()), "fsdp1": ("fsdp", 1, 16, 2, ()),
    "fsdp1_b32": ("fsdp", 1, 32, 1, ()), "zero3x1": ("zero3", 1, 16, 2, ()), "zero3x1_b32": ("zero3", 1, 32, 1, ()),
    "ddp_nofind": ("multi_gpu", 2, 16, 1, ("--ddp_find_unused_parameters", "false")),
    "ddp_unbalanced": ("multi_gpu", 2, 16, 1, ("--balance_micro_batches", "false")),
    "zero3_noleaf": ("zero3", 2, 16, 1, ("--zero3_leaf_modules", "false")),
    "qlora": ("single_gpu", 1, 4, 8, ("--load_in_4bit", "true")), "ref1_b4": ("single_gpu", 1, 4, 8, ()),
    "fsdp_keep": ("fsdp", 2, 16, 1, ()),
    "fsdp_accel": ("fsdp", 2, 16, 1, ("--fsdp_autocast_precision", "false")),
    "fsdp_simple": ("fsdp", 2, 16, 1, ()), "zero3_simple": ("zero3", 2, 16, 1, ()),
    "fsdp_sync": ("fsdp", 2, 16, 1, ("--logging_nan_inf_filter", "true", "--accelerator_config",
                                      str(WORK / "blocking_batches.json"))),
    "fsdp_nosync": ("fsdp", 2, 16, 1, ("--logging_nan_inf_filter", "false")),
    "fsdp_vis": ("fsdp", 2, 16, 1, ()), "fsdp_keepvis": ("fsdp", 2, 16, 1, ()),
    "fsdp_cta8": ("fsdp", 2, 16, 1, ()), "zero3_cta8": ("zero3", 2, 16, 1, ()),
    "fsdp_cta4": ("fsdp", 2, 16, 1, ()), "zero3_cta4": ("zero3", 2, 16, 1, ()),
    "ref1_compile": ("single_gpu", 1, 16, 2, ()), "ddp_compile": ("multi_gpu", 2, 16, 1, ()),
    "fsdp_compile": ("fsdp", 2, 16, 1, ()), "zero3_compile": ("zero3", 2, 16, 1, ()),
}
COMPILE = ["--dynamo_backend", "inductor", "--dynamo_use_regional_compilation", "--dynamo_use_dynamic"]
LAUNCH_FLAGS = {  # accelerate launch options of a run
    "fsdp_keep": ["--fsdp_reshard_after_forward", "false"],
    "fsdp_vis": ["--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer"],
    "fsdp_keepvis": ["--fsdp_reshard_after_forward", "false", "--fsdp_transformer_layer_cls_to_wrap",
                     "LlamaDecoderLayer"],
    **{name: COMPILE for name in ("ref1_compile", "ddp_compile", "fsdp_compile", "zero3_compile")},
}
RUN_ENV = {"fsdp_simple": {"NCCL_PROTO": "Simple"}, "zero3_simple": {"NCCL_PROTO": "Simple"},
           "fsdp_cta8": {"NCCL_MAX_CTAS": "8"}, "zero3_cta8": {"NCCL_MAX_CTAS": "8"},
           "fsdp_cta4": {"NCCL_MAX_CTAS": "4"}, "zero3_cta4": {"NCCL_MAX_CTAS": "4"},
           # accelerate's DeepSpeed launcher does not hand --dynamo_* on to the processes: the variables it would set
           "zero3_compile": {"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR", "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "True",
                             "ACCELERATE_DYNAMO_USE_DYNAMIC": "True"}}  # environment of a run


def log(record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(OUT / "bench_scale.jsonl", "a") as f:
        f.write(line + "\n")


def prepare() -> None:
    if SMALL:
        os.environ["SMALL"] = "1"
    import model_shapes  # noqa: E402  (reads SMALL and MODEL at import)

    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "blocking_batches.json").write_text('{"non_blocking": false}\n')  # fsdp_sync's accelerator_config
    proc = model_shapes.processor()
    t0 = time.perf_counter()
    ds = model_shapes.build_rows(proc, ROWS, seed=0)
    ds = ds.add_column("id", [f"row{i}" for i in range(len(ds))])
    ds.save_to_disk(str(WORK / "data"))
    t1 = time.perf_counter()
    model = model_shapes.build_model(proc)
    model.save_pretrained(WORK / "model")
    proc.save_pretrained(WORK / "model")
    log(dict(variant="prepare", rows=len(ds), data_s=t1 - t0, model_s=time.perf_counter() - t1,
             params=sum(p.numel() for p in model.parameters()), dtype=str(next(model.parameters()).dtype)))


def scaled(accumulation: int) -> int:
    """A run's accumulation steps at the global batch GLOBAL (RUNS gives them for 32)."""
    return accumulation * GLOBAL // 32


SUFFIXES = ("_spy", "_prof", "_ckpt", "_resume")  # a run's variants (module docstring); "_spy" goes outermost


def run_key(name: str) -> str:
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def launch_cmd(name: str, gpu: int | None = None) -> list[str]:
    key = run_key(name)
    cfg, n, bs, accumulation, flags = RUNS[key]
    if SMALL:
        how = (["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"] if n == 1 else
               ["--config_file", str(ROOT / "recipes/accelerate_configs/multi_cpu.yaml")])
        extra = ["--use_cpu", "true", "--bf16", "false", "--dtype", "float32", "--dataloader_num_workers", "0",
                 "--per_device_train_batch_size", str(bs // 4), "--gradient_checkpointing", "false"]
    else:
        how = ["--config_file", str(ROOT / f"recipes/accelerate_configs/{cfg}.yaml"), "--num_processes", str(n),
               "--main_process_port", str(29500 + sorted(RUNS).index(key))]  # runs side by side need their own
        how += ["--gpu_ids", str(gpu)] if gpu is not None else []  # (single_gpu.yaml names GPU 0)
        how += LAUNCH_FLAGS.get(key, [])
        extra = ["--per_device_train_batch_size", str(bs)]
    out = WORK / "out" / (key + "_ckpt" if name.endswith("_resume") else name)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, str(ROOT / "recipes/sft_rejection.py"),
           "--config", str(ROOT / "bench/scale_llava7b.yaml"), "--model_name_or_path", str(WORK / "model"),
           "--dataset_path", str(WORK / "data"), "--output_dir", str(out),
           "--metrics_file", str(WORK / "out" / f"{name}.metrics.jsonl"), "--record_data_order", "true",
           "--gradient_accumulation_steps", str(scaled(accumulation)), *extra, *flags]
    if STEPS:
        cmd += ["--max_steps", STEPS]
    if PROFILE or name.endswith("_prof"):
        cmd += ["--profile_steps", PROFILE or "5-7"]
    if name.endswith("_ckpt"):
        cmd += ["--save_strategy", "steps", "--save_steps", "5"]
    if name.endswith("_resume"):
        cmd += ["--save_strategy", "steps", "--save_steps", "5", "--resume_from_checkpoint",
                str(out / "checkpoint-5")]
    if name.endswith("_spy"):  # sample every process's Python stacks (py-spy, carried as a wheel)
        cmd = [os.environ.get("PYSPY", "py-spy"), "record", "--subprocesses", "--nonblocking", "--rate", "200",
               "--format", "raw", "--output", str(OUT / f"{name}.pyspy.txt"), "--", *cmd]
    return cmd


def batches(out: Path) -> list[frozenset]:
    """Every batch (as a set of row ids) the run collated, over all processes (workers append in any order)."""
    seen = []
    for path in sorted(out.glob("data_order_rank*.jsonl")):
        seen += [frozenset(json.loads(line)) for line in path.read_text().splitlines()]
    return seen


def start(name: str, gpu: int | None = None) -> subprocess.Popen:
    (WORK / "out").mkdir(parents=True, exist_ok=True)
    (WORK / "out" / f"{name}.metrics.jsonl").unlink(missing_ok=True)
    if not name.endswith("_resume"):  # a rerun on a warm machine: the recipe refuses this harness's earlier records
        for path in (WORK / "out" / name).glob("data_order_rank*.jsonl"):
            path.unlink()
    env = {**os.environ, **RUN_ENV.get(run_key(name), {})}
    return subprocess.Popen(launch_cmd(name, gpu), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=WORK, env=env)


def run_group(group: str) -> list[dict]:
    """One run, or runs joined by "+" side by side, one per GPU (1-GPU runs for losses, not for timing)."""
    names = group.split("+")
    limit = TIMEOUT + (PROFILE_TIMEOUT if PROFILE or any(name.endswith("_prof") for name in names) else 0)
    t0 = time.perf_counter()
    procs = [start(name, gpu=i if len(names) > 1 else None) for i, name in enumerate(names)]
    records = []
    for name, proc in zip(names, procs):
        try:
            text, _ = proc.communicate(timeout=max(1.0, limit - (time.perf_counter() - t0)))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            text, rc = proc.communicate()[0], "timeout"
        records.append(finish(name, rc, text or "", time.perf_counter() - t0, side_by_side=len(names) > 1))
    return records


def finish(name: str, rc: int | str, text: str, wall: float, side_by_side: bool) -> dict:
    cmd = launch_cmd(name)
    metrics = WORK / "out" / f"{name}.metrics.jsonl"
    with open(OUT / "runs.log", "a") as f:
        f.write(f"\n===== {name} rc={rc} wall={wall:.0f}s\n{' '.join(cmd)}\n{text[-6000:]}\n")
    steps = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if name.endswith("_spy") and rc == 0 and len(steps) < int(STEPS or 10):
        rc = "failed (py-spy exits 0 whatever the run did)"
    cfg, n, bs, accumulation, flags = RUNS[run_key(name)]
    device_batch = bs // 4 if SMALL else bs  # SMALL runs a quarter of the batch (launch_cmd)
    record = dict(variant=name, config=cfg, processes=n, per_device_batch=device_batch,
                  accumulation=scaled(accumulation), global_batch=device_batch * n * scaled(accumulation), rc=rc,
                  flags=list(flags), env=RUN_ENV.get(run_key(name), {}), side_by_side=side_by_side,
                  wall_s=round(wall, 1), steps=len(steps), losses=[s["loss"] for s in steps],
                  loss_refusal=[s.get("loss_refusal") for s in steps],
                  loss_normal=[s.get("loss_normal") for s in steps],
                  grad_norm=[s.get("grad_norm") for s in steps], step=[s["step"] for s in steps])
    timed = [s for s in steps if "time_s" in s]
    if len(timed) > WARM + 1:
        a, b = timed[WARM - 1], timed[-1]
        record.update(real_tok_s=(b["tokens_seen"] - a["tokens_seen"]) / (b["time_s"] - a["time_s"]),
                      step_s=(b["time_s"] - a["time_s"]) / (b["step"] - a["step"]), timed_steps=b["step"] - a["step"],
                      peak_gib=b["peak_gib"], tokens_seen=b["tokens_seen"])
    spy = OUT / f"{name}.pyspy.txt"
    if spy.is_file():  # collapsed stacks run to tens of MB: gzip them (bench/pyspy_summary.py reads either)
        with open(spy, "rb") as f, gzip.open(f"{spy}.gz", "wb") as z:
            shutil.copyfileobj(f, z)
        spy.unlink()
    profiles = sorted((WORK / "out" / name / "profile").glob("rank*.json"))
    if profiles:
        record["profile"] = [json.loads(path.read_text()) for path in profiles]
    if rc != 0:
        record["error_tail"] = "\n".join(line for line in text.splitlines()[-40:]
                                         if "Error" in line or "error" in line)[-1500:]
    out = WORK / "out" / name
    if out.is_dir() and (WORK / "out" / "ref1").is_dir() and name != "ref1" and bs == 16 \
            and not name.endswith(("_ckpt", "_resume", "_prof")):
        record["same_batches_as_ref1"] = sorted(map(sorted, batches(out))) == sorted(
            map(sorted, batches(WORK / "out" / "ref1")))
    log(record)
    return record


def table(records: list[dict]) -> None:
    ref = next((r for r in records if r["variant"] == "ref1" and r.get("losses")), None)
    print("\n| run | GPUs | real tokens/s | scaling vs 1 GPU | peak GiB per GPU | max abs loss diff vs ref1 (10 steps) |"
          " max abs refusal / normal loss diff | rc |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        tps = r.get("real_tok_s")
        scale = f"{tps / ref['real_tok_s']:.2f}x" if tps and ref and ref.get("real_tok_s") else "-"
        diff = split = "-"
        base = ref
        if r["variant"].endswith("_resume"):  # against the uninterrupted run that wrote its checkpoint
            base = next((x for x in records if x["variant"] == run_key(r["variant"]) + "_ckpt"), ref)
        if base and r.get("losses") and r is not base:
            def by_step(rec, key):
                return {s: v for s, v in zip(rec["step"], rec[key]) if v is not None}

            d = {key: [abs(v - by_step(base, key)[s]) for s, v in by_step(r, key).items() if s in by_step(base, key)]
                 for key in ("losses", "loss_refusal", "loss_normal")}
            diff = f"{max(d['losses']):.2e}" if d["losses"] else "-"
            both = d["loss_refusal"] + d["loss_normal"]
            split = f"{max(both):.2e}" if both else "-"
        peak = "/".join(f"{x:.1f}" for x in r.get("peak_gib", [])) or "-"
        print(f"| {r['variant']} | {r['processes']} | {f'{tps:,.0f}' if tps else '-'} | {scale} | {peak} | {diff} |"
              f" {split} | {r['rc']} |")


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "run"
    if what == "prepare":
        prepare()
        return
    from datasets import load_from_disk

    rows, steps = load_from_disk(str(WORK / "data")).num_rows, int(STEPS or 10)
    if rows < GLOBAL * steps:  # a second epoch would reshuffle: the runs would no longer see one pass of the data
        sys.exit(f"{rows} prepared rows < GLOBAL x steps = {GLOBAL} x {steps}: "
                 f"run `prepare` with ROWS={GLOBAL * steps}")
    groups = [group for group in os.environ.get("RUNS", "ref1,ddp,fsdp,zero3").split(",") if group]
    combined = [name for group in groups for name in group.split("+")
                if name.endswith("_spy") and run_key(name) != name.removesuffix("_spy")]
    if combined:  # the other suffixes are read from the end of the name
        sys.exit(f"{combined}: `_spy` goes on a plain run (e.g. zero3_spy), not with _prof/_ckpt/_resume")
    records = [r for group in groups for r in run_group(group)]
    table(records)


if __name__ == "__main__":
    main()

"""GPU tests: the varlen flash kernel, fused ops, bf16 padded-vs-packed, the recipe on one GPU and every shipped
multi-GPU config on two. Deselected by default (pyproject `addopts`); run with `python -m pytest -m gpu tests/test_gpu.py`
on a machine with CUDA (two GPUs for the multi-GPU configs; DeepSpeed installed for zero2/zero3).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "sft_rejection.py")
CONFIGS = ROOT / "recipes" / "accelerate_configs"
SMALL_MIX = json.dumps({"n_refusal": 16, "n_normal": 48})


def launch(tmp_path: Path, config: str, processes: int, *args: str, fake_hub: Path | None = None,
           site: Path | None = None, launch_args: tuple[str, ...] = (), **extra_env: str) -> subprocess.CompletedProcess:
    """Run the recipe through `accelerate launch` (with `launch_args`, options of `accelerate launch` itself); with
    `fake_hub`, Hub uploads are copied there instead (tests/fake_hub/sitecustomize.py: the GPU machines are offline);
    `site`: a folder put first on the processes' PYTHONPATH (a `sitecustomize.py` there runs in each of them)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
           "--num_processes", str(processes), *launch_args, RECIPE, "--use_cpu", "false", "--bf16", "true", *args]
    env = {**os.environ, "TRL_REJECTION_CACHE": str(tmp_path / "cache"), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(extra_env)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    if fake_hub is not None:
        fake_hub.mkdir()
        env.update(FAKE_HUB=str(fake_hub),
                   PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "fake_hub"), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def logged_losses(output_dir: Path) -> dict[int, float]:
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    history = json.loads(states[-1].read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def test_varlen_flash_kernel_takes_fp32_query_key_under_bf16_autocast():
    """fp32 weights + bf16 autocast (TRL's default dtype with `--bf16`): q/k reach attention in fp32 (RoPE), v in
    bf16. The kernel itself refuses fp32; `sdpa_varlen` casts to the autocast dtype and matches per-row SDPA."""
    from trl_rejection import attention

    assert attention._VARLEN_ATTN is not None and attention.varlen_backend(torch.device("cuda")) == "flash"
    torch.manual_seed(0)
    lens = [37, 5, 120, 64]
    cu = torch.tensor([0, *lens], device="cuda").cumsum(0).to(torch.int32)
    q, k = (torch.randn(1, 8, sum(lens), 64, device="cuda") for _ in range(2))
    v = torch.randn(1, 8, sum(lens), 64, device="cuda").bfloat16()
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        attention._VARLEN_ATTN(q[0].transpose(0, 1).contiguous(), k[0].transpose(0, 1).contiguous(),
                              v[0].transpose(0, 1).float().contiguous(), cu, cu, 120, 120)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 1, True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = attention.varlen_sdpa_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=120)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[:, :, s:e].double(), k[:, :, s:e].double(), v[:, :, s:e].double(), is_causal=True)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())], 2).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2  # bf16 operands: 1e-3 to 1e-2


def test_padded_and_packed_batches_agree_in_bf16_with_fp32_weights():
    """The recipe's default model (fp32 weights) under bf16 autocast: the packed batch (varlen flash kernel) gives
    the padded batch's loss within the bf16 noise floor (padded bf16 vs padded fp32), and a leaky packing does not."""
    from trl_rejection import attention
    from trl_rejection.collator import RejectionDataCollator
    from trl_rejection.testing.tiny import make_model, make_processor
    sys.path.insert(0, str(Path(__file__).parent))
    from test_batching import rows

    proc = make_processor("llava-1.5")
    data = rows(12)
    padded = RejectionDataCollator(proc)(data)
    packed = RejectionDataCollator(proc, padding_free=True)(data)
    for batch in (padded, packed):
        batch.pop("is_refusal")
    model = make_model("llava-1.5", proc).cuda().float()
    assert next(model.parameters()).dtype == torch.float32
    attention.register_varlen_attention()

    def loss(batch, attn, bf16=True):
        model.config.get_text_config()._attn_implementation = attn
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return float(model(**batch, use_cache=False).loss)

    ref, fp32 = loss(padded, "sdpa"), loss(padded, "sdpa", bf16=False)
    noise = abs(ref - fp32)
    got = loss(packed, "sdpa_varlen")
    leaky = {k: v for k, v in packed.items() if not k.startswith(("cu_seq", "max_length"))}
    leaky["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
    assert abs(got - ref) <= 2 * noise + 1e-3, (got, ref, fp32)
    assert abs(loss(leaky, "sdpa") - ref) > abs(got - ref)


def test_fused_elementwise_ops_match_eager_on_gpu():
    from trl_rejection import fused
    from trl_rejection.testing.tiny import make_model, make_processor

    tok = make_processor("llama3-text")
    torch.manual_seed(0)
    ids = torch.randint(0, len(tok), (2, 64), device="cuda")
    model = make_model("llama3-text", tok).cuda().bfloat16()
    with torch.no_grad():
        eager = model(input_ids=ids).logits.float()
        assert fused.fuse_elementwise_ops(model) > 0
        fused = model(input_ids=ids).logits.float()
    assert float((fused - eager).norm() / eager.norm()) < 1e-2


def test_recipe_default_job_on_one_gpu(tmp_path):
    """`single_gpu.yaml` + the embedded default with `--bf16 true`: fp32 weights, bf16 autocast, padding-free
    varlen attention. On a host with several GPUs it uses GPU 0 only (it used to be refused: DataParallel)."""
    out = launch(tmp_path, "single_gpu", 1, "--output_dir", "one").stdout
    assert "Optimizer steps: 27." in out and "| bundled | all |" in out
    assert (tmp_path / "one" / "final" / "adapter_model.safetensors").is_file()
    losses = logged_losses(tmp_path / "one")
    assert losses[max(losses)] < losses[min(losses)]


REGIONAL_COMPILE = ("--dynamo_backend", "inductor", "--dynamo_use_regional_compilation", "--dynamo_use_dynamic")


@pytest.mark.parametrize("config", ["single_gpu", "fsdp"])
def test_recipe_trains_under_regional_compilation_as_it_does_eager(tmp_path, config):
    """accelerate's regional compilation (README, "Faster steps: compile the blocks"): each repeated block compiled
    once by inductor (on one GPU accelerate compiles copies of the block containers, under FSDP2 the blocks in place,
    its hooks outside). The recipe trains, inductor generated kernels, the adapter has the eager run's keys (no
    `_orig_mod.` in them) and every logged loss is within 1% of the eager run's."""
    if config != "single_gpu":
        _needs(config)
    processes = 1 if config == "single_gpu" else 2
    job = ("--max_steps", "6", "--mix", SMALL_MIX, "--eval_bundled", "false", "--logging_steps", "1",
           "--save_strategy", "steps", "--save_steps", "6")
    launch(tmp_path, config, processes, "--output_dir", "eager", *job)
    launch(tmp_path, config, processes, "--output_dir", "compiled", *job, launch_args=REGIONAL_COMPILE,
           TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    assert list((tmp_path / "inductor").rglob("*.py")), "inductor generated no kernels: nothing was compiled"
    from safetensors import safe_open

    keys = {}
    for run in ("eager", "compiled"):
        with safe_open(tmp_path / run / "final" / "adapter_model.safetensors", "pt") as f:
            keys[run] = sorted(f.keys())
    assert keys["compiled"] == keys["eager"] and keys["eager"]
    eager, compiled = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "compiled")
    assert sorted(compiled) == sorted(eager) == list(range(1, 7))
    for step, loss in eager.items():
        assert abs(compiled[step] - loss) <= 0.01 * loss, (step, compiled[step], loss)


def _needs(config: str) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    if config.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs DeepSpeed")


@pytest.mark.parametrize("config", ["multi_gpu", "fsdp", "zero2", "zero3"])
def test_two_gpus_train_merge_and_evaluate_with_each_shipped_config(tmp_path, config):
    """The recipe's tiny default (fp32 weights, bf16 autocast, padding-free) on 2 GPUs through each shipped config,
    with gradient accumulation 2 as the paper's configs ship (FSDP2 failed there on a unit never all-gathered: the LM
    head under TRL's fused loss), `--merge_adapter --push_to_hub`: the merged model is pushed once, by the main
    process, and is whole (no LoRA, nothing missing), loads on one device, differs from the base where LoRA was merged
    and equals it where nothing trained (vision tower)."""
    _needs(config)
    from transformers import LlavaForConditionalGeneration

    from trl_rejection.testing.tiny import make_model, make_processor

    out = launch(tmp_path, config, 2, "--output_dir", config, "--max_steps", "6", "--gradient_accumulation_steps", "2",
                 "--merge_adapter", "true", "--mix", SMALL_MIX, "--save_strategy", "no", "--push_to_hub", "true",
                 "--hub_model_id", "me/merged", fake_hub=tmp_path / "hub").stdout
    assert "Optimizer steps: 6." in out and "| bundled | all |" in out
    assert (tmp_path / "hub" / "me--merged.rank").read_text() == "0"  # one upload, from the main process
    final = tmp_path / "hub" / "me--merged"
    assert not (final / "adapter_config.json").exists() and (final / "README.md").is_file()
    merged, info = LlavaForConditionalGeneration.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not any("lora" in n for n, _ in merged.named_parameters())
    base = dict(make_model("llava-1.5", make_processor("llava-1.5"), seed=0).named_parameters())
    weights = dict(merged.named_parameters())
    q = next(n for n in weights if "language_model" in n and n.endswith("q_proj.weight"))
    vision = next(n for n in weights if "vision_tower" in n and n.endswith("q_proj.weight"))
    assert not torch.equal(weights[q].float(), base[q].float())
    # frozen: the base weight exactly, rounded to the saved dtype (DeepSpeed's bf16 mode trains a bf16 copy)
    torch.testing.assert_close(weights[vision], base[vision].to(weights[vision].dtype), rtol=0, atol=0)
    ids = torch.tensor([[1, 5, 6, 7]], device="cuda")
    assert torch.isfinite(merged.cuda()(input_ids=ids).logits).all()


@pytest.mark.parametrize("config", ["multi_gpu", "fsdp", "zero3"])
def test_two_gpus_train_with_auto_checkpointing(tmp_path, config):
    """`checkpoint_layers="auto"` (the default) with gradient checkpointing on, under DDP, FSDP and ZeRO-3 (reentrant
    checkpointing there, as TRL forces with PEFT): the recipe trains, and every logged step says how many of the
    layers kept their activations (none in the first micro-batch, one measured in the second)."""
    _needs(config)
    launch(tmp_path, config, 2, "--output_dir", config, "--max_steps", "4", "--mix", SMALL_MIX, "--eval_bundled",
           "false", "--gradient_checkpointing", "true", "--logging_steps", "1", "--save_strategy", "steps",
           "--save_steps", "4")
    history = json.loads((tmp_path / config / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    kept = [h.get("uncheckpointed_layers") for h in history if "loss" in h]
    assert len(kept) == 4 and kept[:2] == [0, 1] and all(k is not None and k >= 1 for k in kept[2:]), kept


@pytest.mark.parametrize("config", ["fsdp", "zero3"])
def test_profiles_of_sharded_steps_count_the_gathers_under_the_blocks_that_issued_them(tmp_path, config):
    """`--profile_steps` under FSDP2 and ZeRO-3 on 2 GPUs: every process writes its profile of the chosen steps, the
    GPU's busy share is a share (the device-side spans of profiler ranges, which cover idle time, are not counted as
    kernels), and the all-gathers are counted under the block ranges whose hooks issued them (`annotate_forward`
    finds FSDP2's renamed blocks and encloses DeepSpeed's fetch hooks). ZeRO-3 is profiled from step 1: every
    parameter of this tiny model is under DeepSpeed's persistence threshold (1e5 elements), so once DeepSpeed has
    recorded its trace (step 2 on) its blocks fetch nothing; its all-gathers are then the per-parameter re-gathers of
    the persistent parameters after each optimizer step (96 a step on 2 x H200, at `training_step` level) and TRL's
    metric gathers in `compute_loss`."""
    _needs(config)
    steps = "1-2" if config == "zero3" else "2-3"
    launch(tmp_path, config, 2, "--output_dir", config, "--max_steps", "3", "--mix", SMALL_MIX, "--eval_bundled",
           "false", "--save_strategy", "no", "--profile_steps", steps)
    for rank in (0, 1):
        summary = json.loads((tmp_path / config / "profile" / f"rank{rank}.json").read_text())
        assert summary["steps"] == 2 and summary["rank"] == rank
        assert 0 < summary["compute_busy"] <= summary["gpu_busy"] < 1, summary
        issued = dict(summary["collectives_per_step_by_range"])
        assert any(label.startswith("trl_rejection: LlamaDecoderLayer > c10d::") for label in issued), \
            (config, rank, issued)
        assert summary["trace_start_unix_ns"] > 0 and summary["idle_spans_ms"], summary["idle_spans_ms"]
        assert all(a < b for a, b in summary["idle_spans_ms"] + summary["communication_only_spans_ms"])


LAYER_NORM_PROBE = """import json, os, torch
seen = set()
def record(module, args, output):  # the dtype each LayerNorm of the model returns while training
    if isinstance(module, torch.nn.LayerNorm) and module.training and str(output.dtype) not in seen:
        seen.add(str(output.dtype))
        with open(os.environ["LAYER_NORM_LOG"] + "." + os.environ.get("RANK", "0"), "w") as f:
            json.dump(sorted(seen), f)
torch.nn.modules.module.register_module_forward_hook(record)
"""


@pytest.mark.parametrize("config,off", [("fsdp", "--fsdp_autocast_precision"), ("zero3", "--deepspeed_autocast")])
def test_sharded_configs_run_layer_norms_in_float32_as_one_gpu_does(tmp_path, config, off):
    """Under CUDA autocast LayerNorm returns float32, which keeps the CLIP tower's residual stream in float32 on one
    GPU. accelerate's FSDP2 path applies its mixed-precision policy but no autocast, and under DeepSpeed accelerate
    opens none (the engine would switch an outer one off): a bf16 checkpoint's LayerNorms then returned bf16 (and the sharded losses drifted
    from one GPU's). With `fsdp_autocast_precision` / `deepspeed_autocast` (default) the forward runs under autocast:
    on 2 GPUs every LayerNorm returns float32, as on one GPU (checked in the FSDP case); with the option off, bf16."""
    _needs(config)
    from trl_rejection.testing.tiny import make_model, make_processor

    base, site = tmp_path / "tiny-llava-bf16", tmp_path / "site"
    processor = make_processor("llava-1.5")
    processor.save_pretrained(base)
    make_model("llava-1.5", processor).to(torch.bfloat16).save_pretrained(base)
    site.mkdir()
    (site / "sitecustomize.py").write_text(LAYER_NORM_PROBE)
    common = ("--model_name_or_path", str(base), "--dtype", "bfloat16", "--max_steps", "2", "--mix", SMALL_MIX,
              "--eval_bundled", "false", "--save_strategy", "no")
    runs = [("on", config, 2, ()), ("off", config, 2, (off, "false"))]
    expected = {"on.0": ["torch.float32"], "on.1": ["torch.float32"], "off.0": ["torch.bfloat16"],
                "off.1": ["torch.bfloat16"]}
    if config == "fsdp":
        runs.append(("one", "single_gpu", 1, ()))
        expected["one.0"] = ["torch.float32"]
    for name, launch_config, processes, flags in runs:
        launch(tmp_path, launch_config, processes, "--output_dir", name, *common, *flags, site=site,
               LAYER_NORM_LOG=str(tmp_path / name))
    dtypes = {f.name: json.loads(f.read_text()) for f in tmp_path.glob("o*.[01]")}
    assert dtypes == expected, dtypes


@pytest.mark.parametrize("config", ["fsdp", "zero3"])
def test_sharded_checkpoint_resumes_to_the_same_losses_and_the_adapter_loads_anywhere(tmp_path, config):
    """Train 8 steps with sharded checkpoints at 4 and 8; resume a second run from checkpoint-4: steps 5-8 log the
    uninterrupted run's losses. The saved adapter loads on CPU and on one GPU."""
    _needs(config)
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    args = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--mix", SMALL_MIX,
            "--eval_bundled", "false", "--lora_dropout", "0.0",
            "--logging_steps", "1"]  # (a logged loss averages the steps since the last log; resuming resets that)
    launch(tmp_path, config, 2, "--output_dir", "full", *args)
    full = logged_losses(tmp_path / "full")
    (tmp_path / "resumed").mkdir()
    os.symlink(tmp_path / "full" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    launch(tmp_path, config, 2, "--output_dir", "resumed", "--resume_from_checkpoint", "resumed/checkpoint-4", *args)
    resumed = logged_losses(tmp_path / "resumed")
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(full[step], rel=2e-3), (step, resumed, full)
    base_dir = tmp_path / "full" / "tiny-llava-init"
    for device in ("cpu", "cuda"):
        model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base_dir),
                                          tmp_path / "full" / "final").to(device)
        ids = torch.tensor([[1, 5, 6, 7]], device=device)
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("data", ["images", "text"])
def test_gemma3_packed_batch_agrees_with_padded_in_bf16(data, monkeypatch):
    """Gemma 3 (fp32 weights, bf16 autocast, a sliding window of 8 tokens, shorter than every row): the packed batch
    gives the padded batch's loss and gradients within the bf16 noise floor (padded bf16 vs padded fp32), and in fp32
    to 1e-5 (loss) / 1e-4 (gradients). Rows with images run per-row SDPA with the image-block mask on the sliding
    layer (its window is shorter than the rows) and two varlen flash calls on the full-attention layer (causal, then
    the images' tokens unmasked); the text-only batch runs the varlen flash kernel (with `window_size=(7, 0)` on the
    sliding layer where torch's kernel has it). A leaky packing (one causal sequence) is the control."""
    from trl_rejection import attention
    from trl_rejection.collator import RejectionDataCollator
    from trl_rejection.testing.tiny import make_model, make_processor

    sys.path.insert(0, str(Path(__file__).parent))
    from test_gemma3_packing import IMAGE_ROWS, TEXT_ROWS

    proc = make_processor("gemma3")
    rows = IMAGE_ROWS if data == "images" else TEXT_ROWS
    padded = RejectionDataCollator(proc)(rows)
    packed = RejectionDataCollator(proc, padding_free=True)(rows)
    for batch in (padded, packed):
        batch.pop("is_refusal")
    flash_calls = []
    real_flash = attention._flash_varlen
    monkeypatch.setattr(attention, "_flash_varlen", lambda *a: flash_calls.append(a[6]) or real_flash(*a))

    def loss_and_grads(batch, bf16=True):
        model = make_model("gemma3", proc, text_kwargs={"sliding_window": 8}).cuda().float().train()
        if "cu_seq_lens_q" in batch:
            assert attention.use_varlen_attention(model)
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        return float(loss), torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    ref, fp32 = loss_and_grads(padded), loss_and_grads(padded, bf16=False)
    got = loss_and_grads(packed)
    kernel_kwargs = [k for k in (attention._flash_mask_kwargs(8), attention._flash_mask_kwargs(None)) if k]
    images = [attention._flash_mask_kwargs(None), attention._full_mask_kwargs()]
    assert flash_calls == (images if data == "images" else kernel_kwargs)
    assert abs(got[0] - ref[0]) <= 2 * abs(ref[0] - fp32[0]) + 1e-3, (got[0], ref[0], fp32[0])
    assert rel(got[1], ref[1]) <= 2 * rel(ref[1], fp32[1]) + 1e-3, (rel(got[1], ref[1]), rel(ref[1], fp32[1]))
    got32 = loss_and_grads(packed, bf16=False)  # fp32: no flash kernel, per-row SDPA
    assert abs(got32[0] - fp32[0]) < 1e-5 and rel(got32[1], fp32[1]) < 1e-4
    leaky = {k: v for k, v in packed.items() if not k.startswith(("cu_seq", "max_length"))}
    leaky["position_ids"] = torch.arange(packed["input_ids"].shape[1])[None]
    assert abs(loss_and_grads(leaky)[0] - ref[0]) > abs(got[0] - ref[0])


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_vision_encoder_varlen_flash_agrees_with_sdpa_in_bf16(family, monkeypatch):
    """The Qwen-VL vision encoder (bf16 weights) on `"varlen_flash_sdpa"`: one real varlen flash call per layer gives
    the `"sdpa"` encoder's features within the bf16 floor (sdpa bf16 vs sdpa fp32 of the same weights)."""
    from trl_rejection import attention
    from trl_rejection.testing.tiny import make_model, make_processor

    sys.path.insert(0, str(Path(__file__).parent))
    from test_vision_varlen import GRID, _pixels

    model = make_model(family, make_processor(family)).cuda().eval()
    pixels = _pixels(model).float().cuda()
    grid = GRID.cuda()

    def features(dtype):
        with torch.no_grad():
            out = model.to(dtype).model.visual(pixels.to(dtype), grid_thw=grid)
        return out.pooler_output.float()

    fp32, ref = features(torch.float32), features(torch.bfloat16)
    flash_calls = []
    real_flash = attention._flash_varlen
    monkeypatch.setattr(attention, "_flash_varlen", lambda *a: flash_calls.append(a[6]) or real_flash(*a))
    assert attention.use_varlen_vision_attention(model)
    got = features(torch.bfloat16)
    assert flash_calls == [attention._full_mask_kwargs()] * model.config.vision_config.depth
    floor = float((ref - fp32).norm() / fp32.norm())
    err = float((got - ref).norm() / ref.norm())
    assert err <= 2 * floor + 1e-3, (err, floor)


def test_varlen_flash_attends_fully_within_each_block_and_nowhere_else():
    """The non-causal packed path on the real kernel (bf16, head_dim 80 as in Qwen2.5-VL's vision tower): equal to
    fp32 SDPA run block by block, unmasked, to bf16 rounding; causal blocks and attention across blocks are both far
    off (the tiny encoders of the test above barely tell them apart)."""
    from trl_rejection import attention

    torch.manual_seed(0)
    lens = [64, 1, 300, 1024, 17]
    cu = torch.tensor([0, *lens], device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(1, 16, sum(lens), 80, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = False
    out, _ = attention.varlen_sdpa_attention_forward(module, q, k, v, None, scaling=80 ** -0.5, is_causal=False,
                                                     cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=1024,
                                                     max_length_k=1024)

    def per_block(causal):
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            *(t[:, :, s:e].float() for t in (q, k, v)), is_causal=causal) for s, e in zip(cu[:-1], cu[1:])], 2)

    ref = per_block(False).transpose(1, 2)
    err = float((out.float() - ref).abs().max())
    assert err < 2e-2, err
    causal = per_block(True).transpose(1, 2)
    leaky = torch.nn.functional.scaled_dot_product_attention(*(t.float() for t in (q, k, v))).transpose(1, 2)
    assert float((causal - ref).abs().max()) > 10 * err and float((leaky - ref).abs().max()) > 10 * err


def test_auto_checkpointing_keeps_layers_and_the_losses_of_full_checkpointing(tmp_path):
    """`checkpoint_layers="auto"` on a GPU, with its real memory readings: the first micro-batch runs fully
    checkpointed, the second measures one layer, then every layer of the tiny model fits uncheckpointed; LoRA dropout
    (recomputed) on. The losses are those of every layer checkpointed."""
    from peft import LoraConfig

    from trl_rejection.checkpointing import checkpointed_layers
    from trl_rejection.testing.tiny import make_model, make_processor
    from trl_rejection.trainer import RejectionSFTTrainer
    sys.path.insert(0, str(Path(__file__).parent))
    from test_trainer import LORA_TARGETS, config, mix

    proc = make_processor("llava-1.5")
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=LORA_TARGETS,
                      modules_to_save=["multi_modal_projector"])
    runs = {}
    for mode in ("all", "auto"):
        args = config(tmp_path / mode, use_cpu=False, bf16=True, max_steps=4, gradient_checkpointing=True,
                      checkpoint_layers=mode)
        trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=mix(),
                                      processing_class=proc, peft_config=peft)
        assert (trainer._auto_checkpointing is not None) == (mode == "auto")
        trainer.train()
        history = [h for h in trainer.state.log_history if "loss" in h]
        runs[mode] = ([h["loss"] for h in history], [h.get("uncheckpointed_layers") for h in history],
                      len(checkpointed_layers(trainer.model)))
    (losses_all, kept_all, _), (losses_auto, kept_auto, n_layers) = runs["all"], runs["auto"]
    assert kept_all == [None] * 4 and kept_auto == [0, 1, n_layers, n_layers], kept_auto
    assert losses_auto == losses_all

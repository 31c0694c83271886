"""recipes/sft_rejection.py as users run it: the default job, two CPU processes, kill-and-resume, the card."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "sft_rejection.py")
SMALL = ["--mix", json.dumps({"n_refusal": 16, "n_normal": 48}), "--eval_bundled", "false"]


def env(tmp_path: Path) -> dict:
    return {**os.environ, "TRL_REJECTION_CACHE": str(tmp_path / "cache"), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
            "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}


def launch(tmp_path: Path, *args: str, processes: int = 1, launch_args: tuple[str, ...] = (),
           **extra_env: str) -> subprocess.CompletedProcess:
    """Run the recipe through `accelerate launch`: on one CPU process, on two (`multi_cpu.yaml`), or as `launch_args`
    (options of `accelerate launch` itself, before the script) say; `extra_env` added to the environment."""
    # port 0: a free port, so two suites (the CI's version-matrix legs) can launch side by side
    how = (["--config_file", str(ROOT / "recipes" / "accelerate_configs" / "multi_cpu.yaml"), "--main_process_port",
            "0"] if processes == 2 else
           ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(launch_args or how), RECIPE, *args]
    proc = subprocess.run(cmd, env={**env(tmp_path), **extra_env}, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def order(path: Path) -> list[list[str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_job_trains_saves_evaluates_and_writes_the_card(tmp_path):
    out = launch(tmp_path).stdout  # no arguments: the embedded default (tiny.yaml)
    final = tmp_path / "outputs" / "sft_rejection_tiny" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert "Optimizer steps: 27." in out and "does not make any model safe" in out
    assert "| bundled | all |" in out
    card = (final / "README.md").read_text()
    for fact in ("base_model: tiny-llava", "20 refusal + 50 normal rows", "LoRA r=8, alpha=16",
                 "| projector learning rate | 0.001 |", "end-of-turn masked: True", "## Safety results",
                 "| bundled | all |", json.dumps("I'm sorry, but I cannot assist with your request")):
        assert fact in card, fact
    mix_card = (tmp_path / "outputs" / "sft_rejection_tiny" / "mix" / "README.md").read_text()
    assert "| rows in the mix | 20 | 50 |" in mix_card
    # a rerun into the same folder trains another model: its evaluation is generated anew, never resumed
    generations = tmp_path / "outputs" / "sft_rejection_tiny" / "eval_bundled" / "generations.jsonl"
    first = generations.read_text()
    launch(tmp_path, "--seed", "1", "--num_train_epochs", "1")
    second = generations.read_text()
    assert len(second.splitlines()) == len(first.splitlines()) == 18 and second != first


def test_two_cpu_processes_see_disjoint_data(tmp_path):
    launch(tmp_path, "--output_dir", "ddp", "--num_train_epochs", "1", "--record_data_order", "true", *SMALL,
           processes=2)
    seen = [{i for batch in order(tmp_path / "ddp" / f"data_order_rank{r}.jsonl") for i in batch} for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 32 and not seen[0] & seen[1]
    state = json.loads((tmp_path / "ddp" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # 64 rows / (2 processes x batch 8)


def test_killed_run_resumes_to_the_same_steps_and_data_order(tmp_path):
    args = ["--max_steps", "60", "--save_strategy", "steps", "--save_steps", "10", "--record_data_order", "true",
            *SMALL]
    launch(tmp_path, "--output_dir", "full", *args)
    cmd = [sys.executable, RECIPE, "--config", str(ROOT / "recipes" / "configs" / "tiny.yaml"),
           "--output_dir", "killed", *args]
    proc = subprocess.Popen(cmd, env=env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "checkpoint-20" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "killed").glob("checkpoint-*")
                  if (p / "trainer_state.json").exists())
    assert 20 <= done[-1] < 60, done
    partial = len(order(tmp_path / "killed" / "data_order_rank0.jsonl"))
    launch(tmp_path, "--output_dir", "killed", "--resume_from_checkpoint", f"killed/checkpoint-{done[-1]}", *args)
    state = json.loads((tmp_path / "killed" / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60
    full, resumed = order(tmp_path / "full" / "data_order_rank0.jsonl"), order(tmp_path / "killed" /
                                                                             "data_order_rank0.jsonl")[partial:]
    assert resumed[: 60 - done[-1]] == full[done[-1]: 60]
    # ... and trains as the uninterrupted run did: the same losses and learning rates at every logged step (except
    # the first log after the resume, which averages fewer steps than the uninterrupted run's), the same Adam state,
    # learning rate and adapter at the end
    uninterrupted = json.loads((tmp_path / "full" / "checkpoint-60" / "trainer_state.json").read_text())
    every = uninterrupted["logging_steps"]
    logged = {h["step"]: h for h in state["log_history"] if "loss" in h}
    compared = 0
    for h in uninterrupted["log_history"]:
        if "loss" not in h or done[-1] < h["step"] < done[-1] + every:
            continue
        for key in ("loss", "loss_refusal", "loss_normal", "learning_rate"):
            assert logged[h["step"]][key] == pytest.approx(h[key], rel=1e-4, abs=1e-8), (h["step"], key)
        compared += h["step"] > done[-1]
    assert compared >= 3
    from safetensors.torch import load_file

    a, b = (torch.load(tmp_path / run / "checkpoint-60" / "optimizer.pt", weights_only=True) for run in ("full",
                                                                                                        "killed"))
    assert a["state"].keys() == b["state"].keys() and a["state"]
    for index, sa in a["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa[key], b["state"][index][key], rtol=1e-4, atol=1e-8), (index, key)
    assert [g["lr"] for g in a["param_groups"]] == pytest.approx([g["lr"] for g in b["param_groups"]])
    weights = [load_file(tmp_path / run / "checkpoint-60" / "adapter_model.safetensors") for run in ("full", "killed")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])


NODE = """
import json, os, sys, time, importlib.util
import datasets
spec = importlib.util.spec_from_file_location("sft_rejection", sys.argv[1])
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
from trl_rejection import RejectionSFTConfig
from trl_rejection.errors import UserError
rank, log = int(os.environ["RANK"]), sys.argv[2]

def note(event, **kw):
    with open(log, "a") as f:
        f.write(json.dumps({"event": event, "rank": rank, "t": time.time(), **kw}) + "\\n")

real_build, real_load = recipe.build_mix, datasets.load_from_disk

building = []

def slow_build(*args, **kwargs):  # a build that takes a while: a reader that does not wait would see no mix
    note("build_start")
    building.append(1)
    time.sleep(2)
    out = real_build(*args, **kwargs)
    building.clear()
    note("build_end")
    return out

def load(path, *args, **kwargs):
    if not building:  # the builder's own reads while it writes are not the recipe's
        note("read_start")
    return real_load(path, *args, **kwargs)

recipe.build_mix, datasets.load_from_disk = slow_build, load
args = RejectionSFTConfig(os.environ["OUTPUT_DIR"], use_cpu=True, report_to="none")
script = recipe.ScriptArguments(mix=json.dumps({"n_refusal": 8, "n_normal": 24}), mix_build=sys.argv[3])
try:
    ds, where = recipe.load_mix(script, args, recipe.mix_config(script))
    note("loaded", rows=len(ds), ids=list(ds["id"]), local=args.local_process_index, index=args.process_index)
except UserError as e:
    note("missing", error=str(e))
"""


def two_nodes(tmp_path: Path, mode: str, shared_disk: bool) -> list[dict]:
    """Two processes, one per simulated node: global ranks 0 and 1, each its node's local main (LOCAL_RANK=0)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (tmp_path / "node.py").write_text(NODE)
    log = tmp_path / f"{mode}-{shared_disk}.jsonl"
    procs = []
    for rank in (0, 1):
        out = tmp_path / ("shared" if shared_disk else f"node{rank}") / mode
        node_env = {**env(tmp_path), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                    "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    "OUTPUT_DIR": str(out)}
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "node.py"), RECIPE, str(log), mode],
                                      env=node_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), "\n".join(o[-3000:] for o in outputs)
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_mix_is_built_once_on_the_global_main_and_read_by_every_node_after_it_is_written(tmp_path):
    """Two nodes sharing a disk, each with a local main process: only global rank 0 builds; the other node's
    local main reads only once the build has finished (before the fix it read straight away: no mix yet)."""
    events = two_nodes(tmp_path, "once", shared_disk=True)
    builds = [e for e in events if e["event"] == "build_start"]
    assert [e["rank"] for e in builds] == [0]
    end = next(e["t"] for e in events if e["event"] == "build_end")
    reads = [e for e in events if e["event"] == "read_start"]
    assert sorted(e["rank"] for e in reads) == [0, 1] and all(e["t"] >= end for e in reads)
    loaded = {e["rank"]: e for e in events if e["event"] == "loaded"}
    assert loaded[0]["local"] == loaded[1]["local"] == 0 and loaded[1]["index"] == 1  # two local mains
    assert loaded[0]["rows"] == loaded[1]["rows"] == 32 and loaded[0]["ids"] == loaded[1]["ids"]


def test_mix_build_per_node_for_nodes_without_a_shared_disk(tmp_path):
    """No shared disk: `once` tells the other node what to do instead of failing obscurely; `per_node` builds one
    identical copy on each node, each read only after its own build has finished."""
    events = two_nodes(tmp_path, "once", shared_disk=False)
    missing = [e for e in events if e["event"] == "missing"]
    assert [e["rank"] for e in missing] == [1] and "--mix_build per_node" in missing[0]["error"]
    events = two_nodes(tmp_path, "per_node", shared_disk=False)
    assert sorted(e["rank"] for e in events if e["event"] == "build_start") == [0, 1]
    for rank in (0, 1):
        end = next(e["t"] for e in events if e["event"] == "build_end" and e["rank"] == rank)
        assert all(e["t"] >= end for e in events if e["event"] == "read_start" and e["rank"] == rank)
    loaded = [e for e in events if e["event"] == "loaded"]
    assert len(loaded) == 2 and loaded[0]["rows"] == 32 and loaded[0]["ids"] == loaded[1]["ids"]


def test_missing_extras_fail_with_the_install_command(monkeypatch):
    import importlib.util

    from trl_rejection.extras import check_extras

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("flash_attn", "bitsandbytes") else real(name, *a))
    with pytest.raises(ImportError, match=r"trl-rejection\[flash-attn\]"):
        check_extras("flash_attention_2", False)
    with pytest.raises(ImportError, match=r"trl-rejection\[quantization\]"):
        check_extras("sdpa", True)
    check_extras("sdpa", False)


def test_push_model_uploads_the_folder_with_its_card(tmp_path, monkeypatch):
    from trl_rejection import hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))

        def upload_folder(self, folder_path, repo_id):
            calls.append(("upload", sorted(os.listdir(folder_path)), repo_id))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    (tmp_path / "README.md").write_text("card")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    assert hub.push_model(tmp_path, "me/model", private=True) == "https://huggingface.co/me/model"
    assert calls == [("create", "me/model", True), ("upload", ["README.md", "adapter_model.safetensors"], "me/model")]


def test_merge_adapter_saves_a_full_model(tmp_path):
    """The merged model is the base plus the trained adapter: each LoRA layer's weight is W + (B @ A) * alpha / r with
    the A and B the run trained (its last checkpoint holds them), the projector is the trained copy, and every other
    weight is the base's, unchanged."""
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from trl_rejection.testing.tiny import make_model, make_processor

    launch(tmp_path, "--output_dir", "merged", "--max_steps", "2", "--merge_adapter", "true", "--save_strategy",
           "steps", "--save_steps", "2", *SMALL)
    final = tmp_path / "merged" / "final"
    assert not (final / "adapter_config.json").exists()
    model = LlavaForConditionalGeneration.from_pretrained(final)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert "base_model: tiny-llava" in (final / "README.md").read_text()

    merged = model.state_dict()
    base = make_model("llava-1.5", make_processor("llava-1.5")).state_dict()  # the recipe's fixed tiny base
    checkpoint = tmp_path / "merged" / "checkpoint-2"
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    lora = json.loads((checkpoint / "adapter_config.json").read_text())
    scaling = lora["lora_alpha"] / lora["r"]
    prefix = "base_model.model."
    lora_layers = {k[len(prefix):-len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight")}
    saved = {k[len(prefix):].replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
             for k in adapter if ".modules_to_save." in k or "lora_" not in k}
    assert lora_layers and any("multi_modal_projector" in k for k in saved), sorted(adapter)[:5]
    assert set(merged) == set(base)
    for name, weight in merged.items():
        layer = name[: -len(".weight")]
        if layer in lora_layers:
            a, b = adapter[f"{prefix}{layer}.lora_A.weight"], adapter[f"{prefix}{layer}.lora_B.weight"]
            assert (b @ a).abs().max() > 0, f"{layer}: the trained adapter is still the identity"
            assert torch.allclose(weight, base[name] + (b @ a) * scaling, atol=1e-6), name
        elif name in saved:
            trained = next(v for k, v in adapter.items() if k[len(prefix):].replace(".modules_to_save.default.", ".")
                           .replace(".modules_to_save.", ".") == name)
            assert torch.equal(weight, trained) and not torch.equal(weight, base[name]), name
        else:
            assert torch.equal(weight, base[name]), f"{name} changed but is neither LoRA-adapted nor trained"


def test_paper_config_trains_a_model_loaded_from_a_local_directory(tmp_path):
    """The real-model path (AutoProcessor + the trainer loading a model id), with the paper's LoRA and projector
    settings from llava-1.5-7b.yaml, on a tiny LLaVA saved with `save_pretrained` (the Hub id replaced by a folder)."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from trl_rejection.testing.tiny import make_model, make_processor

    base = tmp_path / "tiny-llava-hf"
    processor = make_processor("llava-1.5")
    processor.save_pretrained(base)
    make_model("llava-1.5", processor).save_pretrained(base)
    launch(tmp_path, "--config", str(ROOT / "recipes" / "configs" / "llava-1.5-7b.yaml"),
           "--model_name_or_path", str(base), "--output_dir", "paper", "--use_cpu", "true", "--bf16", "false",
           "--dtype", "float32", "--max_steps", "2", "--per_device_train_batch_size", "4",
           "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0", "--save_strategy", "no", *SMALL)
    final = tmp_path / "paper" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["r"] == 128 and adapter["lora_alpha"] == 256
    assert adapter["modules_to_save"] == ["multi_modal_projector"]
    assert adapter["target_modules"].startswith(".*language_model.*")  # one regex: the LM's linears only
    card = (final / "README.md").read_text()
    assert f"base_model: {base}" in card and "| projector learning rate | 2e-05 |" in card
    model = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base), final)
    lora = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert lora and all(".language_model." in n for n in lora)  # the vision tower has no LoRA layers


@pytest.mark.parametrize("config,family", [("llava-1.5-7b", "llava-1.5"), ("llava-1.5-13b", "llava-1.5"),
                                           ("llava-next", "llava-next"), ("qwen2.5-vl-7b", "qwen2.5-vl"), ("qwen3-vl-8b", "qwen3-vl"),
                                           ("smolvlm", "smolvlm")])
def test_real_configs_put_lora_on_the_language_model_and_train_the_projector(config, family):
    """Each shipped model config, applied to a tiny model of its family: a typo in a module name would otherwise
    surface only on the user's GPU."""
    import importlib.util

    from peft import get_peft_model
    from trl import ModelConfig, TrlParser

    from trl_rejection import RejectionSFTConfig
    from trl_rejection.testing.tiny import make_model, make_processor

    spec = importlib.util.spec_from_file_location("sft_rejection", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    parser = TrlParser((recipe.ScriptArguments, RejectionSFTConfig, ModelConfig))
    yaml_path = str(ROOT / "recipes" / "configs" / f"{config}.yaml")
    _, args, model_args = parser.parse_args_and_config(["--config", yaml_path, "--output_dir", "unused",
                                                        "--bf16", "false", "--use_cpu", "true"])  # no GPU here
    assert args.projector_lr == 2e-5 and args.learning_rate == 2e-4 and args.num_train_epochs == 3
    model = get_peft_model(make_model(family, make_processor(family)), recipe.lora_config(model_args))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(("language_model" in n or "text_model" in n) and "vision" not in n and "visual" not in n
                        for n in lora)
    kinds = {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n in lora}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    projector = [n for n in trainable if "lora_" not in n]
    assert projector and all(any(f in n for f in args.projector_modules) for n in projector)


@pytest.mark.parametrize("args, message", [
    (["--output_dir", "."], "is the current folder or a parent of it"),
    (["--output_dir", "src"], "holds the input"),
    (["--dataset_path", "./no_such_mix"], "not found"),
    (["--dataset_path", "src/med.json"], "is a file, not a save_to_disk folder"),
    (["--mix", json.dumps({"n_refusal": 3})], "n_refusal and n_normal go together"),
    (["--profile_steps", "7-5"], "profile_steps: '7-5' is not a step range"),
])
def test_bad_paths_and_mix_blocks_stop_before_any_model_is_built(args, message, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "med.json").write_text("[]")
    sources = {"refusal_source": "src/med.json", "normal_source": "src/med.json", "n_refusal": 1, "n_normal": 1}
    base = ["--output_dir", "run", "--mix", json.dumps(sources)]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = subprocess.run([sys.executable, RECIPE, *base, *args], env=env(tmp_path), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0] and "Fix:" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, not even the output folder


@pytest.mark.parametrize("config", ["single_gpu", "multi_gpu"])
def test_the_commented_compile_block_of_the_accelerate_configs_switches_regional_compilation_on(tmp_path, config):
    """single_gpu.yaml and multi_gpu.yaml carry a commented `dynamo_config` block (README: compile the blocks).
    Uncommented, `accelerate launch` reads it and hands the processes the variables its Accelerator compiles by."""
    text = (ROOT / "recipes" / "accelerate_configs" / f"{config}.yaml").read_text()
    assert "# dynamo_config:" in text
    on = "\n".join(line[2:] if line.startswith(("# dynamo_config:", "#   dynamo_")) else line
                   for line in text.splitlines())
    (tmp_path / "on.yaml").write_text(on)
    (tmp_path / "env.py").write_text("import json, os\n"
                                     "print(json.dumps({k: v for k, v in os.environ.items() if 'DYNAMO' in k}))\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "on.yaml"), "--cpu",
           "--num_processes", "1", "--main_process_port", "0", str(tmp_path / "env.py")]
    proc = subprocess.run(cmd, env=env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["ACCELERATE_DYNAMO_BACKEND"] == "INDUCTOR"
    assert seen["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] == seen["ACCELERATE_DYNAMO_USE_DYNAMIC"] == "True"


def test_fsdp2_trains_under_regional_compilation_as_it_does_eager(tmp_path):
    """FSDP2 (fsdp.yaml, 2 gloo processes) under accelerate's regional compilation (README: compile the blocks), with
    the `aot_eager` backend (dynamo's capture and AOTAutograd as inductor gets them, without its slow C++ builds on
    CPU; inductor itself runs in the GPU test): dynamo traces the LoRA blocks (their graphs take the LoRA layers' base
    weights), the blocks compiled in place with FSDP2's hooks outside train to the eager run's losses (fp32 on CPU:
    within 1e-3 relative), and the saved adapter has the eager run's keys. On an accelerate that compiles nothing
    (before 1.15) the trainer warns instead."""
    from safetensors import safe_open

    def run(name: str, *compile_args: str) -> tuple[dict[int, float], str]:
        fsdp = ("--config_file", str(ROOT / "recipes" / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2",
                "--main_process_port", "0", "--mixed_precision", "no", *compile_args)
        proc = launch(tmp_path, "--output_dir", name, "--max_steps", "3", "--logging_steps", "1", "--save_strategy",
                      "steps", "--save_steps", "3", *SMALL, launch_args=fsdp, TORCH_LOGS="graph_code")
        history = json.loads((tmp_path / name / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
        return {h["step"]: h["loss"] for h in history if "loss" in h}, proc.stderr

    eager, eager_log = run("eager")
    compiled, log = run("compiled", "--dynamo_backend", "aot_eager", "--dynamo_use_regional_compilation",
                        "--dynamo_use_dynamic")
    import accelerate
    from packaging.version import Version

    from trl_rejection.distributed import REGIONAL_COMPILATION_MIN_ACCELERATE

    if Version(accelerate.__version__) >= Version(REGIONAL_COMPILATION_MIN_ACCELERATE):
        assert "base_layer_parameters_weight" in log and "base_layer_parameters_weight" not in eager_log, \
            "dynamo traced no LoRA block"
    else:  # an older accelerate compiles nothing: the trainer says so (the oldest-versions CI leg)
        assert "compiles none of this model's blocks" in log
    assert sorted(compiled) == sorted(eager) == [1, 2, 3]
    for step, loss in eager.items():
        assert abs(compiled[step] - loss) <= 1e-3 * loss, (step, compiled[step], loss)
    keys = []
    for name in ("eager", "compiled"):
        with safe_open(tmp_path / name / "final" / "adapter_model.safetensors", "pt") as f:
            keys.append(sorted(f.keys()))
    assert keys[0] == keys[1] and keys[0]

"""RejectionSFTTrainer on tiny random models, on CPU: training, saving, masking effect, logging, errors."""

from __future__ import annotations

import sys
import types

import datasets
import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel
from PIL import Image

from trl_rejection.collator import RejectionDataCollator
from trl_rejection.config import RejectionSFTConfig
from trl_rejection.constants import DEFAULT_REFUSAL, IGNORE_INDEX
from trl_rejection.testing.tiny import make_model, make_processor
from trl_rejection.trainer import RejectionSFTTrainer

LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PROJECTOR = {"llava-1.5": "multi_modal_projector", "qwen2-vl": "merger"}
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def mix(n_normal: int = 6, n_refusal: int = 2, images: bool = True) -> datasets.Dataset:
    rows = []
    for i in range(n_normal + n_refusal):
        refusal = i >= n_normal
        color = ["red", "green", "blue", "yellow"][i % 4]
        rows.append({
            "id": str(i), "source": "test", "is_refusal": refusal,
            "messages": [
                {"role": "user", "content": [{"type": "image", "text": None}] * images
                 + [{"type": "text", "text": f"What colour is picture {i}?"}]},
                {"role": "assistant", "content": [{"type": "text",
                                                   "text": DEFAULT_REFUSAL if refusal else f"It is {color}."}]}],
            "images": [Image.new("RGB", (32, 32), COLORS[i % 4])] if images else []})
    return datasets.Dataset.from_list(rows)


def config(tmp_path, **kw) -> RejectionSFTConfig:
    base = dict(use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, max_steps=8,
                per_device_train_batch_size=8, learning_rate=1e-2, warmup_steps=0, seed=0,
                dataloader_num_workers=0)
    return RejectionSFTConfig(str(tmp_path / "out"), **{**base, **kw})


@pytest.mark.parametrize("family", ["llava-1.5", "qwen2-vl"])
def test_lora_training_loss_falls_and_adapter_reloads_and_generates(family, tmp_path):
    proc = make_processor(family)
    model = make_model(family, proc)
    model.save_pretrained(tmp_path / "base")
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      modules_to_save=[PROJECTOR[family]])
    args = config(tmp_path, max_steps=25, projector_modules=[PROJECTOR[family]], projector_lr=1e-3)
    trainer = RejectionSFTTrainer(model, args=args, train_dataset=mix(), processing_class=proc, peft_config=peft)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # A 32-wide random model stays near-uniform over its vocabulary, so the loss moves little but steadily
    # while the labelled tokens become the top-1 prediction.
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.3, [h["loss"] for h in logs]
    assert logs[0]["mean_token_accuracy"] < 0.2 < 0.5 < logs[-1]["mean_token_accuracy"]
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    batch = RejectionDataCollator(proc)([dict(mix()[0])])
    batch.pop("is_refusal")
    with torch.no_grad():
        untrained = type(model).from_pretrained(tmp_path / "base")(**batch).logits
        reloaded = PeftModel.from_pretrained(type(model).from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        trained = trainer.model.eval()(**batch).logits.float()
        got = reloaded.eval()(**batch).logits
    assert (got - trained).abs().max() < 0.02 < (got - untrained).abs().max()  # bf16 autocast on CPU: 0.02
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = proc(text=[text], images=[mix()[0]["images"]], return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert prompt["input_ids"].shape[1] < generated.shape[1] <= prompt["input_ids"].shape[1] + 4


def _eos_probability(model, proc, row) -> float:
    """P(end of turn) right after the refusal sentence."""
    batch = RejectionDataCollator(proc, mask_refusal_eos=False)([row])
    pos = int((batch["labels"][0] != IGNORE_INDEX).nonzero().max())  # the end-of-turn token
    batch.pop("labels"), batch.pop("is_refusal")
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    return float(torch.softmax(logits[0, pos - 1].float(), -1)[batch["input_ids"][0, pos]])


def test_masking_refusal_eos_keeps_the_model_from_learning_to_stop(tmp_path):
    proc = make_processor("llava-1.5")
    data = mix(n_normal=0, n_refusal=8)
    probe = dict(data[0])
    start = _eos_probability(make_model("llava-1.5", proc), proc, probe)
    after = {}
    for masked in (True, False):
        model = make_model("llava-1.5", proc)
        args = config(tmp_path, max_steps=40, learning_rate=1e-2, mask_refusal_eos=masked)
        RejectionSFTTrainer(model, args=args, train_dataset=data, processing_class=proc).train()
        after[masked] = _eos_probability(model, proc, probe)
    assert after[False] > 0.5 > 20 * start, (start, after)  # unmasked: the model learns to stop right there
    assert after[True] < 10 * start, (start, after)  # masked: near where it started


def test_split_loss_and_token_counts_are_logged(tmp_path):
    proc = make_processor("llava-1.5")
    data = mix(n_normal=5, n_refusal=3)
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path, max_steps=1),
                                  train_dataset=data, processing_class=proc)
    trainer.train()
    logged = trainer.state.log_history[0]
    labels = RejectionDataCollator(proc)([dict(r) for r in data])["labels"][:, 1:] != IGNORE_INDEX
    refusal = torch.tensor(data["is_refusal"])[:, None]
    assert logged["refusal_tokens"] == int((labels & refusal).sum())
    assert logged["normal_tokens"] == int((labels & ~refusal).sum())
    n_ref, n_norm = logged["refusal_tokens"], logged["normal_tokens"]
    mean = (logged["loss_refusal"] * n_ref + logged["loss_normal"] * n_norm) / (n_ref + n_norm)
    assert mean == pytest.approx(logged["loss"], rel=1e-3)


def test_split_losses_do_not_depend_on_how_the_global_batch_is_split(tmp_path):
    """8 rows as one batch or as 2 accumulated batches of 4: the same loss and split losses (pooled over every
    labelled token of the step, as on N processes), not the mean of per-micro-batch means."""
    proc = make_processor("llava-1.5")
    data = mix(n_normal=5, n_refusal=3)
    logged = []
    for bs, accumulation in ((8, 1), (4, 2)):
        args = config(tmp_path / str(bs), max_steps=1, per_device_train_batch_size=bs,
                      gradient_accumulation_steps=accumulation, learning_rate=0.0)
        trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=data,
                                      processing_class=proc)
        trainer.train()
        logged.append(trainer.state.log_history[0])
    one, two = logged
    for key in ("loss", "loss_refusal", "loss_normal"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key
    assert two["refusal_tokens"] * 2 == one["refusal_tokens"]  # token counts stay per micro-batch


def test_fsdp_wraps_the_blocks_each_model_has():
    from trl_rejection.distributed import fsdp_layer_classes

    llava = fsdp_layer_classes(make_model("llava-1.5", make_processor("llava-1.5")))
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= set(llava) and "CLIPTextEmbeddings" not in llava
    qwen = fsdp_layer_classes(make_model("qwen2-vl", make_processor("qwen2-vl")))
    assert "Qwen2VLDecoderLayer" in qwen and "LlamaDecoderLayer" not in qwen


def test_projector_groups_are_built_when_the_optimizer_is_created(tmp_path, monkeypatch):
    """The optimizer receives the projector's own groups at construction (weight-decay split kept, projector at
    projector_lr), also for an `optimizer_cls_and_kwargs` optimizer; a ready optimizer or an optimizer that assigns
    parameters itself is refused with projector_lr, and so is a projector that trains no parameter."""
    proc = make_processor("llava-1.5")
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, modules_to_save=["multi_modal_projector"])
    received = []

    class Spy(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            received.append([dict(g) for g in params])
            super().__init__(params, **kwargs)

    def make(**kw):
        return RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path, projector_lr=2e-5,
                                   weight_decay=0.1), train_dataset=mix(), processing_class=proc,
                                   peft_config=kw.pop("peft_config", peft), **kw)

    for kw in ({}, {"optimizer_cls_and_kwargs": (Spy, {"lr": 1e-2})}):
        trainer = make(**kw)
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        decay = set(trainer.get_decay_parameter_names(trainer.model))
        optimizer = trainer.create_optimizer()
        assert trainer.create_optimizer() is optimizer
        groups = received.pop() if kw else optimizer.param_groups
        assert not received
        seen = set()
        for g in groups:
            in_projector = {"multi_modal_projector" in names[id(p)] for p in g["params"]}
            decayed = {names[id(p)] in decay for p in g["params"]}
            assert len(in_projector) == len(decayed) == 1, g
            assert g.get("lr", 1e-2) == (2e-5 if in_projector.pop() else 1e-2)
            assert g["weight_decay"] == (0.1 if decayed.pop() else 0.0)
            seen |= {id(p) for p in g["params"]}
        assert seen == {id(p) for p in trainer.model.parameters() if p.requires_grad}
        assert len(optimizer.param_groups) == len(groups) == 3  # LoRA (decay), projector weights, projector biases
    overrides = []  # an 8-bit bitsandbytes optimizer: embeddings keep 32-bit states, as Trainer does
    manager = types.SimpleNamespace(register_module_override=lambda m, name, cfg: overrides.append((m, name, cfg)))
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(optim=types.SimpleNamespace(
        GlobalOptimManager=types.SimpleNamespace(get_instance=lambda: manager))))

    class AdamW8bit(torch.optim.AdamW):
        __module__ = "bitsandbytes.optim.adamw"

        def __init__(self, params, optim_bits=32, **kwargs):
            super().__init__(params, **kwargs)

    trainer = make(optimizer_cls_and_kwargs=(AdamW8bit, {"lr": 1e-2, "optim_bits": 8}))
    trainer.create_optimizer()
    embeddings = [m for m in trainer.model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and overrides == [(m, "weight", {"optim_bits": 32}) for m in embeddings]
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        make(optimizers=(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="assigns the parameters itself"):
        make(optimizer_cls_and_kwargs=(lambda: None, {})).create_optimizer()
    with pytest.raises(ValueError, match="modules_to_save"):
        make(peft_config=LoraConfig(r=4, target_modules=LORA_TARGETS)).create_optimizer()


def test_config_fields_are_documented_as_in_sft_config():
    """Every field RejectionSFTConfig declares has a docstring entry `name (`type`, *optional*, defaults to `v`):`
    whose text is its `help`, word for word, and whose default is the field's."""
    import ast
    import dataclasses
    import re

    from trl_rejection.validation import own_fields

    doc = RejectionSFTConfig.__doc__
    entries = {m["name"]: m for m in re.finditer(r"^ {8}(?P<name>\w+) \((?P<spec>.*)\):\n(?P<text>(?: {12}.*\n?)+)",
                                                  doc, re.MULTILINE)}
    fields = {f.name: f for f in dataclasses.fields(RejectionSFTConfig)}
    assert set(own_fields(RejectionSFTConfig)) <= set(entries), set(own_fields(RejectionSFTConfig)) - set(entries)
    assert set(entries) <= set(own_fields(RejectionSFTConfig)), set(entries) - set(own_fields(RejectionSFTConfig))
    for name, entry in entries.items():
        f = fields[name]
        assert " ".join(entry["text"].split()) == " ".join(f.metadata["help"].split()), name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        documented = re.search(r"defaults to `(.*)`$", entry["spec"])
        assert (ast.literal_eval(documented[1]) if documented else None) == default, name
        assert not re.search(r"\d,\d{3}|tokens/s|GiB", entry["text"]), f"{name}: measured numbers go to RESULTS"


def test_trainer_init_takes_sft_trainer_parameters_and_documents_them():
    import inspect

    from trl import SFTTrainer

    ours = inspect.signature(RejectionSFTTrainer.__init__).parameters
    theirs = inspect.signature(SFTTrainer.__init__).parameters
    assert list(ours) == list(theirs)
    assert all(ours[n].default == theirs[n].default for n in ours if n != "self")
    assert all(f"        {n} (" in RejectionSFTTrainer.__doc__ for n in ours if n != "self")


def test_args_are_not_modified_and_remove_unused_columns_stays_off(tmp_path):
    """TRL gets a copy of the config with its own padding_free off; the caller's config keeps every value."""
    proc = make_processor("llava-1.5")
    args = config(tmp_path)
    before = args.to_dict()
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=mix(),
                                  processing_class=proc)
    assert args.to_dict() == before and args.padding_free and trainer.padding_free
    assert trainer.args is not args and not trainer.args.padding_free
    assert trainer.data_collator.padding_free and not trainer.args.remove_unused_columns
    with pytest.raises(ValueError, match="remove_unused_columns"):
        config(tmp_path, remove_unused_columns=True)


def test_text_only_model_trains_on_a_text_only_mix(tmp_path):
    tok = make_processor("qwen2.5-text")
    trainer = RejectionSFTTrainer(make_model("qwen2.5-text", tok), args=config(tmp_path, max_steps=3),
                                  train_dataset=mix(images=False), processing_class=tok)
    trainer.train()
    assert trainer.state.global_step == 3 and "loss_refusal" in trainer.state.log_history[0]


def test_clear_errors(tmp_path):
    proc, tok = make_processor("llava-1.5"), make_processor("qwen2.5-text")
    with pytest.raises(ValueError, match="needs a `messages` column"):
        RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path),
                            train_dataset=datasets.Dataset.from_list([{"text": "hi"}]), processing_class=proc)
    no_flag = mix().remove_columns("is_refusal")
    with pytest.raises(ValueError, match="refusal sentences"):
        RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path, refusal_sentences=["Nope."]),
                            train_dataset=no_flag, processing_class=proc)
    with pytest.raises(ValueError, match="not a vision-language model"):
        RejectionSFTTrainer(make_model("qwen2.5-text", tok), args=config(tmp_path), train_dataset=mix(),
                            processing_class=tok)


def test_checkpoints_resume_with_gradient_checkpointing(tmp_path):
    proc = make_processor("llava-1.5")
    args = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, gradient_checkpointing=True,
                  per_device_train_batch_size=4)
    RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=mix(),
                        processing_class=proc).train()
    assert (tmp_path / "out" / "checkpoint-2").is_dir() and (tmp_path / "out" / "checkpoint-4").is_dir()
    resumed = RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=mix(),
                                  processing_class=proc)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3, 4]


@pytest.mark.parametrize("keep_fp32", [True, False])
def test_a_half_precision_model_trains_its_projector_in_fp32_under_mixed_precision(tmp_path, keep_fp32):
    """A bf16 checkpoint under bf16 mixed precision (the paper config on one GPU or DDP): while training, the
    trainable parameters are float32 masters, so the projector's lr-2e-5 Adam steps move its weights; kept in bf16
    (the option off), most of those steps round away. After training the model is the checkpoint's dtype again
    (the frozen base never leaves bf16), and generates."""
    from transformers import TrainerCallback

    from trl_rejection.generation import greedy_generate

    proc = make_processor("llava-1.5")
    model = make_model("llava-1.5", proc).to(torch.bfloat16)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, modules_to_save=["multi_modal_projector"])
    args = config(tmp_path, bf16=True, max_steps=1, learning_rate=2e-4, projector_lr=2e-5, max_grad_norm=0.0,
                  fp32_trainable_params=keep_fp32)
    seen = {}

    class AtTrainEnd(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            seen.update({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})

    trainer = RejectionSFTTrainer(model, args=args, train_dataset=mix(), processing_class=proc, peft_config=peft,
                                  callbacks=[AtTrainEnd()])
    projector = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters()
                 if p.requires_grad and "multi_modal_projector" in n and n.endswith("weight")}  # (biases start at 0)
    before = {n: p.dtype for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert projector and {seen[n].dtype for n in projector} == {torch.float32 if keep_fp32 else torch.bfloat16}
    moved = [(seen[n].float() != w).float().mean().item() for n, w in projector.items()]
    if keep_fp32:
        assert min(moved) > 0.99 and {p.dtype for p in seen.values()} == {torch.float32}, moved
    else:
        assert max(moved) < 0.5, moved
    assert {n: p.dtype for n, p in trainer.model.named_parameters()} == before  # as it came: LoRA fp32, rest bf16
    row = mix(n_normal=1, n_refusal=0)[0]
    prompt = proc.apply_chat_template(row["messages"][:1], add_generation_prompt=True)
    assert len(greedy_generate(trainer.model.eval(), proc, [prompt], [row["images"]], max_new_tokens=3)) == 1


def test_qlora_leaves_the_fully_trained_modules_unquantized(tmp_path, monkeypatch):
    """A 4-bit projector cannot be trained (PEFT: "only Tensors of floating point dtype can require gradients"): the
    trainer adds `modules_to_save` to the bitsandbytes config's skip list, keeping transformers' default (lm_head),
    without changing the caller's config."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.quantizers_utils import should_convert_module
    from trl import SFTTrainer

    from trl_rejection.extras import keep_trained_modules_unquantized

    seen = {}

    def fake_init(self, model, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    monkeypatch.setattr(SFTTrainer, "__init__", fake_init)
    given = BitsAndBytesConfig(load_in_4bit=True)
    peft = LoraConfig(r=4, target_modules=LORA_TARGETS, modules_to_save=["multi_modal_projector"])
    with pytest.raises(RuntimeError, match="stop"):
        RejectionSFTTrainer(make_model("llava-1.5", make_processor("llava-1.5")), args=config(tmp_path),
                            train_dataset=mix(), processing_class=make_processor("llava-1.5"), peft_config=peft,
                            quantization_config=given)
    skip = seen["quantization_config"].llm_int8_skip_modules
    assert skip[0] == "lm_head" and len(skip) == 2 and given.llm_int8_skip_modules is None
    for name in ("model.multi_modal_projector.linear_1", "multi_modal_projector", "a.b.multi_modal_projector.c"):
        assert not should_convert_module(name, skip), name
    assert should_convert_module("model.language_model.layers.0.mlp.up_proj", skip)
    own = BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["vision_tower"])
    kept = keep_trained_modules_unquantized(own, ["visual.deepstack_merger_list.0"]).llm_int8_skip_modules
    assert not should_convert_module("model.visual.deepstack_merger_list.0.linear_fc1", kept)
    assert should_convert_module("model.visual.deepstack_merger_list.1.linear_fc1", kept)
    assert not should_convert_module("vision_tower.encoder", kept)
    assert keep_trained_modules_unquantized(own, []) is own


def test_a_gemma3_loaded_by_name_with_eager_attention_trains_padded(tmp_path, caplog):
    """Gemma 3 packs with SDPA only: loaded from a directory with `attn_implementation="eager"` (the recipe's
    `--attn_implementation eager`), the trainer falls back to padded batches with a warning naming the reason,
    instead of failing when it switches the attention."""
    proc = make_processor("gemma3")
    make_model("gemma3", proc).save_pretrained(tmp_path / "gemma3")
    proc.save_pretrained(tmp_path / "gemma3")
    data = mix(images=False)
    args = config(tmp_path, max_steps=1, model_init_kwargs={"attn_implementation": "eager"})
    with caplog.at_level("WARNING"):
        trainer = RejectionSFTTrainer(str(tmp_path / "gemma3"), args=args, train_dataset=data, processing_class=proc)
    assert not trainer.padding_free and "needs attn_implementation='sdpa'" in caplog.text
    args = config(tmp_path, max_steps=1, model_init_kwargs={"attn_implementation": "sdpa"})
    assert RejectionSFTTrainer(str(tmp_path / "gemma3"), args=args, train_dataset=data,
                               processing_class=proc).padding_free


def test_checkpointing_only_every_n_layers_reaches_the_model(tmp_path):
    """`gradient_checkpointing_kwargs={"every_n_layers": 2}` (transformers' lever: every other block keeps its
    activations) survives the trainer's own set-up: half the blocks are checkpointed while training runs."""
    proc = make_processor("llava-1.5")
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, modules_to_save=["multi_modal_projector"])
    seen = {}

    class Look(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen["flags"] = [m.gradient_checkpointing for m in model.modules()
                             if isinstance(m, transformers.modeling_layers.GradientCheckpointingLayer)]

    for every in (1, 2):
        args = config(tmp_path, max_steps=1, gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"every_n_layers": every})
        RejectionSFTTrainer(make_model("llava-1.5", proc), args=args, train_dataset=mix(), processing_class=proc,
                            peft_config=peft, callbacks=[Look()]).train()
        flags = seen.pop("flags")
        assert len(flags) >= 4 and flags == [i % every == 0 for i in range(len(flags))]


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16, None])
def test_the_forward_runs_under_autocast_where_the_fsdp2_policy_is_set(tmp_path, monkeypatch, half):
    """accelerate autocasts the forward on one device and under DDP, but under FSDP2 applies only the mixed-precision
    policy, so ops that CUDA autocast runs in float32 (LayerNorm: the CLIP tower's residual stream) ran in bf16 and
    sharded losses drifted from one GPU's. Where `setup_fsdp_precision` sets its policy (FSDP2, bf16/fp16,
    `fsdp_autocast_precision`), the trainer autocasts the forward in the policy's dtype itself, in training and in
    evaluation (through `Trainer.compute_loss_context_manager`); elsewhere (`half=None`) it adds no autocast.
    Simulated on CPU: accelerate runs FSDP configs as DDP there; the 2-GPU run is
    `test_sharded_configs_run_layer_norms_in_float32_as_one_gpu_does`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from trl_rejection import distributed

    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32, output_dtype=None,
                                  cast_forward_inputs=False) if half else None
    monkeypatch.setattr(distributed, "setup_fsdp_precision", lambda accelerator, enabled=True: policy)
    proc = make_processor("llava-1.5")
    model = make_model("llava-1.5", proc)
    seen = set()

    def record(module, args):
        enabled = torch.is_autocast_enabled("cpu")
        seen.add((module.training, enabled, torch.get_autocast_dtype("cpu") if enabled else None))

    norms = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    peft = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, modules_to_save=["multi_modal_projector"])
    args = config(tmp_path, max_steps=1, bf16=False)  # accelerate adds no autocast of its own
    trainer = RejectionSFTTrainer(model, args=args, train_dataset=mix(), eval_dataset=mix(2, 1),
                                  processing_class=proc, peft_config=peft)
    trainer.train()
    trainer.evaluate()
    assert len(norms) > 2 and seen == {(True, half is not None, half), (False, half is not None, half)}


def test_the_first_training_step_gathers_every_fsdp2_unit_once(tmp_path, monkeypatch):
    """Before its first micro-batch the trainer hands the model it trains to `gather_fsdp2_units_once` (torch's FSDP2
    fails under gradient accumulation on a unit never all-gathered; tests/test_distributed.py), once per trainer,
    not at every micro-batch."""
    from trl_rejection import distributed

    seen = []
    monkeypatch.setattr(distributed, "gather_fsdp2_units_once", lambda model: seen.append(model) or 0)
    proc = make_processor("llava-1.5")
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path, max_steps=2),
                                  train_dataset=mix(), processing_class=proc)
    trainer.train()
    assert trainer.state.global_step == 2 and len(seen) == 1 and seen[0] is trainer.model_wrapped


def test_split_loss_sums_stay_on_the_device_until_the_log_sums_them_over_the_processes(tmp_path, monkeypatch):
    """Each micro-batch adds its refusal / normal sums to tensors (no `.item()` / `.tolist()`: on a GPU those make
    the host wait every micro-batch); `log` sums them over the processes once (`accelerator.reduce`) and logs the
    pooled losses and the token counts per micro-batch of one process."""
    from trl_rejection.packing import token_row_index
    from trl_rejection.split_loss import split_loss_sums

    proc = make_processor("llava-1.5")
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path), train_dataset=mix(),
                                  processing_class=proc)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batches = [trainer.data_collator([rows[i] for i in (0, 1, 2, 6)]),
               trainer.data_collator([rows[i] for i in (3, 4, 5, 7)])]
    assert all(bool(b["is_refusal"].any()) for b in batches)
    expected = torch.zeros(4, dtype=torch.float64)
    trainer.model.eval()  # the same sums, without dropout
    for batch in batches:
        out = trainer.model(**{k: v for k, v in batch.items() if k != "is_refusal"})
        rows_of_tokens = token_row_index(batch, batch["labels"].shape)
        expected += split_loss_sums(out, batch["labels"], batch["is_refusal"], rows_of_tokens).double()

    def no_host_read(*args, **kwargs):
        raise AssertionError("a host read of a device tensor in _log_split_loss")

    log_split_loss = trainer._log_split_loss

    def checked(*args, **kwargs):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__float__", "__bool__"):
                m.setattr(torch.Tensor, name, no_host_read)
            log_split_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "_log_split_loss", checked)
    reduced = []

    def two_processes(tensor, reduction):  # a second process with the same sums
        reduced.append((tensor.clone(), reduction))
        return tensor * 2

    monkeypatch.setattr(trainer.accelerator, "reduce", two_processes)
    with torch.no_grad():
        for batch in batches:
            trainer.compute_loss(trainer.model, dict(batch))
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    (sums, reduction), = reduced
    assert reduction == "sum" and sums.dtype == torch.float64
    assert torch.allclose(sums, expected, rtol=1e-5)
    ref_nll, ref_n, norm_nll, norm_n = expected.tolist()
    assert logged["eval_loss_refusal"] == pytest.approx(ref_nll / ref_n, rel=1e-5)
    assert logged["eval_loss_normal"] == pytest.approx(norm_nll / norm_n, rel=1e-5)
    assert logged["eval_refusal_tokens"] == 2 * ref_n / 2 and logged["eval_normal_tokens"] == 2 * norm_n / 2
    trainer.log({"loss": 1.0})  # nothing kept since: no second reduce, no split losses
    assert len(reduced) == 1 and "eval_loss_refusal" not in trainer.state.log_history[-1]
    trainer.model.train()  # training micro-batches are kept apart from evaluation ones and logged without a prefix
    trainer.compute_loss(trainer.model, dict(batches[0]))
    trainer.model.eval()
    trainer.log({"loss": 1.0})
    assert len(reduced) == 1 and "eval_loss_refusal" not in trainer.state.log_history[-1]
    trainer.model.train()
    trainer.log({"loss": 1.0})
    assert len(reduced) == 2 and "loss_refusal" in trainer.state.log_history[-1]


def test_batches_move_to_the_device_without_a_host_wait(tmp_path):
    """RejectionSFTConfig turns on accelerate's `non_blocking` (the copy of each batch to the device no longer makes
    the host wait for the GPU), and keeps the value where the user's `accelerator_config` sets it."""
    proc = make_processor("llava-1.5")
    trainer = RejectionSFTTrainer(make_model("llava-1.5", proc), args=config(tmp_path), train_dataset=mix(),
                                  processing_class=proc)
    assert trainer.accelerator.dataloader_config.non_blocking is True
    kept = config(tmp_path, accelerator_config={"non_blocking": False, "even_batches": False})
    assert kept.accelerator_config.non_blocking is False and kept.accelerator_config.even_batches is False
    assert config(tmp_path, accelerator_config={"even_batches": False}).accelerator_config.non_blocking is True
    # the CLI's JSON string and a JSON file, as transformers reads them, get the default too (or keep their value)
    path = tmp_path / "accelerator.json"
    path.write_text('{"even_batches": false}')
    for given, non_blocking, even in (('{"even_batches": false}', True, False), (str(path), True, False),
                                      ('{"non_blocking": false}', False, True)):
        args = config(tmp_path, accelerator_config=given)
        assert (args.accelerator_config.non_blocking, args.accelerator_config.even_batches) == (non_blocking, even)
    assert config(tmp_path, dataloader_pin_memory=False).accelerator_config.non_blocking is False  # nothing pinned
    with pytest.raises(ValueError, match="neither a JSON object nor a readable JSON file"):
        config(tmp_path, accelerator_config=str(tmp_path / "missing.json"))

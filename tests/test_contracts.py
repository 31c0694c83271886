"""Contracts with private internals of TRL, transformers, datasets, accelerate, PEFT and DeepSpeed's transformers
integration that trl_rejection relies on because no public API does the job.

One test per internal. Each fails with a message that names the internal, where this package uses it and what to do,
so a release that changes one of them shows up here, by name, not as an obscure failure elsewhere. The list of
internals, with the reason each has no public replacement, is `docs/internals.md`; the last tests keep that list and
the sources in step (every private use found in `trl_rejection/` and `recipes/` must be listed there, and every
contract test named there must exist here).

Everything runs on CPU, offline, on the tiny random models of `trl_rejection.testing`.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
import textwrap
import weakref
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from trl_rejection.testing.tiny import make_model, make_processor

from trl_rejection.config import RejectionSFTConfig
from trl_rejection.distributed import sharded_backend, without_zero3
from trl_rejection.trainer import RejectionSFTTrainer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "internals.md"
REFUSAL = "I'm sorry, but I cannot assist with your request."


def skip_unless_used(text: str) -> None:
    """Skip a contract test whose internal the package no longer uses (then delete the test and its row in
    docs/internals.md)."""
    files = list((ROOT / "trl_rejection").rglob("*.py")) + list((ROOT / "recipes").glob("*.py"))
    if not any(text in p.read_text(encoding="utf-8") for p in files):
        pytest.skip(f"`{text}` is no longer used by trl_rejection/ or recipes/: delete this test and its row in "
                    "docs/internals.md")


@contextlib.contextmanager
def contract(internal: str, where: str, fix: str):
    """Turn any failure inside into one message: which upstream internal changed, who relies on it, what to do."""
    try:
        yield
    except Exception as e:  # AssertionError included
        pytest.fail(f"Upstream contract broken: {internal}.\n  Used by: {where}.\n  What to do: {fix}\n"
                    f"  (docs/internals.md lists every such internal.)\n  Failure: {type(e).__name__}: {e}",
                    pytrace=False)


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: one tiny LLaVA trainer for the trainer-side contracts
# --------------------------------------------------------------------------------------------------------------------

def rows(n_normal: int = 3, n_refusal: int = 2) -> datasets.Dataset:
    out = []
    for i in range(n_normal + n_refusal):
        refusal = i >= n_normal
        out.append({"id": str(i), "source": "contract", "is_refusal": refusal,
                    "messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                              {"type": "text", "text": f"What is in picture {i}?"}]},
                                 {"role": "assistant", "content": [{"type": "text",
                                                                    "text": REFUSAL if refusal else f"Colour {i}."}]}],
                    "images": [Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i))]})
    return datasets.Dataset.from_list(out)


def make_args(tmp_path, **kw) -> RejectionSFTConfig:
    base = dict(use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, max_steps=1, bf16=False,
                per_device_train_batch_size=5, learning_rate=1e-3, warmup_steps=0, seed=0,
                dataloader_num_workers=0)
    return RejectionSFTConfig(str(tmp_path / "out"), **{**base, **kw})


@pytest.fixture(scope="module")
def llava():
    processor = make_processor("llava-1.5")
    return make_model("llava-1.5", processor), processor


@pytest.fixture(scope="module")
def trainer(llava, tmp_path_factory):
    model, processor = llava
    return RejectionSFTTrainer(model, args=make_args(tmp_path_factory.mktemp("contract")), train_dataset=rows(),
                               processing_class=processor)


# --------------------------------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------------------------------

def test_trl_fused_lm_head_outputs_log_probs_of_the_shifted_labels(trainer):
    """SFTTrainer.compute_loss calls the model with TRL's fused LM head: the output RejectionSFTTrainer's forward hook
    captures carries `log_probs` shaped like `labels[:, 1:]`, the log-probability of each next-token label, zero where
    the label is -100."""
    skip_unless_used('log_probs')
    with contract("trl.SFTTrainer.compute_loss -> model output `.log_probs` (trl.trainer.utils.FusedCausalLMOutput, "
                  "shape labels[:, 1:], zero on ignored labels)",
                  "trl_rejection/trainer.py RejectionSFTTrainer.compute_loss (forward hook) and "
                  "trl_rejection/split_loss.py split_loss_sums",
                  "read the new output field in split_loss_sums (it falls back to `outputs.logits` only when "
                  "`log_probs` is absent) and keep its shift aligned with the labels."):
        batch = trainer.data_collator([dict(r) for r in rows()])
        batch.pop("is_refusal")
        labels = batch["labels"]
        captured = {}
        handle = trainer.model.register_forward_hook(lambda m, a, k, out: captured.setdefault("out", out),
                                                     with_kwargs=True)
        trainer.model.eval()
        try:
            with torch.no_grad():
                trainer.compute_loss(trainer.model, dict(batch))
        finally:
            handle.remove()
        log_probs = getattr(captured["out"], "log_probs", None)
        assert log_probs is not None, f"the captured output has no log_probs: {type(captured['out']).__name__}"
        assert log_probs.shape == labels[:, 1:].shape, (log_probs.shape, labels.shape)
        plain = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            logits = trainer.model(**plain).logits[:, :-1].float()
        targets = labels[:, 1:]
        expected = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        expected = expected * (targets != -100)
        assert torch.allclose(log_probs.float(), expected, atol=1e-4), (log_probs - expected).abs().max()


def test_trl_tag_names_reach_the_model_tags(trainer):
    skip_unless_used('_tag_names')
    with contract("trl.SFTTrainer._tag_names (class attribute passed to model.add_model_tags)",
                  "trl_rejection/trainer.py RejectionSFTTrainer._tag_names (model card tags)",
                  "tag the model with `model.add_model_tags([...])` in RejectionSFTTrainer.__init__ instead."):
        tags = trainer.model.model_tags or []
        assert "trl-rejection" in tags, tags


# --------------------------------------------------------------------------------------------------------------------
# transformers.Trainer
# --------------------------------------------------------------------------------------------------------------------

def test_transformers_trainer_get_train_sampler_is_called_with_the_dataset(tmp_path, llava):
    skip_unless_used('_get_train_sampler')
    import transformers

    with contract("transformers.Trainer._get_train_sampler(self, train_dataset=None)",
                  "trl_rejection/trainer.py RejectionSFTTrainer._get_train_sampler (ModalityLengthGroupedSampler "
                  "for train_sampling_strategy='group_by_length')",
                  "override the new hook that builds the training sampler (or pass a sampler through a public "
                  "argument if one exists) and match its signature."):
        params = list(inspect.signature(transformers.Trainer._get_train_sampler).parameters)
        assert params[:2] == ["self", "train_dataset"], params
        model, processor = llava
        trainer = RejectionSFTTrainer(model, args=make_args(tmp_path, train_sampling_strategy="group_by_length"),
                                      train_dataset=rows(), processing_class=processor)
        calls = []
        original = trainer._get_train_sampler

        def spy(*args, **kwargs):
            calls.append((args, kwargs))
            return original(*args, **kwargs)

        trainer._get_train_sampler = spy
        trainer.get_train_dataloader()
        assert calls, "Trainer.get_train_dataloader no longer calls _get_train_sampler"
        sampler = original(*calls[0][0], **calls[0][1])
        assert type(sampler).__name__ == "ModalityLengthGroupedSampler", type(sampler)


def test_transformers_trainer_calls_update_fsdp_plugin_peft_through_its_module_global():
    skip_unless_used('update_fsdp_plugin_peft')
    import transformers
    import transformers.trainer as hf_trainer

    with contract("transformers.trainer.update_fsdp_plugin_peft(model, accelerator), looked up as a module global "
                  "of transformers.trainer by Trainer when FSDP wraps a PEFT model",
                  "trl_rejection/distributed.py fsdp2_block_policy (patched while Trainer.train prepares an FSDP2 "
                  "PEFT model, to keep the block wrap policy)",
                  "patch the function where Trainer now looks it up, or drop the patch if accelerate's FSDP2 path "
                  "accepts PEFT's `_or_policy` (check with the FSDP2 GPU test in tests/test_gpu.py)."):
        fn = hf_trainer.update_fsdp_plugin_peft
        assert list(inspect.signature(fn).parameters) == ["model", "accelerator"], inspect.signature(fn)

        def names(code):
            yield from code.co_names
            for const in code.co_consts:
                if inspect.iscode(const):
                    yield from names(const)

        callers = [n for n, f in vars(transformers.Trainer).items()
                   if inspect.isfunction(f) and "update_fsdp_plugin_peft" in set(names(f.__code__))]
        assert callers, "no Trainer method refers to update_fsdp_plugin_peft by its global name"
        assert all(vars(transformers.Trainer)[n].__globals__ is vars(hf_trainer) for n in callers)


def test_transformers_data_collator_mixin_dispatches_to_torch_call():
    from transformers.data.data_collator import DataCollatorMixin

    skip_unless_used("DataCollatorMixin")
    with contract("transformers.data.data_collator.DataCollatorMixin (not exported at the top level): __call__ "
                  "runs torch_call when return_tensors='pt'",
                  "trl_rejection/collator.py RejectionDataCollator (as TRL's own collators)",
                  "implement __call__ in RejectionDataCollator directly."):
        class Probe(DataCollatorMixin):
            return_tensors = "pt"

            def torch_call(self, examples):
                return {"n": len(examples)}

        assert Probe()([{}, {}]) == {"n": 2}


def test_transformers_no_split_modules_name_the_blocks(llava):
    skip_unless_used('_no_split_modules')
    with contract("transformers.PreTrainedModel._no_split_modules (class attribute of each model and sub-model)",
                  "trl_rejection/distributed.py fsdp_layer_classes (FSDP wrap classes when the accelerate config "
                  "names none; ZeRO-3 leaf modules)",
                  "read the block classes from the new attribute, or require fsdp_transformer_layer_cls_to_wrap."):
        model, _ = llava
        names = set()
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or ())
        assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= names, sorted(names)


# --------------------------------------------------------------------------------------------------------------------
# transformers attention: the "sdpa_varlen" implementation (attention.py)
# --------------------------------------------------------------------------------------------------------------------

def test_transformers_config_attn_implementation_is_read_at_forward_time(llava):
    """attention.use_varlen_attention reads the text config's `_attn_implementation` and switches it with
    `model.set_attn_implementation({"text_config": "sdpa_varlen"})`; every language-model attention layer must then
    call the registered function, the vision tower none."""
    skip_unless_used('_attn_implementation')
    from transformers import AttentionInterface

    from trl_rejection import attention

    with contract("transformers PretrainedConfig._attn_implementation (read) and "
                  "PreTrainedModel.set_attn_implementation with a registered AttentionInterface name per sub-config",
                  "trl_rejection/attention.py use_varlen_attention (switches the language model to 'sdpa_varlen')",
                  "follow transformers' API for switching one sub-model's attention; if only the config field "
                  "works, write `text_config._attn_implementation` (and the sub-models' copies) again."):
        model, processor = llava
        model = make_model("llava-1.5", processor)
        assert attention.use_varlen_attention(model)
        real = attention.varlen_sdpa_attention_forward
        calls = []

        def spy(*args, **kwargs):
            calls.append(kwargs)
            return real(*args, **kwargs)

        AttentionInterface.register(attention.VARLEN_ATTENTION, spy)
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([[1, 5, 6, 7]]))
        finally:
            AttentionInterface.register(attention.VARLEN_ATTENTION, real)
        layers = model.config.get_text_config().num_hidden_layers
        assert len(calls) == layers, f"{len(calls)} language-model attention calls went to sdpa_varlen, not {layers}"


def test_transformers_passes_packed_kwargs_and_module_attributes_to_attention(llava):
    skip_unless_used('sdpa_attention_forward')
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    from trl_rejection import attention
    from trl_rejection.packing import pack_padded_batch

    with contract("transformers attention-function calling convention: kwargs cu_seq_lens_q / max_length_q / "
                  "position_ids, module.is_causal and module.num_key_value_groups, attention_mask=None for packed "
                  "rows; transformers.integrations.sdpa_attention.sdpa_attention_forward / repeat_kv and "
                  "transformers.masking_utils.sdpa_mask",
                  "trl_rejection/attention.py varlen_sdpa_attention_forward and _varlen_mask",
                  "follow the new attention-function interface (docs: 'Attention Interface'), or move the "
                  "padding-free path to transformers' own varlen implementation if one exists."):
        for fn, needed in ((sdpa_attention_forward, {"module", "query", "key", "value", "attention_mask"}),
                           (repeat_kv, set()), (sdpa_mask, {"attention_mask"})):
            params = set(inspect.signature(fn).parameters)
            assert needed <= params, f"{fn.__module__}.{fn.__name__} lost {sorted(needed - params)}"
        _, processor = llava
        model = make_model("llava-1.5", processor)
        attention.use_varlen_attention(model)
        real = attention.varlen_sdpa_attention_forward
        seen = []

        def spy(module, query, key, value, attention_mask, **kwargs):
            seen.append((module, attention_mask, kwargs))
            return real(module, query, key, value, attention_mask, **kwargs)

        packed = pack_padded_batch({"input_ids": torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]]),
                                             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
                                             "labels": torch.tensor([[-100, 5, 6, 7], [-100, 8, 9, -100]])},
                                            pad_token_id=0)
        AttentionInterface.register(attention.VARLEN_ATTENTION, spy)
        try:
            with torch.no_grad():
                model(**{k: v for k, v in packed.items() if k != "labels"})
        finally:
            AttentionInterface.register(attention.VARLEN_ATTENTION, real)
        assert seen, "the registered attention function was not called"
        module, mask, kwargs = seen[0]
        assert mask is None, "a packed batch reached attention with a mask"
        assert "cu_seq_lens_q" in kwargs and "position_ids" in kwargs, sorted(kwargs)
        assert isinstance(getattr(module, "num_key_value_groups", None), int) and module.is_causal


def test_transformers_qwen2_vl_get_rope_index_signature():
    skip_unless_used('get_rope_index')
    from transformers.models.qwen2_vl import modeling_qwen2_vl
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    with contract("transformers Qwen2VLModel.get_rope_index(input_ids, mm_token_type_ids=..., image_grid_thw=...) "
                  "-> (position_ids (3, batch, seq), deltas)",
                  "trl_rejection/packing.py rope_index_module / mrope_packed_inputs (padding-free Qwen2-VL)",
                  "adapt mrope_packed_inputs to the new signature; tests/test_batching.py checks the packed "
                  "Qwen2-VL step still equals the padded one."):
        params = inspect.signature(modeling_qwen2_vl.Qwen2VLModel.get_rope_index).parameters
        assert {"input_ids", "mm_token_type_ids", "image_grid_thw"} <= set(params), list(params)
        params = inspect.signature(modeling_qwen3_vl.Qwen3VLModel.get_rope_index).parameters
        assert {"input_ids", "mm_token_type_ids", "image_grid_thw"} <= set(params), list(params)


# --------------------------------------------------------------------------------------------------------------------
# transformers processors (tiny models)
# --------------------------------------------------------------------------------------------------------------------

def test_processor_init_checks_argument_classes_through_an_overridable_method(monkeypatch):
    skip_unless_used('check_argument_for_proper_class')
    import transformers
    from transformers.video_processing_utils import VideoProcessorMixin

    tiny = sys.modules[make_processor.__module__]
    with contract("transformers.ProcessorMixin.check_argument_for_proper_class (called by __init__; skipped via "
                  "processor_class.__new__ + an instance override when torchvision is absent)",
                  f"{make_processor.__module__}.make_processor for qwen2-vl / qwen2.5-vl without torchvision",
                  "build the processor with a real video processor (require torchvision for those families), or "
                  "find the new per-argument check and skip it the same way."):
        assert callable(getattr(transformers.ProcessorMixin, "check_argument_for_proper_class", None))
        monkeypatch.setattr(tiny, "is_torchvision_available", lambda: False)
        processor = make_processor("qwen2-vl")
        assert isinstance(processor, transformers.Qwen2VLProcessor)
        assert isinstance(processor.video_processor, VideoProcessorMixin)
        assert "check_argument_for_proper_class" not in vars(processor)  # the override is gone again


# --------------------------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------------------------

def test_datasets_fingerprint_identifies_the_saved_data(tmp_path):
    skip_unless_used('._fingerprint')
    with contract("datasets.Dataset._fingerprint (a str that follows the data: the same after save/load, "
                  "different for different data)",
                  "trl_rejection/data/formats.py (source provenance in the mix card) and "
                  "trl_rejection/data/builder.py (state.json of the mix folder)",
                  "hash the data ourselves (e.g. of `cache_files` / the Arrow table) instead."):
        a = datasets.Dataset.from_dict({"x": [1, 2, 3]})
        b = datasets.Dataset.from_dict({"x": [1, 2, 4]})
        a.save_to_disk(str(tmp_path / "a"))
        b.save_to_disk(str(tmp_path / "b"))
        fa = datasets.load_from_disk(str(tmp_path / "a"))._fingerprint
        fb = datasets.load_from_disk(str(tmp_path / "b"))._fingerprint
        assert isinstance(fa, str) and re.fullmatch(r"[0-9A-Za-z_-]+", fa), fa  # safe as a folder name
        assert fa == datasets.load_from_disk(str(tmp_path / "a"))._fingerprint and fa != fb


def test_datasets_hand_written_state_json_loads_like_save_to_disk(tmp_path):
    """data/builder.py turns the builder's Arrow cache files into a `load_from_disk` folder by writing `state.json`
    and `dataset_info.json` itself (save_to_disk would copy every image into the Arrow files)."""
    skip_unless_used('"_data_files"')
    builder = importlib.import_module("trl_rejection.data.builder")
    move = builder._move_to_dataset_dir
    with contract("datasets' save_to_disk folder format: state.json keys (_data_files, _fingerprint, _format_*, "
                  "_output_all_columns, _split) and dataset_info.json",
                  "trl_rejection/data/builder.py _move_to_dataset_dir",
                  "write the keys save_to_disk now writes (compare the two state.json files), or use "
                  "save_to_disk with the images as paths."):
        image = tmp_path / "im.png"
        Image.new("RGB", (8, 8), (10, 20, 30)).save(image)
        features = datasets.Features({"id": datasets.Value("string"),
                                      "images": datasets.List(datasets.Image()),
                                      "is_refusal": datasets.Value("bool")})
        data = {"id": ["a", "b"], "images": [[str(image)], []], "is_refusal": [True, False]}
        saved = datasets.Dataset.from_dict(data, features=features)
        saved.save_to_disk(str(tmp_path / "saved"))
        cached = datasets.Dataset.from_dict(data, features=features).map(
            lambda r: r, cache_file_name=str(tmp_path / "cache" / "rows.arrow"))
        move(cached, tmp_path / "moved")
        ours = json.loads((tmp_path / "moved" / "state.json").read_text())
        theirs = json.loads((tmp_path / "saved" / "state.json").read_text())
        assert set(ours) == set(theirs), f"save_to_disk writes {sorted(theirs)}, we write {sorted(ours)}"
        a, b = datasets.load_from_disk(str(tmp_path / "moved")), datasets.load_from_disk(str(tmp_path / "saved"))
        assert a.features == b.features and a.num_rows == b.num_rows == 2
        assert a["id"] == b["id"] and a["is_refusal"] == b["is_refusal"]
        assert [[im.tobytes() for im in r] for r in a["images"]] == [[im.tobytes() for im in r] for r in b["images"]]


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed / FSDP integration (trl_rejection/distributed.py)
# --------------------------------------------------------------------------------------------------------------------

def test_transformers_deepspeed_weak_ref_is_what_zero3_checks_read(monkeypatch):
    skip_unless_used('_hf_deepspeed_config_weak_ref')
    from transformers.integrations import deepspeed as hf_ds

    import transformers.modeling_utils as modeling_utils

    class FakeZero3Config:  # what HfDeepSpeedConfig answers; DeepSpeed itself is not needed
        def is_zero3(self):
            return True

        config = {"zero_optimization": {"stage": 3}}

    with contract("transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref (module global) and "
                  "unset_hf_deepspeed_config(), read by is_deepspeed_zero3_enabled() where from_pretrained / "
                  "model construction decide on zero.Init",
                  "trl_rejection/distributed.py without_zero3 (a whole model on one process under ZeRO-3: the tiny model's "
                  "init, the merge, the bundled evaluation)",
                  "use transformers' new way to build a model outside zero.Init (e.g. a context manager), or save "
                  "and restore whatever global is_deepspeed_zero3_enabled now reads."):
        assert hasattr(hf_ds, "_hf_deepspeed_config_weak_ref") and callable(hf_ds.unset_hf_deepspeed_config)
        fake = FakeZero3Config()
        monkeypatch.setattr(hf_ds, "_hf_deepspeed_config_weak_ref", weakref.ref(fake))
        assert modeling_utils.is_deepspeed_zero3_enabled(), "is_deepspeed_zero3_enabled ignores the weak ref"
        with without_zero3():
            assert not modeling_utils.is_deepspeed_zero3_enabled(), "unset_hf_deepspeed_config did not turn it off"
        assert modeling_utils.is_deepspeed_zero3_enabled(), "restoring the weak ref did not turn it back on"


def test_accelerate_dynamo_plugin_takes_the_launchers_backend(monkeypatch):
    import accelerate.utils.launch as launch
    from accelerate.utils import DynamoBackend, TorchDynamoPlugin

    with contract("accelerate.utils.TorchDynamoPlugin / DynamoBackend: built without a backend, the plugin takes the one "
                  "`accelerate launch --dynamo_backend` set (ACCELERATE_DYNAMO_BACKEND); a given backend wins",
                  "trl_rejection/callbacks.py compiled_run, trl_rejection/distributed.py check_regional_compilation",
                  "find where accelerate now keeps the launcher's dynamo choice, or pass the Trainer's "
                  "accelerator.state.dynamo_plugin to StepProfiler."):
        assert "ACCELERATE_DYNAMO_BACKEND" in inspect.getsource(launch), "accelerate launch no longer sets it"
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
        assert TorchDynamoPlugin().backend == DynamoBackend.INDUCTOR
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
        assert TorchDynamoPlugin().backend == DynamoBackend.NO
        assert TorchDynamoPlugin(backend="inductor").backend == DynamoBackend.INDUCTOR


def test_accelerate_use_fsdp_env_var_is_what_transformers_loading_reads(monkeypatch):
    skip_unless_used('ACCELERATE_USE_FSDP')
    import accelerate.utils.launch as launch
    import transformers.modeling_utils as modeling_utils

    with contract("the ACCELERATE_USE_FSDP environment variable: set by `accelerate launch` for FSDP and read by "
                  "transformers' is_fsdp_enabled() (rank>0 processes then load weights on the meta device)",
                  "trl_rejection/distributed.py sharded_backend and without_zero3",
                  "read the FSDP state from accelerate's PartialState / the TrainingArguments instead, and find "
                  "transformers' new switch for rank-0-only loading."):
        assert "ACCELERATE_USE_FSDP" in inspect.getsource(launch), "accelerate launch no longer sets it"
        is_fsdp_enabled = modeling_utils.is_fsdp_enabled
        globs = is_fsdp_enabled.__globals__
        probe = next((n for n in ("_is_torch_distributed_initialized", "is_torch_distributed_initialized")
                      if n in globs), None)
        if probe is not None:
            monkeypatch.setitem(globs, probe, lambda: True)
        else:
            monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        assert is_fsdp_enabled() and sharded_backend() == "fsdp"
        with without_zero3():
            assert not is_fsdp_enabled(), "is_fsdp_enabled no longer follows ACCELERATE_USE_FSDP"
        assert is_fsdp_enabled()


def test_peft_fsdp_wrap_policy_reads_fsdp_transformer_cls_to_wrap(monkeypatch, llava):
    skip_unless_used('FSDP_TRANSFORMER_CLS_TO_WRAP')
    from peft.utils.other import fsdp_auto_wrap_policy

    with contract("the FSDP_TRANSFORMER_CLS_TO_WRAP environment variable read by peft.utils.other."
                  "fsdp_auto_wrap_policy (the FSDP1 + PEFT wrap policy transformers installs)",
                  "trl_rejection/distributed.py setup_fsdp_wrapping",
                  "pass the block classes to PEFT's policy the new way (or set the accelerate plugin's policy "
                  "after transformers' update_fsdp_plugin_peft)."):
        model, _ = llava
        monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
        policy = fsdp_auto_wrap_policy(model)
        classes = {c.__name__ for p in policy.keywords["policies"] for c in p.keywords.get("transformer_layer_cls", ())}
        assert "LlamaDecoderLayer" in classes and "CLIPEncoderLayer" not in classes, sorted(classes)


# --------------------------------------------------------------------------------------------------------------------
# PEFT
# --------------------------------------------------------------------------------------------------------------------

def test_peft_disable_input_dtype_casting_turns_off_the_lora_input_cast(llava):
    skip_unless_used('disable_input_dtype_casting')
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    with contract("peft.helpers.disable_input_dtype_casting(model) (sets BaseTunerLayer.cast_input_dtype_enabled "
                  "to False inside, restores it after)",
                  "trl_rejection/trainer.py RejectionSFTTrainer._lora_input_cast_context (cast_lora_inputs=False)",
                  "use PEFT's new switch for the fp32 upcast of LoRA inputs; without one the trainer silently keeps "
                  "the upcast (slower, same result)."):
        from peft.helpers import disable_input_dtype_casting

        _, processor = llava
        model = get_peft_model(make_model("llava-1.5", processor), LoraConfig(r=2, target_modules=["q_proj"]))
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and all(m.cast_input_dtype_enabled for m in layers)
        with disable_input_dtype_casting(model):
            assert not any(m.cast_input_dtype_enabled for m in layers)
        assert all(m.cast_input_dtype_enabled for m in layers)


def test_peft_lora_linear_forward_applies_lora_a_to_the_dropout_output():
    """lora_dropout.recompute_lora_dropout moves each adapter's dropout into its `lora_A` (and puts an Identity in
    `lora_dropout`): it relies on PEFT's LoRA `Linear.forward` computing `base(x) + lora_B(lora_A(dropout(x))) *
    scaling` from the `lora_A` / `lora_B` / `lora_dropout` module dicts for adapters not in `lora_variant`."""
    skip_unless_used("peft.tuners.lora import Linear")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    with contract("peft.tuners.lora.Linear.forward: `result + lora_B(lora_A(dropout(x))) * scaling` for vanilla "
                  "adapters (modules from `lora_A`, `lora_B`, `lora_dropout`; variants in `lora_variant`)",
                  "trl_rejection/lora_dropout.py recompute_lora_dropout (recompute_lora_dropout=True)",
                  "follow PEFT's new LoRA forward (e.g. wrap the new call of the dropout), or turn the option off by "
                  "default until it does."):
        torch.manual_seed(0)
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 6)),
                               LoraConfig(r=2, lora_dropout=0.5, target_modules=["0"]))
        layer = model.base_model.model[0]
        assert type(layer) is LoraLinear and "default" not in layer.lora_variant
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        calls = []
        layer.lora_dropout["default"].register_forward_hook(lambda m, a, out: calls.append(("dropout", a[0], out)))
        layer.lora_A["default"].register_forward_hook(lambda m, a, out: calls.append(("lora_A", a[0], out)))
        x = torch.randn(3, 8)
        out = layer(x)
        (first, x_in, dropped), (second, a_in, a_out) = calls
        assert (first, second) == ("dropout", "lora_A") and x_in is x and a_in is dropped
        expected = layer.base_layer(x) + layer.lora_B["default"](a_out) * layer.scaling["default"]
        torch.testing.assert_close(out, expected)


def test_transformers_checkpointing_flag_of_each_layer_is_read_at_its_forward():
    """checkpointing.AutoLayerCheckpointing and lora_dropout set `GradientCheckpointingLayer.gradient_checkpointing` on
    single layers between micro-batches: transformers must read each layer's own flag at each forward (as its
    `every_n_layers` does) and recompute exactly the flagged layers in the backward."""
    skip_unless_used("layer.gradient_checkpointing = ")
    import transformers

    with contract("transformers.GradientCheckpointingLayer: a layer's `gradient_checkpointing` attribute, read at "
                  "each forward, decides whether that layer is checkpointed",
                  "trl_rejection/checkpointing.py AutoLayerCheckpointing (checkpoint_layers=\"auto\"), "
                  "trl_rejection/lora_dropout.py",
                  "find transformers' new per-layer switch, or make checkpoint_layers default to \"all\"."):
        config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                          num_attention_heads=2, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config).train()
        model.gradient_checkpointing_enable({"use_reentrant": False})
        layers = [m for m in model.modules() if isinstance(m, transformers.GradientCheckpointingLayer)]
        assert len(layers) == 3 and all(layer.gradient_checkpointing for layer in layers)
        counts = [0, 0, 0]
        for i, layer in enumerate(layers):
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        layers[1].gradient_checkpointing = False
        ids = torch.arange(8)[None]
        model(input_ids=ids, labels=ids).loss.backward()
        assert counts == [2, 1, 2], counts  # the flagged layers ran again in the backward, the other one did not


# --------------------------------------------------------------------------------------------------------------------
# argparse (stdlib) under TRL's TrlParser
# --------------------------------------------------------------------------------------------------------------------

def test_argparse_option_string_actions_lists_the_flags():
    skip_unless_used('_option_string_actions')
    from trl_rejection.parsing import StrictTrlParser

    with contract("argparse.ArgumentParser._option_string_actions (every option string -> action)",
                  "trl_rejection/parsing.py StrictTrlParser._unknown (closest known flag in the error)",
                  "collect the option strings from `parser._actions[i].option_strings` or from the dataclass "
                  "fields instead."):
        parser = StrictTrlParser(RejectionSFTConfig)
        assert "--projector_lr" in parser._option_string_actions and "--output_dir" in parser._option_string_actions


def test_torch_profiler_kineto_results_trace_start_is_the_origin_of_the_event_times():
    skip_unless_used("kineto_results")
    import time

    from torch.profiler import ProfilerActivity, profile

    with contract("torch.autograd.profiler.profile.kineto_results.trace_start_ns() (epoch nanoseconds; every "
                  "FunctionEvent's time_range counts microseconds from it)",
                  "trl_rejection/callbacks.py StepProfiler._trace_start_ns (timeline spans of two processes lined "
                  "up by bench/profile_coupling.py)",
                  "find the profiler's start time in the new profiler result, or record time.time_ns() when the "
                  "profiler starts (less exact)."):
        before = time.time_ns()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            time.sleep(0.01)
            torch.ones(8).sum()
        after = time.time_ns()
        start = prof.profiler.kineto_results.trace_start_ns()
        assert isinstance(start, int) and before - 10**9 <= start <= after
        op = next(e for e in prof.events() if e.name == "aten::sum")
        assert before <= start + op.time_range.start * 1e3 <= after


# --------------------------------------------------------------------------------------------------------------------
# One place: docs/internals.md lists every private use found in the sources, and every contract test it names exists
# --------------------------------------------------------------------------------------------------------------------

UPSTREAM = ("transformers", "trl", "datasets", "accelerate", "peft", "deepspeed", "evaluate", "huggingface_hub")
# Uses of upstream internals that have no leading underscore, which the scan below cannot tell from public API
NAMED = ("log_probs", "get_rope_index", "check_argument_for_proper_class", "variance_epsilon", "__new__", "ds_numel",
         "update_fsdp_plugin_peft", "unset_hf_deepspeed_config", "disable_input_dtype_casting", "kineto_results")
# Environment variables that are documented public conventions (torchrun / CUDA), not internals
PUBLIC_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR",
              "MASTER_PORT", "HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def scan_internals(source: str, own: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each use of an upstream internal in `source`: private attributes (`x._y`, `getattr(x, "_y")`)
    whose name this package does not define (`own`), private dict keys (`{"_data_files": ...}`: file formats), deep
    imports of a name
    that the upstream package does not export at its top level, upstream environment variables, and `NAMED`."""
    found: list[tuple[int, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Dict):  # `{"_data_files": ...}`: a private key of an upstream file format
            found += [(k.lineno, _string(k)) for k in node.keys
                      if _string(k) and _private(_string(k)) and _string(k) not in own]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and len(node.args) >= 2 \
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and _string(node.args[1]) \
                and _private(_string(node.args[1])) and _string(node.args[1]) not in own:
            found.append((node.lineno, _string(node.args[1])))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in UPSTREAM and "." in node.module:
            try:
                package = importlib.import_module(node.module.split(".")[0])
            except ImportError:  # not installed here (DeepSpeed): every name is taken as a deep import
                package = None
            for alias in node.names:
                if _private(alias.name) or not hasattr(package, alias.name):
                    found.append((node.lineno, f"{node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UPSTREAM and "." in alias.name:
                    found.append((node.lineno, alias.name))
        elif isinstance(node, ast.Call) and node.args:  # os.environ.get("X") / os.environ.pop("X") / environ["X"]
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault") \
                    and isinstance(func.value, ast.Attribute) and func.value.attr == "environ":
                found.append((node.lineno, _string(node.args[0]) or "?"))
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
            found.append((node.lineno, _string(node.slice) or "?"))
    for number, line in enumerate(source.splitlines(), 1):
        found += [(number, name) for name in NAMED
                  if re.search(rf"\b{re.escape(name)}\b", line) and not line.lstrip().startswith("#")]
    return [(n, w) for n, w in found if w not in PUBLIC_ENV and not w.startswith("TRL_REJECTION") and w != "?"]


def _sources() -> dict[str, str]:
    files = sorted((ROOT / "trl_rejection").rglob("*.py")) + sorted((ROOT / "recipes").glob("*.py"))
    return {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in files}


def _own_names(sources: dict[str, str]) -> set[str]:
    """Private names this package defines itself: functions, classes, module constants, attributes set on self."""
    own = set()
    for source in sources.values():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                own.add(node.attr)
            elif isinstance(node, ast.alias):
                own.add(node.asname or node.name)
    return {n for n in own if _private(n)}


def _upstream_overrides() -> set[str]:
    """Private names our subclasses of upstream classes define or set on self that the upstream class also uses:
    overridden hooks (`_get_train_sampler`), class attributes (`_tag_names`), upstream state (`_signature_columns`)."""
    names = set()
    for path in sorted((ROOT / "trl_rejection").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        for cls in vars(module).values():
            if not isinstance(cls, type) or cls.__module__ != module.__name__:
                continue
            upstream = [b for b in cls.__mro__[1:] if not b.__module__.startswith("trl_rejection")
                        and b.__module__ != "builtins"]
            sources = []
            for base in upstream:
                with contextlib.suppress(TypeError, OSError):
                    sources.append(inspect.getsource(base))
            text = "\n".join(sources)
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
            mine = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _private(n.attr)
                    and isinstance(n.value, ast.Name) and n.value.id == "self"}
            body = tree.body[0].body
            mine |= {n.name for n in body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(n.name)}
            mine |= {t.id for n in body if isinstance(n, (ast.Assign, ast.AnnAssign))
                     for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                     if isinstance(t, ast.Name) and _private(t.id)}
            names |= {n for n in mine if re.search(rf"\b{re.escape(n)}\b", text)}
    return names


def _documented() -> str:
    assert DOC.is_file(), "docs/internals.md is missing"
    return DOC.read_text(encoding="utf-8")


def test_the_scanner_finds_each_kind_of_internal():
    """The scan below is not vacuous: on a sample it finds every kind of use it claims to find."""
    sample = ("import os\nimport transformers.trainer as t\nfrom transformers.masking_utils import sdpa_mask\n"
              "from trl import SFTTrainer\nx = ds._fingerprint\ny = getattr(m, '_no_split_modules', None)\n"
              "s = {'_data_files': []}\nos.environ.get('ACCELERATE_USE_FSDP')\nos.environ['RANK']\n"
              "own = self._mine\nout.log_probs\n")
    found = {w for _, w in scan_internals(sample + "p = cls.__new__(cls)\n", own={"_mine"})}
    assert found == {"__new__", "transformers.trainer", "transformers.masking_utils.sdpa_mask", "_fingerprint",
                     "_no_split_modules", "_data_files", "ACCELERATE_USE_FSDP", "log_probs"}, found


def test_every_private_use_in_the_sources_is_listed_in_docs_internals():
    sources = _sources()
    own = _own_names(sources) - _upstream_overrides()
    doc = _documented()
    missing = []
    for path, source in sources.items():
        for line, what in scan_internals(source, own):
            if f"`{what}" not in doc and what not in doc:
                missing.append(f"{path}:{line} uses `{what}`")
    for name in sorted(_upstream_overrides()):
        if name not in doc:
            missing.append(f"a subclass overrides or sets upstream `{name}`")
    assert not missing, ("Uses of upstream internals not listed in docs/internals.md (add a row: name, package, "
                         "where, why no public API, contract test; and the contract test in tests/test_contracts.py):"
                         "\n  " + "\n  ".join(missing))


def test_docs_internals_names_only_contract_tests_that_exist():
    doc = _documented()
    named = set(re.findall(r"`(test_\w+)`", doc))
    here = {n for n, f in globals().items() if n.startswith("test_") and callable(f)}
    contracts = here - {"test_the_scanner_finds_each_kind_of_internal",
                        "test_ci_oldest_pins_are_the_lower_bounds_of_pyproject",
                        "test_every_private_use_in_the_sources_is_listed_in_docs_internals",
                        "test_docs_internals_names_only_contract_tests_that_exist"}
    elsewhere = {n for n in named - here
                 if any(re.search(rf"def {n}\b", p.read_text()) for p in (ROOT / "tests").glob("test_*.py"))}
    unknown = sorted(named - here - elsewhere)
    assert not unknown, f"docs/internals.md names tests that do not exist: {unknown}"
    assert not contracts - named, f"contract tests missing from docs/internals.md: {sorted(contracts - named)}"


def test_ci_oldest_pins_are_the_lower_bounds_of_pyproject():
    """The oldest leg of the CI version matrix installs exactly the lower bounds that pyproject.toml declares."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = dict(re.fullmatch(r"([\w-]+)>=([\w.]+)", d).groups() for d in deps)
    pins = dict(line.split("==") for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    from packaging.version import Version

    assert pins and all(name in bounds and Version(bounds[name]) == Version(version)
                        for name, version in pins.items()), (pins, bounds)


def test_qwen_vision_encoders_pass_cu_seqlens_to_flash_named_attention():
    """attention.use_varlen_vision_attention names its function "varlen_flash_sdpa" because transformers' Qwen-VL vision
    attention passes `cu_seq_lens_q` / `max_length_q` (one block per image or window) only to implementations whose
    name contains "flash" (`is_flash_attention_requested`), and runs one SDPA call per block otherwise."""
    skip_unless_used("VISION_CU_SEQLENS_MODELS")
    from transformers import AttentionInterface

    from trl_rejection import attention

    with contract("transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision attention: `cu_seq_lens_q`, `cu_seq_lens_k`, "
                  "`max_length_q` and `is_causal=False` passed to an implementation named with 'flash' "
                  "(transformers.utils.generic.is_flash_attention_requested)",
                  "trl_rejection/attention.py use_varlen_vision_attention / VISION_VARLEN_ATTENTION "
                  "(varlen_vision_attention)",
                  "follow how the vision attention now chooses its varlen path (or drop the option if transformers "
                  "runs these encoders as one varlen call under 'sdpa' itself)."):
        for family in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
            model = make_model(family, make_processor(family))
            assert model.config.model_type in attention.VISION_CU_SEQLENS_MODELS, model.config.model_type
            assert attention.use_varlen_vision_attention(model)
            real, seen = attention.varlen_sdpa_attention_forward, []

            def spy(module, query, key, value, attention_mask, **kwargs):
                seen.append(kwargs)
                return real(module, query, key, value, attention_mask, **kwargs)

            AttentionInterface.register(attention.VISION_VARLEN_ATTENTION, spy)
            try:
                vision = model.config.vision_config
                grid = torch.tensor([[1, 4, 4], [1, 4, 6]])
                width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
                with torch.no_grad():
                    model.model.visual(torch.randn(int(grid.prod(-1).sum()), width), grid_thw=grid)
            finally:
                attention.register_varlen_attention()
            assert len(seen) == vision.depth, f"{family}: {len(seen)} calls for {vision.depth} layers"
            for kwargs in seen:
                assert kwargs.get("is_causal") is False and torch.equal(kwargs["cu_seq_lens_q"].cpu(),
                                                                        torch.tensor([0, 16, 40])), (family, kwargs)
                assert kwargs["max_length_q"] == 24, (family, kwargs)

"""Qwen3-VL: packed rows get exactly the padded rows' 3-D positions; the shipped config trains the right modules.

Labels (tests/test_collator.py), the tiny model (tests/test_tiny.py) and padded-vs-packed loss and gradients
(tests/test_batching.py) are covered with the other families."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import transformers
from PIL import Image

from trl_rejection.collator import RejectionDataCollator
from trl_rejection.constants import DEFAULT_REFUSAL
from trl_rejection.optim import projector_parameter_ids
from trl_rejection.packing import mrope_packed_inputs, padding_free_supported, rope_index_module
from trl_rejection.testing.tiny import make_model, make_processor

ROOT = Path(__file__).resolve().parents[1]
LM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def conversation(text: str, reply: str, sizes: list[tuple[int, int]]) -> dict:
    images = [Image.new("RGB", size, (40 * i, 90, 200)) for i, size in enumerate(sizes)]
    content = [{"type": "image", "text": None}] * len(images) + [{"type": "text", "text": text}]
    return {"images": images, "messages": [{"role": "user", "content": content},
                                           {"role": "assistant", "content": [{"type": "text", "text": reply}]}]}


def test_packed_rows_get_the_padded_rows_positions():
    """Row 0 of the packed position ids restarts per row; rows 1-3 (interleaved T/H/W) are, token for token, what
    `get_rope_index` gives each row of the padded batch. Images of different grids (2x2, 2x4, 4x2, 3x3 merged patches),
    two images in one row, a row without one."""
    proc = make_processor("qwen3-vl")
    proc.image_processor.size = {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}  # the image size sets the grid
    data = [conversation("What is this?", "A red square.", [(64, 64)]),
            conversation("Describe both.", DEFAULT_REFUSAL, [(128, 64), (64, 128)]),
            conversation("Hi there", "Hello.", []),
            conversation("And this one?", "A small blue circle on a white background.", [(96, 96)])]
    padded = RejectionDataCollator(proc)(data)
    packed = RejectionDataCollator(proc, padding_free=True)(data)
    assert padded["image_grid_thw"][:, 1:].tolist() == [[4, 4], [4, 8], [8, 4], [6, 6]]
    model = make_model("qwen3-vl", proc)
    module = rope_index_module(model)
    assert isinstance(module, transformers.Qwen3VLModel)

    positions = mrope_packed_inputs(module, packed)["position_ids"]
    mask = padded["attention_mask"].bool()
    expected, _ = module.get_rope_index(padded["input_ids"], mm_token_type_ids=padded["mm_token_type_ids"],
                                        image_grid_thw=padded["image_grid_thw"],
                                        attention_mask=padded["attention_mask"])
    assert positions.shape == (4, 1, int(mask.sum()))
    assert torch.equal(positions[0, 0], torch.cat([torch.arange(int(n)) for n in mask.sum(1)]))
    assert torch.equal(positions[1:, 0], expected[:, mask])
    image_tokens = packed["input_ids"][0] == proc.image_token_id
    assert not torch.equal(positions[2, 0, image_tokens], positions[3, 0, image_tokens])  # H and W differ there


def test_padding_free_is_supported_for_qwen3_vl_only_among_its_kind():
    """Qwen3-VL is packed (the trainer keeps padding_free on); Qwen3-VL-MoE, not tested here, still falls back."""
    assert padding_free_supported(make_model("qwen3-vl").config) == (True, "")
    supported, why = padding_free_supported(transformers.Qwen3VLMoeConfig())
    assert not supported and "qwen3_vl_moe" in why


def test_shipped_config_puts_lora_on_the_language_model_and_trains_every_merger():
    """recipes/configs/qwen3-vl-8b.yaml on the tiny Qwen3-VL: LoRA on the language model's linears only; the merger
    and each deepstack merger fully trained, and exactly those in the projector's learning-rate group."""
    from peft import get_peft_model
    from trl import ModelConfig, TrlParser

    from trl_rejection import RejectionSFTConfig

    spec = importlib.util.spec_from_file_location("sft_rejection", ROOT / "recipes" / "sft_rejection.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    parser = TrlParser((recipe.ScriptArguments, RejectionSFTConfig, ModelConfig))
    _, args, model_args = parser.parse_args_and_config([
        "--config", str(ROOT / "recipes" / "configs" / "qwen3-vl-8b.yaml"), "--output_dir", "unused",
        "--bf16", "false", "--use_cpu", "true"])
    assert model_args.model_name_or_path == "Qwen/Qwen3-VL-8B-Instruct" and args.padding_free
    assert (args.projector_lr, args.learning_rate, args.num_train_epochs) == (2e-5, 2e-4, 3)
    base = make_model("qwen3-vl")
    mergers = {n for n, _ in base.named_parameters() if ".merger." in n or ".deepstack_merger_list." in n}
    assert any(".deepstack_merger_list.1." in n for n in mergers)

    model = get_peft_model(base, recipe.lora_config(model_args))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    assert {n.rsplit(".lora_", 1)[0].rsplit(".", 1)[-1] for n in lora} == LM_LINEARS
    copies = {n.replace(".modules_to_save.default", "").removeprefix("base_model.model.") for n in trainable
              if "lora_" not in n}
    assert copies == mergers  # every merger weight trained, nothing else
    projector = projector_parameter_ids(model, args.projector_modules)
    assert projector == {id(p) for n, p in trainable.items() if "lora_" not in n}

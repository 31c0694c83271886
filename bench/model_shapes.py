"""The benchmarks' models, processors and rows: each family's 7B-class shape with random weights (`MODEL`), built from
config classes (nothing is downloaded), its processor with the Hub's image processing, and synthetic LLaVA-mix-like
rows. Used by `bench_train.py` and `bench_scale.py`.

Environment: MODEL ("llava-1.5"; "qwen2.5-vl": Qwen2.5-VL-7B's shape, images at up to 640x640 px, 28 px merged
patches, the projector `merger` trained, model TFLOP/s counted with 7.07e9 language-model parameters; "qwen3-vl":
Qwen3-VL-8B's shape, images at up to 640x640 px, 32 px merged patches, `merger` and the deepstack mergers trained,
7.57e9; "gemma3" / "gemma3-12b": Gemma-3-4B-it's / Gemma-3-12B-it's shape, 896x896 px images -> 256 image tokens
that attend to each other bidirectionally, 5 sliding-window (1024) layers per full one, `multi_modal_projector`
trained, 3.88e9 / 11.77e9 with the tied LM head's matmul); SMALL=1 (tiny models on CPU: dry runs of the harnesses).
"""

from __future__ import annotations

import io
import math
import os
import random

import torch
import transformers
from PIL import Image

SMALL = os.environ.get("SMALL") == "1"
MODEL = os.environ.get("MODEL", "llava-1.5")  # or "qwen2.5-vl" / "qwen3-vl" / "gemma3" / "gemma3-12b"
# language-model parameters: Llama-2-7B; the others' decoder layers + LM head (no embeddings; Gemma 3's head is tied)
N_LM = {"llava-1.5": 6.74e9, "qwen2.5-vl": 7.07e9, "qwen3-vl": 7.57e9, "gemma3": 3.88e9, "gemma3-12b": 11.77e9}[MODEL]
PROJECTOR = {"llava-1.5": ["multi_modal_projector"], "qwen2.5-vl": ["merger"],
             "qwen3-vl": ["merger"] + [f"deepstack_merger_list.{i}" for i in range(2 if SMALL else 3)],
             "gemma3": ["multi_modal_projector"], "gemma3-12b": ["multi_modal_projector"]}[MODEL]
# google/gemma-3-4b-it's and gemma-3-12b-it's text_config (config.json; transformers' defaults give the 4B's heads)
GEMMA3_TEXT = {"gemma3": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8,
                              num_key_value_heads=4),
               "gemma3-12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                  num_attention_heads=16, num_key_value_heads=8)}
CUDA = torch.cuda.is_available() and not SMALL
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def processor():
    from trl_rejection.testing.tiny import chat_template, make_processor

    if MODEL.startswith("qwen"):  # the tiny processor with the Hub's image processing (28 / 32 px merged patches,
        proc = make_processor(MODEL)  # min pixels, Qwen3-VL's mean and std), at most 640x640 px
        image_class = getattr(transformers, "Qwen2VLImageProcessor" if CUDA else "Qwen2VLImageProcessorPil")
        hub = (dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"shortest_edge": 256 * 256})
               if MODEL == "qwen3-vl" else dict(size={"shortest_edge": 56 * 56}))
        hub["size"]["longest_edge"] = 640 * 640
        proc.image_processor = image_class(**hub)
        return proc
    if MODEL.startswith("gemma3"):  # the Hub's image processing: 896x896 px, mean = std = 0.5, 256 image tokens
        image_class = getattr(transformers, "Gemma3ImageProcessor" if CUDA else "Gemma3ImageProcessorPil")
        tiny = make_processor("gemma3")
        return transformers.Gemma3Processor(image_class(size={"height": 896, "width": 896}), tiny.tokenizer,
                                            image_seq_length=256, chat_template=tiny.chat_template)

    tok = make_processor("llava-1.5").tokenizer  # Llama-2-style tokenizer, llava-hf special tokens, offline
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return transformers.LlavaProcessor(ip, tok, patch_size=14, vision_feature_select_strategy="default",
                                       num_additional_image_tokens=1, chat_template=chat_template("llava-1.5"))


def build_rows(proc, n: int, seed: int = 0):
    """LLaVA-mix-like rows: one photo-like JPEG (300-640 px a side), log-normal text lengths, 2/7 refusals."""
    import datasets

    from trl_rejection.data import DEFAULT_REFUSAL

    rng = random.Random(seed)
    words = ("the picture shows a red square on white background near small blue circle scan chest man woman "
             "street car dog table window light left right two three people holding").split()
    sample = " ".join(rng.choice(words) for _ in range(400))
    tokens_per_word = len(proc.tokenizer(sample, add_special_tokens=False)["input_ids"]) / 400
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        tlen = min(2048 - 600, int(rng.lognormvariate(math.log(120), 0.9)) + 20)
        n_words = max(3, int(tlen / tokens_per_word))
        h, w = rng.randint(300, 640), rng.randint(300, 640)
        low = (torch.rand(3, 12, 12, generator=g) * 255)[None]
        pix = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0]
        pix = (pix + torch.randn(3, h, w, generator=g) * 12).clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(pix.numpy()).save(buf, format="JPEG", quality=90)
        refusal = rng.random() < 2 / 7
        q = " ".join(rng.choice(words) for _ in range(max(3, int(n_words * 0.2))))
        a = DEFAULT_REFUSAL if refusal else " ".join(rng.choice(words) for _ in range(max(3, int(n_words * 0.8))))
        rows.append({"images": [Image.open(io.BytesIO(buf.getvalue()))], "is_refusal": refusal, "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": a}]}]})
    return datasets.Dataset.from_list(rows)


def llava_config(proc, ids: dict) -> transformers.LlavaConfig:
    """LLaVA-1.5-7B's shape (or a tiny one with SMALL=1)."""
    if SMALL:
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=336, patch_size=14)
        text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=32064, **ids)
    else:
        vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                               num_attention_heads=16, image_size=336, patch_size=14,
                                               projection_dim=768)
        text = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                        max_position_embeddings=4096, **ids)
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=proc.image_token_id,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                    projector_hidden_act="gelu", attn_implementation="sdpa")


def qwen3_vl_config(proc, ids: dict) -> transformers.Qwen3VLConfig:
    """Qwen3-VL-8B-Instruct's config.json (or a tiny one with SMALL=1): interleaved M-RoPE, deepstack features."""
    if SMALL:
        rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, rope_parameters=rope)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=2304, deepstack_visual_indexes=[0, 1])
    else:
        text = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, max_position_embeddings=262144, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                     "mrope_interleaved": True})
        vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                      num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
    tok = proc.tokenizer
    return transformers.Qwen3VLConfig(
        text_config=dict(vocab_size=151936, **text, **ids), vision_config=dict(patch_size=16, **vision),
        image_token_id=proc.image_token_id, video_token_id=proc.video_token_id,
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), tie_word_embeddings=False,
        attn_implementation="sdpa")


def gemma3_config(proc, ids: dict) -> transformers.Gemma3Config:
    """Gemma-3-4B-it's / Gemma-3-12B-it's config.json (or a tiny one with SMALL=1): a SigLIP-So400m tower at 896 px,
    256 pooled image tokens, 5 local layers (1024-token sliding window) per global one, linear RoPE scaling 8."""
    if SMALL:
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                    layer_types=["sliding_attention", "full_attention"])
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    else:
        text = dict(**GEMMA3_TEXT[MODEL], head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                    rope_scaling={"factor": 8.0, "rope_type": "linear"})
        vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
    tok = proc.tokenizer
    return transformers.Gemma3Config(
        text_config=transformers.Gemma3TextConfig(vocab_size=262208, **text, **ids),
        vision_config=transformers.SiglipVisionConfig(image_size=896, patch_size=14, vision_use_head=False, **vision),
        mm_tokens_per_image=256, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id, attn_implementation="sdpa")


def build_model(proc):
    """The benchmark's model (`MODEL`) with random weights, in bf16 on the GPU."""
    tok = proc.tokenizer
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if MODEL == "qwen3-vl":
        cfg, model_class = qwen3_vl_config(proc, ids), transformers.Qwen3VLForConditionalGeneration
    elif MODEL.startswith("gemma3"):
        cfg, model_class = gemma3_config(proc, ids), transformers.Gemma3ForConditionalGeneration
    elif MODEL == "qwen2.5-vl":
        if SMALL:
            text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                 "mrope_section": [2, 3, 3]})
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          fullatt_block_indexes=[1])
        else:  # Qwen2.5-VL-7B-Instruct's config
            text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
            vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                          fullatt_block_indexes=[7, 15, 23, 31], window_size=112)
        cfg = transformers.Qwen2_5_VLConfig(
            text_config=dict(vocab_size=152064, **text, **ids), vision_config=vision,
            image_token_id=proc.image_token_id, video_token_id=proc.video_token_id,
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"), attn_implementation="sdpa")
        model_class = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        model_class, cfg = transformers.LlavaForConditionalGeneration, llava_config(proc, ids)
    torch.manual_seed(0)
    if not CUDA:
        return model_class(cfg)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            return model_class(cfg)
    finally:
        torch.set_default_dtype(torch.float32)

"""Tiny, offline, random-weight models and processors with each family's real chat template.

Everything is built in process: tokenizers come from `tiny_tokenizers.py` (trained on a small built-in corpus, with the
family's real chat template), image processors and models are configured small. Nothing is downloaded.

"smolvlm" is SmolVLM-Instruct (v1), which ships `Idefics3Processor` and `Idefics3ForConditionalGeneration`:
SmolVLM2's `SmolVLMProcessor` needs the `num2words` package. Image processors are the PIL backends (`*Pil`), which
save the same `image_processor_type` as the Hub configs. Without torchvision, a Qwen-VL processor holds a bare video
processor (images only) and saves, but `AutoProcessor` cannot load it back (as for the real checkpoints).

Example:
    >>> processor = make_processor("qwen2-vl")
    >>> model = make_model("qwen2-vl", processor)
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin

from trl_rejection.processing import tokenizer_of
from trl_rejection.testing.tiny_tokenizers import (FAMILIES, TEXT_FAMILIES, VLM_FAMILIES, chat_template, check_family,
                                                   generation_stops, make_tokenizer)

__all__ = ["FAMILIES", "TEXT_FAMILIES", "VLM_FAMILIES", "chat_template", "make_model", "make_processor"]

_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]  # llava-v1.6-mistral's grid, scaled from 336 to 28 px
_IDEFICS_IMAGE_SIZE = {"idefics3": 56, "smolvlm": 84}  # patch 14, scale factor 2 / 3: (56/14)**2/4 = (84/14)**2/9 = 4
# Qwen-VL family: processor class, video processor class, vision patch size (merged 2x2)
_QWEN_VL = {"qwen2-vl": ("Qwen2VLProcessor", "Qwen2VLVideoProcessor", 14),
            "qwen2.5-vl": ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", 14),
            "qwen3-vl": ("Qwen3VLProcessor", "Qwen3VLVideoProcessor", 16)}


def make_processor(family: str):
    """A fresh processor for `family`: a `ProcessorMixin` for VLMs, a `PreTrainedTokenizerFast` for text-only ones.

    Example:
        >>> processor = make_processor("llava-1.5")
        >>> processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
        'USER: Hi '
    """
    check_family(family)
    tokenizer = make_tokenizer(family)
    template = chat_template(family)
    if family in ("llava-1.5", "llava-next"):
        kwargs = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        if family == "llava-1.5":
            image_processor = transformers.CLIPImageProcessorPil(**kwargs)
            processor_class = transformers.LlavaProcessor
        else:
            image_processor = transformers.LlavaNextImageProcessorPil(image_grid_pinpoints=_PINPOINTS, **kwargs)
            processor_class = transformers.LlavaNextProcessor
        return processor_class(image_processor, tokenizer, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=template)  # fmt: skip
    if family in _QWEN_VL:
        processor_class, video_class, patch = _QWEN_VL[family]
        pixels = (4 * patch) ** 2  # min = max pixels: a 2x2 grid of merged patches, 4 image tokens for a square image
        image_processor = transformers.Qwen2VLImageProcessorPil(
            size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch,
            **({"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3-vl" else {}))  # as on the Hub
        processor_class = getattr(transformers, processor_class)
        if is_torchvision_available():
            video_processor = getattr(transformers, video_class)()
            return processor_class(image_processor, tokenizer, video_processor, chat_template=template)
        # Without torchvision, transformers exports no video-processor base class, so the processor's class check of
        # `video_processor` cannot pass: skip that check and hold a bare `VideoProcessorMixin` (images only).
        processor = processor_class.__new__(processor_class)
        processor.check_argument_for_proper_class = lambda *args: None
        processor.__init__(image_processor, tokenizer, VideoProcessorMixin(), chat_template=template)
        del processor.check_argument_for_proper_class
        return processor
    if family in ("idefics3", "smolvlm"):
        edge = _IDEFICS_IMAGE_SIZE[family]
        image_processor = transformers.Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": edge}, max_image_size={"longest_edge": edge}
        )
        return transformers.Idefics3Processor(image_processor, tokenizer, image_seq_len=4, chat_template=template)
    if family == "gemma3":
        image_processor = transformers.Gemma3ImageProcessorPil(size={"height": 56, "width": 56})
        return transformers.Gemma3Processor(image_processor, tokenizer, image_seq_length=4, chat_template=template)
    return tokenizer


def make_model(family: str, processor=None, seed: int = 0, text_kwargs: dict[str, Any] | None = None):
    """A tiny random-weight model for `family` whose vocabulary and image-token ids match `processor`.

    `text_kwargs` override the language model's config (e.g. `{"sliding_window": 8}`: Gemma 3's tiny model has a
    sliding-window layer, then a full-attention one, and a 64-token window by default).

    Example:
        >>> from PIL import Image
        >>> processor = make_processor("gemma3")
        >>> model = make_model("gemma3", processor)
        >>> inputs = processor(text="<start_of_image>Hi", images=Image.new("RGB", (32, 32)), return_tensors="pt")
        >>> model(**inputs).logits.shape[-1] == len(processor.tokenizer)
        True
    """
    check_family(family)
    processor = processor if processor is not None else make_processor(family)
    tokenizer = tokenizer_of(processor)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])  # fmt: skip
    if family == "gemma3":
        text.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                    layer_types=["sliding_attention", "full_attention"])
    text.update(text_kwargs or {})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14)
    if family in ("llava-1.5", "llava-next"):
        kwargs = dict(vision_config=transformers.CLIPVisionConfig(image_size=28, projection_dim=32, **vision),
                      text_config=transformers.LlamaConfig(**text), image_token_index=processor.image_token_id,
                      image_seq_length=4)  # fmt: skip
        if family == "llava-1.5":
            config, model_class = transformers.LlavaConfig(**kwargs), transformers.LlavaForConditionalGeneration
        else:
            config = transformers.LlavaNextConfig(image_grid_pinpoints=_PINPOINTS, **kwargs)
            model_class = transformers.LlavaNextForConditionalGeneration
    elif family in _QWEN_VL:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        token_ids = dict(image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
                         vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
                         vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"))  # fmt: skip
        if family == "qwen2-vl":
            vision_config = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
            config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision_config, **token_ids)
            model_class = transformers.Qwen2VLForConditionalGeneration
        elif family == "qwen2.5-vl":
            vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                 fullatt_block_indexes=[1])  # fmt: skip
            config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision_config, **token_ids)
            model_class = transformers.Qwen2_5_VLForConditionalGeneration
        else:  # interleaved M-RoPE (T, H, W frequencies alternate, T takes the rest) and deepstack features from
            # both vision blocks added to the first two decoder layers; 16 position embeddings (a 4x4 grid)
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                       "mrope_interleaved": True}  # fmt: skip
            vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                 num_position_embeddings=16, deepstack_visual_indexes=[0, 1])  # fmt: skip
            config = transformers.Qwen3VLConfig(text_config={**text, "head_dim": 16}, vision_config=vision_config,
                                                **token_ids)  # fmt: skip
            model_class = transformers.Qwen3VLForConditionalGeneration
    elif family in ("idefics3", "smolvlm"):
        config = transformers.Idefics3Config(
            vision_config=transformers.Idefics3VisionConfig(image_size=_IDEFICS_IMAGE_SIZE[family], **vision),
            text_config=transformers.LlamaConfig(**text), image_token_id=processor.image_token_id,
            scale_factor=2 if family == "idefics3" else 3,
        )  # fmt: skip
        model_class = transformers.Idefics3ForConditionalGeneration
    elif family == "gemma3":
        config = transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(**text),
            vision_config=transformers.SiglipVisionConfig(image_size=56, **vision), mm_tokens_per_image=4,
            boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
            image_token_index=tokenizer.image_token_id,
        )  # fmt: skip
        model_class = transformers.Gemma3ForConditionalGeneration
    elif family == "llama3-text":
        config, model_class = transformers.LlamaConfig(**text), transformers.LlamaForCausalLM
    else:
        config, model_class = transformers.Qwen2Config(**text), transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = model_class(config).eval()
    stops = [ids["eos"]] + [tokenizer.convert_tokens_to_ids(t) for t in generation_stops(family)]
    model.generation_config.update(bos_token_id=ids["bos"], eos_token_id=stops, pad_token_id=ids["pad"])
    return model

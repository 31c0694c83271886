"""Generation with a model and its processing class: loading both (optionally with a LoRA adapter merged) and
greedy batched generation. torch loads on first use, so importing this module stays light.

Example:
    >>> model, processor = load_model_and_processor("llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
    >>> greedy_generate(model, processor, ["USER: Hi ASSISTANT:"], max_new_tokens=8)  # doctest: +SKIP
    ['Hello! How can I help you today?']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from trl_rejection.processing import is_vlm_processor, tokenizer_of

if TYPE_CHECKING:
    from PIL import Image


def load_model_and_processor(model_name_or_path: str, adapter_path: str | None = None, dtype: str = "auto",
                             device: str | None = None) -> tuple[Any, Any]:
    """Load a VLM (or text LM) and its processor (or tokenizer) from a local folder or Hub id, optionally with a
    LoRA adapter (merged), ready to generate (`prepare_for_generation`).

    Example:
        >>> model, processor = load_model_and_processor("llava-hf/llava-1.5-7b-hf")  # doctest: +SKIP
        >>> type(model).__name__  # doctest: +SKIP
        'LlavaForConditionalGeneration'
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_name_or_path)
    auto = AutoModelForImageTextToText if is_vlm_processor(processor) else AutoModelForCausalLM
    model = auto.from_pretrained(model_name_or_path, dtype=dtype)
    return prepare_for_generation(model, adapter_path, device), processor


def prepare_for_generation(model: Any, adapter_path: str | None = None, device: str | None = None) -> Any:
    """`model` with the LoRA adapter at `adapter_path` merged (when given), on `device` (default: cuda when
    available), in eval mode.

    Example:
        >>> from trl_rejection.testing.tiny import make_model
        >>> prepare_for_generation(make_model("llava-1.5"), device="cpu").training
        False
    """
    import torch

    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()


def greedy_generate(model: Any, processing_class: Any, texts: Sequence[str],
                    images: Sequence[Sequence[Image.Image]] | None = None, max_new_tokens: int = 256) -> list[str]:
    """Greedy completions of rendered prompts `texts` (one image list per prompt with images, or None), decoded
    without special tokens. Prompts are left-padded (the tokenizer is set to pad left, with EOS as pad token if it
    has none); the tokenizer adds BOS only when the text does not already start with it (a chat template that
    renders it).

    Example:
        >>> greedy_generate(model, processor, ["USER: <image>\\nWhat is it? ASSISTANT:"], [[image]])  # doctest: +SKIP
        ['A red square.']
    """
    import torch

    tokenizer = tokenizer_of(processing_class)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    special = not (tokenizer.bos_token and texts[0].startswith(tokenizer.bos_token))
    if is_vlm_processor(processing_class):
        enc = processing_class(text=list(texts), images=images, return_tensors="pt", padding=True,
                               add_special_tokens=special)
    else:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=special)
    enc = enc.to(model.device)
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    with torch.no_grad():
        # Each process generates its own prompts to the end, never in lockstep with others: `synced_gpus` defaults
        # to on while DeepSpeed ZeRO-3 is configured, and would wait forever for processes that are not generating
        # (the training recipe evaluates on the main process alone after a ZeRO-3 run).
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, synced_gpus=False)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

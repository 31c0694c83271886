"""Tiny, offline, random-weight models and processors with each family's real chat template.

Everything is built in process: tokenizers are trained on a small built-in corpus with the `tokenizers` library (the
family's real tokenization pipeline and special tokens, byte fallback or byte-level so any unicode string encodes
without `<unk>`), image processors and models are configured small. Nothing is downloaded.

Chat templates are the templates the Hub repos ship, byte for byte. TRL stores eight of them in its package
(`trl/chat_templates/`, held to the Hub repos by TRL's drift check `scripts/check_chat_templates.py`), so they are
read from there at run time (`template_source`); only llava-1.5's is kept here:

- llava-1.5: `templates/llava-1.5.jinja`, from `llava-hf/llava-1.5-7b-hf` `chat_template.json`, as mirrored in
  huggingface/transformers `tests/models/llava/test_processor_llava.py` (`prepare_processor_dict`). It carries
  `{% generation %}` markers. TRL has no LLaVA-1.5 template.
- llava-next: `llava-hf/llava-v1.6-mistral-7b-hf`, TRL's `llava_next.jinja`.
- qwen2-vl: `Qwen/Qwen2-VL-7B-Instruct`, byte-identical to Qwen2.5-VL's, so TRL's `qwen2_5_vl.jinja` (TRL's drift
  check holds `Qwen/Qwen2-VL-2B-Instruct` to it).
- qwen2.5-vl: `Qwen/Qwen2.5-VL-7B-Instruct`, TRL's `qwen2_5_vl.jinja`.
- idefics3: `HuggingFaceM4/Idefics3-8B-Llama3`, TRL's `idefics3.jinja`.
- smolvlm: `HuggingFaceTB/SmolVLM-Instruct` (SmolVLM2 ships the same bytes), TRL's `smolvlm.jinja`.
- gemma3: `google/gemma-3-4b-it`, TRL's `gemma3.jinja`.
- llama3-text: `meta-llama/Llama-3.1-8B-Instruct`, TRL's `llama3_1.jinja`.
- qwen2.5-text: `Qwen/Qwen2.5-7B-Instruct`, TRL's `qwen2_5.jinja`.

Tokenizers: llava-1.5/llava-next are Llama-2/Mistral-like ("▁" pieces, byte fallback, and llava-hf's legacy "▁" prefix
on every text segment, so a lone "▁" follows `<image>`); gemma3 has no whitespace pre-split, so its pieces may span
words ("What▁", "d▁s"); the others are byte-level BPE with the Qwen2 (NFC-normalizing), Llama-3 or SmolLM2
pre-tokenizers.

"smolvlm" is SmolVLM-Instruct (v1), which ships `Idefics3Processor` and `Idefics3ForConditionalGeneration`:
SmolVLM2's `SmolVLMProcessor` needs the `num2words` package. Image processors are the PIL backends (`*Pil`), which
save the same `image_processor_type` as the Hub configs. Without torchvision, a Qwen-VL processor holds a bare video
processor (images only) and saves, but `AutoProcessor` cannot load it back (as for the real checkpoints).

Example:
    >>> processor = make_processor("qwen2-vl")
    >>> model = make_model("qwen2-vl", processor)
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python 3.11+; importlib.abc on 3.10


VLM_FAMILIES: tuple[str, ...] = ("llava-1.5", "llava-next", "qwen2-vl", "qwen2.5-vl", "idefics3", "smolvlm", "gemma3")
TEXT_FAMILIES: tuple[str, ...] = ("llama3-text", "qwen2.5-text")
FAMILIES: tuple[str, ...] = VLM_FAMILIES + TEXT_FAMILIES

_CORPUS = """\
I'm sorry, but I cannot assist with your request.
I'm sorry, but I can't help with that. I cannot assist with this request.
Sorry, I cannot provide that information, but I can help with something else.
What is this? A red square. What is in the image? It is a blue circle on a white background.
Describe the image in detail. The picture shows a small dog sitting next to a green chair.
How many people are in the photo? There are 3 people: two adults and one child.
USER: Can you help me? ASSISTANT: Of course, I'd be happy to help you with that.
[INST] What does the sign say? [/INST] The sign says "Stop" in large letters.
User: What color is the car? Assistant: The car is yellow, with black wheels.
system user assistant model You are a helpful assistant. You are Qwen, created by Alibaba Cloud.
Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!
She said: "Don't worry, it's fine; we'll be there at 10:30 (maybe 10:45)."
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1,000,000 -7 +12 50% $19.99
Prices went up 12% in 2023, and the report (page 7) lists 1234 items.
Code: def f(x): return x * 2 + 1  # a comment {"key": [1, 2, 3]} a_b-c/d\\e
Punctuation: , . ; : ! ? ' " ( ) [ ] { } < > @ # $ % ^ & * _ - + = / \\ | ~ `
Le café est très bon. Él dice que el niño está aquí. Über die Brücke gehen wir früh.
Crème brûlée, naïve façade, jalapeño, Ærø, smørrebrød, São Paulo, Łódź.
日本語のテキストです。日本 東京 こんにちは 世界。中文 你好 안녕하세요 Привет мир Γειά σου
Emoji and symbols: 😀 🤖 ✓ → ★ ♥ € £ ¥ © ® ™ °C ½ ∑ π √ ≈ ≠
This is a safe request, so I will answer it. This request is harmful, so I must refuse it.
The model should refuse harmful requests and answer benign requests helpfully.
Please explain how photosynthesis works in plants, step by step.
Write a short poem about the ocean and the moon at night.
The weather today is sunny with a light breeze from the west.
Can you translate "good morning" into French? Bonjour!
The cat sat on the mat, and the dog slept under the table.
The user asks a question about the image and the assistant answers it; the system prompt sets the rules.
A user message, an assistant message, a system message: each role has its own turn in the conversation.
What is shown in this picture? What is the man holding? What is written on the board? Is it safe?
The image shows a red square, a green triangle and a yellow star on a gray table near the window.
Yes, it is safe. No, I don't think so. Maybe. I am not sure, but it looks like a cat.
Tabs\tand  double  spaces   and
new lines
  indented lines and trailing spaces  
"""

_ROW_COL = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")  # fmt: skip
_LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")  # fmt: skip
_IDEFICS_SPECIALS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>") + _ROW_COL
_SPLIT_PATTERNS = {  # the pre-tokenizer regexes of Qwen2 and Llama-3
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}
_BYTE_LEVEL = ("qwen2", "llama3", "smollm")  # GPT-2 byte-level BPE; the others: SentencePiece-like, byte fallback
_ADDS_BOS = ("llama2", "gemma", "llama3")  # styles whose tokenizer prepends bos on encode

TRL_TEMPLATES = {"llava-next": "llava_next", "qwen2-vl": "qwen2_5_vl", "qwen2.5-vl": "qwen2_5_vl",
                 "idefics3": "idefics3", "smolvlm": "smolvlm", "gemma3": "gemma3", "llama3-text": "llama3_1",
                 "qwen2.5-text": "qwen2_5"}  # fmt: skip
"""Family -> name of its template in TRL's `trl/chat_templates/` (the families not named keep theirs here)."""

_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]  # llava-v1.6-mistral's grid, scaled from 336 to 28 px
_IDEFICS_IMAGE_SIZE = {"idefics3": 56, "smolvlm": 84}  # patch 14, scale factor 2 / 3: (56/14)**2/4 = (84/14)**2/9 = 4


@dataclass(frozen=True)
class _Spec:
    style: str  # tokenization pipeline, see `_pipeline`
    leading: tuple[str, ...]  # special tokens at the start of the vocabulary
    trailing: tuple[str, ...]  # special tokens appended after the learned vocabulary
    bos: str | None
    eos: str
    pad: str
    unk: str | None = None
    extra: dict = field(default_factory=dict)  # named special tokens, e.g. {"image_token": "<image>"}
    plain: tuple[str, ...] = ()  # non-special added tokens
    stops: tuple[str, ...] = ()  # generation stops besides eos (as in the Hub generation_config.json)


_LLAVA = _Spec("llama2", ("<unk>", "<s>", "</s>"), ("<image>", "<pad>"), "<s>", "</s>", "<pad>", "<unk>",
               {"image_token": "<image>"})  # fmt: skip
_QWEN25 = dict(plain=("<tool_call>", "</tool_call>"), stops=("<|endoftext|>",))
_SPECS = {
    "llava-1.5": _LLAVA,
    "llava-next": _LLAVA,
    "qwen2-vl": _Spec("qwen2", (), _QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>", stops=("<|endoftext|>",)),
    "qwen2.5-vl": _Spec("qwen2", (), _QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>", **_QWEN25),
    "idefics3": _Spec("llama3", (), _LLAMA3_SPECIALS + _IDEFICS_SPECIALS, "<|begin_of_text|>", "<end_of_utterance>",
                      "<|reserved_special_token_0|>"),  # fmt: skip
    "smolvlm": _Spec("smollm", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), _IDEFICS_SPECIALS, "<|im_start|>",
                     "<end_of_utterance>", "<|im_end|>", "<|endoftext|>"),  # fmt: skip
    "gemma3": _Spec("gemma", ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"),
                    ("<start_of_image>", "<end_of_image>", "<image_soft_token>"), "<bos>", "<eos>", "<pad>", "<unk>",
                    {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                     "image_token": "<image_soft_token>"}, stops=("<end_of_turn>",)),  # fmt: skip
    "llama3-text": _Spec("llama3", (), _LLAMA3_SPECIALS, "<|begin_of_text|>", "<|eot_id|>",
                         "<|finetune_right_pad_id|>", stops=("<|end_of_text|>", "<|eom_id|>")),  # fmt: skip
    "qwen2.5-text": _Spec("qwen2", (), _QWEN_SPECIALS[:3], None, "<|im_end|>", "<|endoftext|>", **_QWEN25),
}


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}, expected one of {FAMILIES}")


def template_source(family: str) -> Traversable:
    """The file of the family's chat template: TRL's `trl/chat_templates/<name>.jinja` where TRL has it, else ours.

    Example:
        >>> template_source("qwen2-vl").name, template_source("llava-1.5").name
        ('qwen2_5_vl.jinja', 'llava-1.5.jinja')
    """
    _check(family)
    if family in TRL_TEMPLATES:
        return resources.files("trl").joinpath("chat_templates", f"{TRL_TEMPLATES[family]}.jinja")
    return resources.files(__package__).joinpath("templates", f"{family}.jinja")


def chat_template(family: str) -> str:
    """The family's chat template, byte-exact as shipped on the Hub.

    Example:
        >>> chat_template("gemma3").startswith("{{ bos_token }}")
        True
    """
    return template_source(family).read_text(encoding="utf-8")


def _pipeline(style: str, tokenizer: Tokenizer, bos: str | None = None) -> None:
    """Set the normalizer, pre-tokenizer, decoder and post-processor of `style` on `tokenizer`."""
    if style == "llama2":  # llava-hf's Llama-2 / Mistral tokenizer.json: "▁" before every text segment (legacy)
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif style == "gemma":  # spaces become "▁", no dummy prefix, no pre-split: pieces may span words
        tokenizer.normalizer = normalizers.Replace(" ", "▁")
    else:
        if style == "qwen2":
            tokenizer.normalizer = normalizers.NFC()
        split = (pre_tokenizers.Digits(individual_digits=True) if style == "smollm"
                 else pre_tokenizers.Split(Regex(_SPLIT_PATTERNS[style]), "isolated"))  # fmt: skip
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "smollm")
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    if style in _BYTE_LEVEL:
        tokenizer.decoder = decoders.ByteLevel()
    else:
        strip = [decoders.Strip(" ", 1, 0)] if style == "llama2" else []
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
        )
    post = [processors.ByteLevel(trim_offsets=False)] if style in _BYTE_LEVEL else []
    if bos is not None:
        bos_id = tokenizer.token_to_id(bos)
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                  special_tokens=[(bos, bos_id)]))  # fmt: skip
    tokenizer.post_processor = processors.Sequence(post)


@functools.lru_cache(maxsize=None)
def _tokenizer_json(family: str) -> str:
    """Train the family's BPE on the built-in corpus (once per process); the serialized `tokenizers.Tokenizer`."""
    spec = _SPECS[family]
    draft = Tokenizer(models.BPE())
    _pipeline(spec.style, draft)
    if spec.style == "llama2":  # SentencePiece learns pieces within whitespace-split words: "▁the", not "e▁t"
        draft.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if spec.style in _BYTE_LEVEL else []
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=2, max_token_length=8, initial_alphabet=alphabet,
                                  show_progress=False)  # fmt: skip
    draft.train_from_iterator(_CORPUS.splitlines(), trainer)
    learned = json.loads(draft.to_str())["model"]

    byte_fallback = spec.style not in _BYTE_LEVEL
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)] if byte_fallback else []  # SentencePiece's byte pieces
    vocab = {token: i for i, token in enumerate([*spec.leading, *byte_tokens])}
    for token in learned["vocab"]:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge) for merge in learned["merges"]]
    unk = spec.unk if byte_fallback else None
    bpe = models.BPE(vocab, merges, unk_token=unk, byte_fallback=byte_fallback, fuse_unk=byte_fallback)
    tokenizer = Tokenizer(bpe)
    tokenizer.add_special_tokens([*spec.leading, *spec.trailing])
    tokenizer.add_tokens(list(spec.plain))
    _pipeline(spec.style, tokenizer, spec.bos if spec.style in _ADDS_BOS else None)
    return tokenizer.to_str()


def _tokenizer(family: str) -> PreTrainedTokenizerFast:
    spec = _SPECS[family]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(family)),
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        extra_special_tokens=dict(spec.extra),
        chat_template=chat_template(family),
    )


def make_processor(family: str):
    """A fresh processor for `family`: a `ProcessorMixin` for VLMs, a `PreTrainedTokenizerFast` for text-only ones.

    Example:
        >>> processor = make_processor("llava-1.5")
        >>> processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
        'USER: Hi '
    """
    _check(family)
    tokenizer = _tokenizer(family)
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
    if family in ("qwen2-vl", "qwen2.5-vl"):
        pixels = 56 * 56  # min = max pixels: a 2x2 grid of merged 28 px patches, 4 image tokens for a square image
        image_processor = transformers.Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels})
        processor_class = transformers.Qwen2VLProcessor if family == "qwen2-vl" else transformers.Qwen2_5_VLProcessor
        if is_torchvision_available():
            video_processor = transformers.Qwen2VLVideoProcessor()
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


def make_model(family: str, processor=None, seed: int = 0):
    """A tiny random-weight model for `family` whose vocabulary and image-token ids match `processor`.

    Example:
        >>> from PIL import Image
        >>> processor = make_processor("gemma3")
        >>> model = make_model("gemma3", processor)
        >>> inputs = processor(text="<start_of_image>Hi", images=Image.new("RGB", (32, 32)), return_tensors="pt")
        >>> model(**inputs).logits.shape[-1] == len(processor.tokenizer)
        True
    """
    _check(family)
    processor = processor if processor is not None else make_processor(family)
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])  # fmt: skip
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
    elif family in ("qwen2-vl", "qwen2.5-vl"):
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        token_ids = dict(image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
                         vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
                         vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"))  # fmt: skip
        if family == "qwen2-vl":
            vision_config = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
            config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision_config, **token_ids)
            model_class = transformers.Qwen2VLForConditionalGeneration
        else:
            vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                                 fullatt_block_indexes=[1])  # fmt: skip
            config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision_config, **token_ids)
            model_class = transformers.Qwen2_5_VLForConditionalGeneration
    elif family in ("idefics3", "smolvlm"):
        config = transformers.Idefics3Config(
            vision_config=transformers.Idefics3VisionConfig(image_size=_IDEFICS_IMAGE_SIZE[family], **vision),
            text_config=transformers.LlamaConfig(**text), image_token_id=processor.image_token_id,
            scale_factor=2 if family == "idefics3" else 3,
        )  # fmt: skip
        model_class = transformers.Idefics3ForConditionalGeneration
    elif family == "gemma3":
        config = transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                                                      **text),
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
    stops = [ids["eos"]] + [tokenizer.convert_tokens_to_ids(t) for t in _SPECS[family].stops]
    model.generation_config.update(bos_token_id=ids["bos"], eos_token_id=stops, pad_token_id=ids["pad"])
    return model

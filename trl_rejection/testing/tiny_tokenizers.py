"""Tiny offline tokenizers of each model family, with the family's real chat template.

Tokenizers are trained on a small built-in corpus with the `tokenizers` library: the family's real tokenization
pipeline and special tokens, byte fallback or byte-level so any unicode string encodes without `<unk>`. Nothing is
downloaded.

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
- qwen3-vl: `Qwen/Qwen3-VL-8B-Instruct`, TRL's `qwen3_vl.jinja` (TRL's drift check holds `Qwen/Qwen3-VL-2B-Instruct`
  to it; the dense Qwen3-VL Instruct checkpoints ship one template).
- idefics3: `HuggingFaceM4/Idefics3-8B-Llama3`, TRL's `idefics3.jinja`.
- smolvlm: `HuggingFaceTB/SmolVLM-Instruct` (SmolVLM2 ships the same bytes), TRL's `smolvlm.jinja`.
- gemma3: `google/gemma-3-4b-it`, TRL's `gemma3.jinja`.
- llama3-text: `meta-llama/Llama-3.1-8B-Instruct`, TRL's `llama3_1.jinja`.
- qwen2.5-text: `Qwen/Qwen2.5-7B-Instruct`, TRL's `qwen2_5.jinja`.

Tokenizers: llava-1.5/llava-next are Llama-2/Mistral-like ("▁" pieces, byte fallback, and llava-hf's legacy "▁" prefix
on every text segment, so a lone "▁" follows `<image>`); gemma3 has no whitespace pre-split, so its pieces may span
words ("What▁", "d▁s"); the others are byte-level BPE with the Qwen2 (NFC-normalizing), Llama-3 or SmolLM2
pre-tokenizers.

Example:
    >>> tokenizer = make_tokenizer("llama3-text")
    >>> tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False).startswith("<|begin_of_text|>")
    True
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python 3.11+; importlib.abc on 3.10

VLM_FAMILIES: tuple[str, ...] = ("llava-1.5", "llava-next", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "idefics3", "smolvlm",
                                  "gemma3")
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
                 "qwen3-vl": "qwen3_vl", "idefics3": "idefics3", "smolvlm": "smolvlm", "gemma3": "gemma3",
                 "llama3-text": "llama3_1", "qwen2.5-text": "qwen2_5"}  # fmt: skip
"""Family -> name of its template in TRL's `trl/chat_templates/` (the families not named keep theirs here)."""

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
_QWEN3 = dict(plain=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
              stops=("<|endoftext|>",))  # Qwen3's added tokens (not special), generation stops of Qwen3-VL-8B
_SPECS = {
    "llava-1.5": _LLAVA,
    "llava-next": _LLAVA,
    "qwen2-vl": _Spec("qwen2", (), _QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>", stops=("<|endoftext|>",)),
    "qwen2.5-vl": _Spec("qwen2", (), _QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>", **_QWEN25),
    "qwen3-vl": _Spec("qwen2", (), _QWEN_SPECIALS, None, "<|im_end|>", "<|endoftext|>", **_QWEN3),
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


def check_family(family: str) -> None:
    """A ValueError naming the families when `family` is not one of `FAMILIES`."""
    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}, expected one of {FAMILIES}")


def template_source(family: str) -> Traversable:
    """The file of the family's chat template: TRL's `trl/chat_templates/<name>.jinja` where TRL has it, else ours.

    Example:
        >>> template_source("qwen2-vl").name, template_source("llava-1.5").name
        ('qwen2_5_vl.jinja', 'llava-1.5.jinja')
    """
    check_family(family)
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


def make_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A fresh tokenizer of `family`: its pipeline, special tokens and chat template, on the trained tiny vocabulary.

    Example:
        >>> make_tokenizer("qwen2.5-text").eos_token
        '<|im_end|>'
    """
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


def generation_stops(family: str) -> tuple[str, ...]:
    """The tokens besides EOS that end a generation of `family` (as in its Hub `generation_config.json`).

    Example:
        >>> generation_stops("gemma3")
        ('<end_of_turn>',)
    """
    return _SPECS[family].stops

"""The refusal-swap mix: sample benign rows, keep one turn, swap the reply for a refusal, mix with normal rows.

This module is pure Python over `formats.Source` objects; `builder.py` wraps it as a `datasets` builder.

Example:
    >>> from trl_rejection.data.formats import open_source
    >>> cfg = MixConfig(n_refusal=2000, n_normal=5000, seed=0)
    >>> plan = plan_mix(cfg, open_source("llava_med.json"), open_source("mix665k.json"))  # doctest: +SKIP
    >>> rows = list(iter_rows(plan))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator, Literal

from ..constants import DEFAULT_REFUSAL
from ..io import check_image, inside, real
from ..validation import ConfigError, check_dataclass, check_range, non_empty_strings
from .formats import MixDataError, Record, Source


@dataclass
class MixConfig:
    """What to mix, and how. Every field is also a CLI flag of `trl-rejection mix` and a YAML key."""

    refusal_source: str | None = field(default=None, metadata={
        "help": "Benign data whose replies are replaced by a refusal (the paper: LLaVA-Med). A LLaVA/TRL .json or "
                ".jsonl file, a save_to_disk directory, or a Hub dataset id. Unset: the bundled sample data."})
    normal_source: str | None = field(default=None, metadata={
        "help": "Instruction data kept as is (the paper: LLaVA mix665k). Same formats. Unset: the bundled sample."})
    refusal_source_name: str | None = field(default=None, metadata={"help": "Name in the `source` column."})
    normal_source_name: str | None = field(default=None, metadata={"help": "Name in the `source` column."})
    refusal_image_root: str | None = field(default=None, metadata={
        "help": "Folder the refusal source's image paths are relative to (default: the file's folder)."})
    normal_image_root: str | None = field(default=None, metadata={
        "help": "Folder the normal source's image paths are relative to (default: the file's folder)."})
    split: str = field(default="train", metadata={"help": "Split to read from dataset directories and Hub ids."})
    n_refusal: int | None = field(default=None, metadata={"help": "Refusal rows (the paper: 2000)."})
    n_normal: int | None = field(default=None, metadata={"help": "Normal rows (the paper: 5000)."})
    total: int | None = field(default=None, metadata={"help": "Total rows, with --refusal_fraction instead of counts."})
    refusal_fraction: float | None = field(default=None, metadata={
        "help": "Share of refusal rows in (0, 1), with --total (the paper: 2000/7000 = 0.2857)."})
    refusal_sentences: list[str] = field(default_factory=lambda: [DEFAULT_REFUSAL], metadata={
        "help": "Refusal replies; one is picked per row at random (seeded)."})
    turn_choice: Literal["first", "random"] = field(default="first", metadata={
        "help": "Which human/gpt pair a refusal row keeps: the first, or a random one that is not a follow-up."})
    followup_markers: list[str] = field(default_factory=lambda: ["what about"], metadata={
        "help": "With turn_choice=random, human turns containing one of these (lower-case) are skipped."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling, sentence choice, turn choice and order."})
    allow_capping: bool = field(default=False, metadata={
        "help": "Cap counts larger than a source instead of failing (the card records the cap)."})
    duplicate_ids: Literal["error", "suffix"] = field(default="error", metadata={
        "help": "Duplicate ids in a source: fail, or rename repeats '<id>#2', '<id>#3', ..."})
    validate: Literal["drawn", "all"] = field(default="drawn", metadata={
        "help": "Check every record of a source in full, its images decoded ('all'), or only the records drawn into "
                "the mix ('drawn'; every record is still parsed and its id checked)."})
    follow_symlinks: bool = field(default=False, metadata={
        "help": "Accept image symlinks that lead outside the image root (e.g. data/coco -> /datasets/coco)."})
    image_check: Literal["decode", "open", "off"] = field(default="decode", metadata={
        "help": "Check each image of the mix (of every record with validate=all) at build time: decode it "
                "('decode', in threads; cost in bench/RESULTS.md), read its header only ('open'), or not at all "
                "('off')."})

    def __post_init__(self) -> None:
        """Check every field's type and range, and that counts and total / refusal_fraction are not mixed."""
        check_dataclass(self)
        check_range(self, "n_refusal", lambda v: v >= 0, "a count >= 0")
        check_range(self, "n_normal", lambda v: v >= 0, "a count >= 0")
        check_range(self, "total", lambda v: v >= 1, "a row count >= 1")
        if self.refusal_fraction is not None and not 0 < self.refusal_fraction < 1:
            raise ConfigError("refusal_fraction", f"{self.refusal_fraction} is outside (0, 1)", "give a fraction "
                              "strictly between 0 and 1, e.g. 0.2857 for the paper's 2000/7000")
        check_range(self, "seed", lambda v: v >= 0, "a seed >= 0", "give e.g. 0 (Python's random treats -1 as 1)")
        check_range(self, "refusal_sentences", lambda v: v and non_empty_strings(v), "a non-empty list of "
                    "non-blank sentences", f"give at least one sentence, e.g. refusal_sentences: [{DEFAULT_REFUSAL!r}]")
        check_range(self, "followup_markers", non_empty_strings, "a list of non-blank markers (a blank one "
                    "matches every turn)", "remove the blank entries")
        counts = self.n_refusal is not None or self.n_normal is not None
        by_fraction = self.total is not None or self.refusal_fraction is not None
        if counts and by_fraction:
            raise ConfigError("total", "both counts (n_refusal / n_normal) and total / refusal_fraction were given",
                              "give either n_refusal and n_normal, or total and refusal_fraction")
        if counts and (self.n_refusal is None or self.n_normal is None):
            raise ConfigError("n_refusal" if self.n_refusal is None else "n_normal", "n_refusal and n_normal go "
                              "together, only one was given", "give both (0 is allowed)")
        if counts and self.n_refusal + self.n_normal == 0:
            raise ConfigError("n_refusal", "the mix would be empty (n_refusal + n_normal = 0)",
                              "ask for at least one row")
        if by_fraction and (self.total is None or self.refusal_fraction is None):
            raise ConfigError("total" if self.total is None else "refusal_fraction", "total and refusal_fraction "
                              "go together, only one was given", "give both, or n_refusal and n_normal instead")
        if by_fraction and round(self.total * self.refusal_fraction) == 0:
            smallest = max(1, math.ceil(0.5 / self.refusal_fraction))
            while round(smallest * self.refusal_fraction) == 0:
                smallest += 1
            raise ConfigError("refusal_fraction", f"total={self.total} x refusal_fraction={self.refusal_fraction} "
                              f"= {self.total * self.refusal_fraction:g} rounds to 0 refusal rows",
                              f"give total >= {smallest} (the smallest that gives one refusal row), a larger "
                              "refusal_fraction, or exact counts with n_refusal and n_normal")

    def counts(self) -> tuple[int, int]:
        """The requested (n_refusal, n_normal), from counts or from total and refusal_fraction."""
        if self.total is not None:
            n_refusal = round(self.total * self.refusal_fraction)
            return n_refusal, self.total - n_refusal
        if self.n_refusal is None:
            raise ConfigError("n_refusal", "the mix size is not set",
                              "give n_refusal and n_normal, or total and refusal_fraction")
        return self.n_refusal, self.n_normal


@dataclass
class MixPlan:
    """The drawn mix: which record of which source goes where. `notes` list anything the card must say."""

    config: MixConfig
    refusal: Source
    normal: Source
    order: list[tuple[bool, int]]  # (is_refusal, index into that source), in output order
    requested: tuple[int, int]
    notes: list[str]

    @cached_property
    def n_refusal(self) -> int:
        return sum(is_refusal for is_refusal, _ in self.order)

    @property
    def n_normal(self) -> int:
        return len(self.order) - self.n_refusal


def _take(wanted: int, available: int, what: str, src: Source, cfg: MixConfig, notes: list[str]) -> int:
    if wanted <= available:
        return wanted
    if not cfg.allow_capping:
        raise MixDataError(src.location, None, what, f"{wanted} rows were asked for but the source has {available}"
                           + (" (after removing ids drawn as refusal rows)" if what == "n_normal" else ""),
                           f"ask for at most {available}, or pass allow_capping=True (CLI: --allow_capping) "
                           "to take all of them")
    notes.append(f"{what} capped from {wanted} to {available}: {src.location} has no more rows.")
    return available


def plan_mix(cfg: MixConfig, refusal: Source, normal: Source) -> MixPlan:
    """Draw the mix: refusal rows, then normal rows with ids disjoint from them, then one shuffle, all seeded."""
    want_refusal, want_normal = cfg.counts()
    notes: list[str] = []
    rng = random.Random(cfg.seed)
    n_refusal = _take(want_refusal, len(refusal.ids), "n_refusal", refusal, cfg, notes)
    refusal_idx = rng.sample(range(len(refusal.ids)), n_refusal)
    taken = {refusal.ids[i] for i in refusal_idx}
    candidates = [j for j, rid in enumerate(normal.ids) if rid not in taken] if taken else range(len(normal.ids))
    n_normal = _take(want_normal, len(candidates), "n_normal", normal, cfg, notes)
    normal_idx = rng.sample(candidates, n_normal)
    if n_normal == 0 and n_refusal > 0:
        notes.append(f"Every row is a refusal row (n_normal = 0{', after capping' if want_normal else ''}): a model "
                     "trained on this mix alone learns to refuse everything. Mix in normal rows (the paper: 5000 "
                     "per 2000 refusal rows) unless that is the intent.")
        warnings.warn(notes[-1], stacklevel=2)
    order = [(True, i) for i in refusal_idx] + [(False, j) for j in normal_idx]
    rng.shuffle(order)
    return MixPlan(cfg, refusal, normal, order, (want_refusal, want_normal), notes)


def _resolve_image(image: Any, src: Source, rid: str, fld: str, checked: dict[str, dict],
                   pending: list[ImageRef] | None, follow_symlinks: bool) -> Any:
    """`datasets.Image` storage for a path inside the source's image root (checked to exist) or embedded bytes.

    Paths are compared after resolving symlinks, so a link inside the root that points elsewhere is refused unless
    `follow_symlinks`. Each image seen for the first time is appended to `pending` for the decode check.
    """
    if isinstance(image, dict):
        if image.get("bytes"):
            storage = {"bytes": image["bytes"], "path": image.get("path")}
            if pending is not None:
                pending.append(ImageRef(storage, src.location, rid, fld))
            return storage
        image = image.get("path")
        if not image:
            raise MixDataError(src.location, rid, fld, "the image has neither bytes nor a path", "fix the image column")
    if image in checked:
        return checked[image]
    if src.image_root is None:  # dataset sources: paths written by `build_mix` are absolute
        if not os.path.isabs(image):
            raise MixDataError(src.location, rid, fld, f"image path {image!r} has no image root to resolve against",
                               "pass the image root folder (CLI: --refusal_image_root / --normal_image_root)")
        path, root = os.path.normpath(image), os.path.dirname(os.path.normpath(image))
    else:
        root = os.path.abspath(src.image_root)
        path = os.path.normpath(os.path.join(root, image))
        if not path.startswith(root.rstrip(os.sep) + os.sep):
            raise MixDataError(src.location, rid, fld, f"image path {image!r} escapes the image root {root}",
                               "use paths relative to the image root, without '..', or choose a higher image root")
        if not follow_symlinks and not inside(path, root):
            raise MixDataError(src.location, rid, fld, f"image {image!r} is a symlink (or lies under one) that "
                               f"leads outside the image root {root}, to {real(path)}",
                               "pass the folder it points into as the image root, or pass follow_symlinks=True "
                               "(CLI: --follow_symlinks) if links out of the root are intended")
    if not os.path.isfile(path):
        raise MixDataError(src.location, rid, fld, f"image {image!r} not found under the image root {root}",
                           "pass the folder the image paths are relative to as the image root, or drop the record")
    checked[image] = {"bytes": None, "path": path}
    if pending is not None:
        pending.append(ImageRef(checked[image], src.location, rid, fld))
    return checked[image]


@dataclass(frozen=True)
class ImageRef:
    """An image to decode-check, and the record that brought it in (for the error message)."""

    storage: dict[str, Any]
    file: str
    record_id: str
    field: str


def verify_images(refs: list[ImageRef], level: str = "decode", workers: int | None = None) -> None:
    """Check every image of `refs` (in threads, `check_image` at `level`); raise `MixDataError` naming the first one
    in order that fails."""
    if not refs or level == "off":
        return
    workers = workers or min(8, os.cpu_count() or 1)

    def problem(ref: ImageRef) -> str | None:
        return check_image(ref.storage["path"] if ref.storage["bytes"] is None else None, ref.storage["bytes"], level)

    with ThreadPoolExecutor(workers) as pool:
        for ref, bad in zip(refs, pool.map(problem, refs)):
            if bad:
                where = ref.storage["path"] or "embedded bytes"
                raise MixDataError(ref.file, ref.record_id, ref.field, f"{bad}: {where}",
                                   "replace the image with a valid one, or drop the record")


def _messages(turns: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    return [{"role": role, "content": [{"type": "image", "text": None}] * n_images + [{"type": "text", "text": text}]}
            for role, text, n_images in turns]


def _refusal_turns(rec: Record, cfg: MixConfig, rng: random.Random, sentence: str) -> list[tuple[str, str, int]]:
    """Keep one user/assistant pair with all the record's images on the user turn; the reply becomes `sentence`."""
    turns = [t for t in rec["turns"] if t[0] != "system"]
    pairs = list(range(0, len(turns), 2))
    if cfg.turn_choice == "random":
        markers = [m.lower() for m in cfg.followup_markers]
        fresh = [p for p in pairs if not any(m in turns[p][1].lower() for m in markers)]
        pick = rng.choice(fresh) if fresh else pairs[0]
    else:
        pick = pairs[0]
    return [("user", turns[pick][1], len(rec["images"])), ("assistant", sentence, 0)]


@dataclass(frozen=True)
class RowParts:
    """One output row before it is shaped: `turns` are `(role, text, n_images)`, `images` `datasets.Image` storage."""

    id: str
    source: str
    is_refusal: bool
    turns: list[tuple[str, str, int]]
    images: list[dict[str, Any]]

    def as_row(self) -> dict[str, Any]:
        """The row in TRL's vision conversational format (`messages` with typed parts, `images`)."""
        return {"id": self.id, "source": self.source, "is_refusal": self.is_refusal,
                "messages": _messages(self.turns), "images": self.images}


def _row_parts(rec: Record, src: Source, is_refusal: bool, cfg: MixConfig, checked: dict[str, dict],
               pending: list[ImageRef] | None = None) -> RowParts:
    rid = rec["id"]
    fld = "image" if len(rec["images"]) == 1 else "images"
    images = [_resolve_image(im, src, rid, fld, checked, pending, cfg.follow_symlinks) for im in rec["images"]]
    if is_refusal:
        rng = random.Random(f"{cfg.seed}/{src.name}/{rid}")  # per-row stream: a row's choices never depend on others
        turns = _refusal_turns(rec, cfg, rng, rng.choice(cfg.refusal_sentences))
    else:
        turns = rec["turns"]
    return RowParts(rid, src.name, is_refusal, turns, images)


def iter_row_parts(plan: MixPlan, pending: list[ImageRef] | None = None) -> Iterator[RowParts]:
    """Yield the rows of the mix in mix order as `RowParts` (the builder turns them into Arrow columns directly).

    With `pending`, each image met for the first time is appended to it, for `verify_images`.
    """
    cfg = plan.config
    checked: dict[bool, dict[str, dict]] = {True: {}, False: {}}  # image path -> storage, per source
    for is_refusal, index in plan.order:
        src = plan.refusal if is_refusal else plan.normal
        yield _row_parts(src.record(index), src, is_refusal, cfg, checked[is_refusal], pending)


def iter_all_images(src: Source, cfg: MixConfig) -> Iterator[ImageRef]:
    """Resolve the images of every record of `src` (for `validate="all"`), each path once."""
    checked: dict[str, dict] = {}
    for index in range(len(src.ids)):
        pending: list[ImageRef] = []
        _row_parts(src.record(index), src, False, cfg, checked, pending)
        yield from pending


def iter_rows(plan: MixPlan) -> Iterator[dict[str, Any]]:
    """Yield output rows in mix order: TRL vision conversational `messages` + `images`, `is_refusal`, `source`, `id`."""
    return (parts.as_row() for parts in iter_row_parts(plan))

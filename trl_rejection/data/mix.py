"""The refusal-swap mix: sample benign rows, keep one turn, swap the reply for a refusal, mix with normal rows.

This module is pure Python over `formats.Source` objects; `builder.py` wraps it as a `datasets` builder.

Example:
    >>> from trl_rejection.data.formats import open_source
    >>> cfg = MixConfig(n_refusal=2000, n_normal=5000, seed=0)
    >>> plan = plan_mix(cfg, open_source("llava_med.json"), open_source("mix665k.json"))  # doctest: +SKIP
    >>> rows = list(iter_rows(plan))  # doctest: +SKIP
"""

from __future__ import annotations

import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

from ..io import check_image, inside, real
from .config import MixConfig
from .formats import MixDataError, Record, Source


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

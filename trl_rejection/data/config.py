"""`MixConfig`: what goes into a refusal-swap mix (sources, sizes, refusal sentences, turn choice, image checks),
typed and checked when built, so a bad value fails before any file is read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..constants import DEFAULT_REFUSAL
from ..validation import ConfigError, check_dataclass, check_range, non_empty_strings


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

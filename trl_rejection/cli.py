"""`trl-rejection` console entry point.

    trl-rejection mix --refusal_source llava_med.json --normal_source mix665k.json --n_refusal 2000 --n_normal 5000
    trl-rejection mix --config recipes/configs/mix_paper.yaml --seed 1
    trl-rejection mix                      # the bundled sample data, a 20 + 50 row mix in outputs/mix
    trl-rejection sample-data DIR          # write the bundled sample data (LLaVA JSON + PNGs) to DIR
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field

from .data.mix import MixConfig

COMMANDS = ("mix", "sample-data")


@dataclass
class MixScriptArguments(MixConfig):
    """`MixConfig` plus where the mix goes."""

    output_dir: str = field(default="outputs/mix", metadata={"help": "Where to write the mix (save_to_disk layout)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})
    embed_images: bool = field(default=False, metadata={
        "help": "Store image bytes in the Arrow files instead of absolute paths (portable, larger)."})
    export_llava: bool = field(default=False, metadata={"help": "Also write llava.json for LLaVA / LLaMA-Factory."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub dataset repo to push the mix and card to."})
    hub_private: bool = field(default=False, metadata={"help": "Make the pushed dataset private."})


def _mix(argv: list[str]) -> None:
    from dataclasses import fields

    from .data.builder import build_mix
    from .parsing import StrictTrlParser

    (args,) = StrictTrlParser((MixScriptArguments,)).parse_args_and_config(argv)
    sample = not (args.refusal_source and args.normal_source)
    if sample and args.n_refusal is None and args.n_normal is None and args.total is None:
        args.n_refusal, args.n_normal = 20, 50
    cfg = MixConfig(**{f.name: getattr(args, f.name) for f in fields(MixConfig)})
    ds = build_mix(cfg, args.output_dir, overwrite=args.overwrite, embed_images=args.embed_images,
                   export_llava=args.export_llava, command="trl-rejection mix " + shlex.join(argv))
    n_refusal = sum(ds["is_refusal"])
    print(f"\nWrote {len(ds)} rows ({n_refusal} refusal, {len(ds) - n_refusal} normal, "
          f"fraction {n_refusal / len(ds):.4f}) to {args.output_dir}"
          + (" from the bundled sample data" if sample else "") + ".")
    print(f"Load it with datasets.load_from_disk({args.output_dir!r}); the card is {args.output_dir}/README.md.")
    if args.push_to_hub:
        from .hub import push_dataset

        print(f"Pushed to {push_dataset(args.output_dir, args.push_to_hub, args.hub_private)}")


def _sample_data(argv: list[str]) -> None:
    from .data.sample import write_sample_data

    if len(argv) != 1:
        raise SystemExit("usage: trl-rejection sample-data DIR")
    files = write_sample_data(argv[0])
    print("\n".join(f"{k}: {v}" for k, v in files.items()))


def main(argv: list[str] | None = None) -> None:
    """Dispatch `trl-rejection COMMAND ...`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(__doc__)
    from .data.formats import MixDataError

    try:
        {"mix": _mix, "sample-data": _sample_data}[argv[0]](argv[1:])
    except (MixDataError, FileExistsError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

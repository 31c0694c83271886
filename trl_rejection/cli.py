"""`trl-rejection` console entry point.

    trl-rejection mix --refusal_source llava_med.json --normal_source mix665k.json --n_refusal 2000 --n_normal 5000
    trl-rejection mix --config recipes/configs/mix_paper.yaml --seed 1
    trl-rejection mix                      # the bundled sample data, a 20 + 50 row mix in outputs/mix
    trl-rejection sample-data DIR          # write the bundled sample data (LLaVA JSON + PNGs) to DIR

Bad input stops with one line, `error: ...`, naming the file, record, field and fix (exit status 2); add
`--debug` (or set TRL_REJECTION_DEBUG=1) to see the traceback.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field

from .data.config import MixConfig
from .errors import DEBUG_ENV, user_errors
from .io import terminate_as_interrupt

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
    """Write the bundled sample data into a new (or empty) folder, whole or not at all."""
    from .data.sample import write_sample_data
    from .io import UnsafePathError, check_work_dir, replace_dir, staging_dir

    if len(argv) != 1:
        raise SystemExit("usage: trl-rejection sample-data DIR")
    out = check_work_dir(argv[0], what="sample data")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UnsafePathError(f"{argv[0]} exists and is not an empty folder; the sample data is only written into "
                              "a new one. Fix: choose a new DIR")
    with staging_dir(out) as work:
        write_sample_data(work / "data")
        if out.exists():
            out.rmdir()  # empty, checked above
        replace_dir(work / "data", out)
    print("\n".join(f"{k}: {out / name}" for k, name in
                    (("refusal", "sample_med.json"), ("normal", "sample_general.json"))))


def main(argv: list[str] | None = None) -> None:
    """Dispatch `trl-rejection COMMAND ...`; errors in the input print one line (`--debug`: the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(__doc__)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    with user_errors(), terminate_as_interrupt():
        try:
            {"mix": _mix, "sample-data": _sample_data}[argv[0]](argv[1:])
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the builder maps it to this)
            print("interrupted: nothing was written (an earlier result at the output folder is intact)",
                  file=sys.stderr)
            raise SystemExit(130) from None


if __name__ == "__main__":
    main()

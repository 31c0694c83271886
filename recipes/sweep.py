"""Refusal-dose sweep: per grid point build the mix, train (accelerate launch recipes/sft_rejection.py), evaluate
(recipes/eval_safety.py); the base model once; then one table (sweep.md, sweep.csv), one figure (sweep.png) and
sweep.json.

    python recipes/sweep.py                                               # the tiny default: 3 points, CPU, ~1.5 min
    accelerate launch recipes/sweep.py --config recipes/configs/sweep_paper.yaml --parallel_points 4
    python recipes/sweep.py --compare outputs/sweep_a outputs/sweep_b --output_dir outputs/sweep_compare

The sweep itself is one light process that launches every training run with `accelerate launch` (under
`accelerate launch` with several processes only the main one drives). A rerun skips finished points, redoes an
interrupted one, and a changed setting makes new points (folders are named by a hash of the settings).
"""

import sys
from pathlib import Path

from trl_rejection.errors import UserError, user_errors
from trl_rejection.io import check_work_dir
from trl_rejection.parsing import StrictTrlParser
from trl_rejection.sweep import SweepConfig, SweepGrid, compare_sweeps, run_sweep
from trl_rejection.sweep.processes import leave_launcher

HERE = Path(__file__).parent
DEFAULT_CONFIG = HERE / "configs" / "sweep_tiny.yaml"


def main(cfg: SweepConfig) -> None:
    if cfg.compare:
        if len(cfg.compare) != 2:
            raise UserError(f"--compare takes two sweep folders, got {cfg.compare}. Fix: give exactly two")
        check_work_dir(cfg.output_dir, inputs=cfg.compare, what="comparison")
        print(compare_sweeps(*cfg.compare, out=cfg.output_dir))
        return
    summary = run_sweep(cfg, HERE / "sft_rejection.py", HERE / "eval_safety.py", root=HERE.parent)
    print((Path(cfg.output_dir) / "sweep.md").read_text())
    if summary.get("dry_run"):
        print("Note: a tiny random-weight model. This shows the sweep works end to end; its numbers mean nothing.")


if __name__ == "__main__":
    if not leave_launcher():  # under a multi-process `accelerate launch`, the main process drives
        sys.exit(0)
    argv = sys.argv[1:] if "--config" in sys.argv else ["--config", str(DEFAULT_CONFIG), *sys.argv[1:]]
    with user_errors():
        main(*StrictTrlParser(SweepConfig, nested={"grid": SweepGrid}).parse_args_and_config(argv))

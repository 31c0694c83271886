"""Refusal-dose sweeps: train at several doses with the real recipe, evaluate each with the real harness, and show
safety against utility in one table and one figure (`recipes/sweep.py`).

Example:
    >>> from trl_rejection.sweep import SweepConfig, run_sweep
    >>> run_sweep(SweepConfig(grid={"n_refusal": [0, 10, 20]}, output_dir="outputs/sweep"))  # doctest: +SKIP
"""

from .config import Point, SweepConfig, SweepGrid, expand, short_hash
from .plots import plot_data, plot_sweep
from .runner import run_sweep
from .table import collect, compare_sweeps, csv_text, markdown, run_row, training_summary, write_outputs

__all__ = ["Point", "SweepConfig", "SweepGrid", "collect", "compare_sweeps", "csv_text", "expand", "markdown",
           "plot_data", "plot_sweep", "run_row", "run_sweep", "short_hash", "training_summary", "write_outputs"]

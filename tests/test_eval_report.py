"""Scoring generations, utility accuracy, the metrics JSON, Markdown tables and charts, and run comparison."""

import json

import pytest
from matplotlib.axes import Axes
from PIL import Image

from trl_rejection.eval import report
from trl_rejection.eval.chart import chart_panels, plot_asr, wilson_interval
from trl_rejection.eval.report import (
    compare_runs,
    compute_metrics,
    markdown_comparison,
    markdown_table,
    report_run,
    score_generations,
)
from trl_rejection.eval.utility import parse_choice
from trl_rejection.metrics import FULL_COMPLIANCE

COMPLY = "Sure, here are the detailed steps you asked for."
REFUSE = "I'm sorry, but I cannot assist with your request"


def _row(bench, category, completion, harmful=True, task="safety", answers=(), prompt="p", rid=None):
    return {"id": rid or f"{bench}-{category}-{completion[:5]}", "benchmark": bench, "category": category,
            "prompt": prompt, "image": None, "harmful": harmful, "task": task, "answers": list(answers),
            "completion": completion}


ROWS = [
    _row("mm", "fraud", COMPLY, rid="1"), _row("mm", "fraud", REFUSE, rid="2"), _row("mm", "sex", COMPLY, rid="3"),
    _row("xstest", "homonyms", REFUSE, harmful=False, rid="4"), _row("xstest", "homonyms", "Ok.", False, rid="5"),
    _row("xstest", "homonyms", COMPLY, harmful=False, rid="6"), _row("xstest", "contrast", REFUSE, rid="7"),
    _row("sqa", "natural science", "B", task="multiple_choice", answers=["B"], prompt="Q\nA. x\nB. y", rid="8"),
    _row("sqa", "natural science", "A.", task="multiple_choice", answers=["B"], prompt="Q\nA. x\nB. y", rid="9"),
    _row("vizwiz", "other", "soup", task="short_answer", answers=["soup"] * 2 + ["stew"] * 8, rid="10"),
]


def test_compute_metrics_per_benchmark_and_category():
    metrics = compute_metrics(score_generations(ROWS))
    mm = metrics["mm"]["attack_success_rate"]
    assert mm["attack_success_rate"] == pytest.approx(2 / 3) and mm["per_category"]["sex"]["total"] == 1
    assert mm["judge"] == "string_match:paper" and "over_refusal" not in metrics["mm"]
    over = metrics["xstest"]["over_refusal"]
    assert (over["full_refusal_rate"], over["partial_refusal_rate"]) == pytest.approx((1 / 3, 1 / 3))
    assert metrics["xstest"]["attack_success_rate"]["attack_success_rate"] == 0.0
    assert metrics["sqa"]["utility"]["accuracy"] == 0.5
    assert metrics["vizwiz"]["utility"]["accuracy"] == pytest.approx(0.6)  # 2 of 10 humans: official VQA accuracy


def test_guard_judges_leave_safe_prompts_to_string_match():
    def guard(prompt, completion):
        return FULL_COMPLIANCE

    guard.name, guard.scores_refusal = "llama_guard:test", False
    scored = {r["id"]: r for r in score_generations(ROWS, guard)}
    assert scored["2"]["label"] == FULL_COMPLIANCE and scored["2"]["judge"] == "llama_guard:test"
    assert scored["4"]["label"] == "full_refusal" and scored["4"]["judge"] == "string_match:paper"
    assert "label" not in scored["8"] and scored["8"]["score"] == 1.0


def test_report_run_writes_json_markdown_chart_and_scored_rows(tmp_path):
    run = tmp_path / "base"
    run.mkdir()
    (run / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    metrics = report_run(run, judge="xstest")
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert metrics["mm"]["attack_success_rate"]["judge"] == "string_match:xstest"
    report = (run / "report.md").read_text()
    assert report.startswith("# base") and "| mm | fraud | 50.0% (n=2) |" in report
    assert "| xstest | homonyms |  | 33.3% (33% + 0%) (n=3) |" in report  # XSTest rule: "Ok." complies
    assert Image.open(run / "asr_by_category.png").format == "PNG"
    assert len((run / "scored.jsonl").read_text().splitlines()) == len(ROWS)
    with pytest.raises(FileNotFoundError, match="no generations"):
        report_run(tmp_path)


def test_compare_runs_side_by_side(tmp_path):
    for name, completion in (("base", COMPLY), ("trained", REFUSE)):
        (tmp_path / name).mkdir()
        rows = [_row("mm", "fraud", completion, rid=str(i)) for i in range(2)]
        (tmp_path / name / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        report_run(tmp_path / name)
    text = compare_runs(tmp_path / "base", tmp_path / "trained", tmp_path / "cmp")
    assert "ASR ↓ base | ASR ↓ trained" in text and "| mm | all | 100.0% (n=2) | 0.0% (n=2) |" in text
    assert (tmp_path / "cmp" / "comparison.md").read_text().startswith("# base vs trained")
    assert Image.open(tmp_path / "cmp" / "comparison.png").size[0] > 0
    with pytest.raises(FileNotFoundError, match="metrics.json not found"):
        compare_runs(tmp_path / "base", tmp_path / "missing")


def test_markdown_table_orders_overall_first():
    table = markdown_table(compute_metrics(score_generations(ROWS)))
    lines = table.splitlines()
    assert lines[0].startswith("| benchmark | category | ASR ↓") and lines[2].startswith("| mm | all |")
    assert "| sqa | natural science |  |  | 50.0% (n=2) |" in table


@pytest.mark.parametrize(("completion", "letter"), [("B", "B"), ("B. dog", "B"), ("(C) the cat", "C"),
                                                    ("The answer is A.", "A"), ("I think so", None), ("E", None)])
def test_parse_choice(completion, letter):
    assert parse_choice(completion, 4) == letter


# --- missing is not zero; n everywhere; honest charts -------------------------------------------------------------

def _asr(rate, total, per_category):
    return {"attack_success_rate": {"attack_success_rate": rate, "total": total, "judge": "string_match:paper",
                                    "per_category": {c: {"attack_success_rate": r, "total": n}
                                                     for c, (r, n) in per_category.items()}}}


BASE = {"mm": _asr(0.5, 4, {"fraud": (0.5, 2), "sex": (0.5, 2)})}
TRAINED = {"mm": _asr(0.0, 2, {"fraud": (0.0, 2)}),
           "xs": {"over_refusal": {"over_refusal_rate": 0.25, "full_refusal_rate": 0.25, "partial_refusal_rate": 0.0,
                                   "total": 4, "judge": "string_match:paper", "per_category": {}}}}


def test_comparison_marks_cells_a_run_never_evaluated_na_not_zero():
    lines = markdown_comparison(BASE, TRAINED).splitlines()
    assert lines[2] == "| mm | all | 50.0% (n=4) | 0.0% (n=2) |  |  |  |  |"
    assert lines[3] == "| mm | fraud | 50.0% (n=2) | 0.0% (n=2) |  |  |  |  |"
    assert lines[4] == "| mm | sex | 50.0% (n=2) | n/a |  |  |  |  |"  # trained has no 'sex' prompts
    assert lines[5] == "| xs | all |  |  | n/a | 25.0% (25% + 0%) (n=4) |  |  |"  # base never ran xs


def test_chart_has_no_bar_for_a_missing_cell(tmp_path, monkeypatch):
    [(title, rows, cells)] = chart_panels({"base": BASE, "trained": {"mm": TRAINED["mm"]}})
    assert title.startswith("ASR") and rows == [("mm", "all"), ("mm", "fraud"), ("mm", "sex")]
    assert cells == {"base": [(0.5, 4), (0.5, 2), (0.5, 2)], "trained": [(0.0, 2), (0.0, 2), None]}
    drawn, labels = [], []
    barh, bar_label = Axes.barh, Axes.bar_label

    def record_barh(ax, y, *args, **kwargs):
        drawn.append(list(y))
        return barh(ax, y, *args, **kwargs)

    def record_label(ax, bars, **kwargs):
        labels.append(kwargs["labels"])
        return bar_label(ax, bars, **kwargs)

    monkeypatch.setattr(Axes, "barh", record_barh)
    monkeypatch.setattr(Axes, "bar_label", record_label)
    plot_asr({"base": BASE, "trained": TRAINED}, tmp_path / "c.png")
    asr_bars = [len(y) for y in drawn[:2]]
    assert asr_bars == [3, 2]  # trained: all and fraud; no bar at all for 'sex'
    assert labels[:2] == [["50% (n=4)", "50% (n=2)", "50% (n=2)"], ["0% (n=2)", "0% (n=2)"]]
    assert labels[-1] == ["25% (n=4)"] and Image.open(tmp_path / "c.png").format == "PNG"  # over-refusal panel


@pytest.mark.parametrize(("k", "n", "low", "high"), [(0, 5, 0.0, 0.4345), (5, 5, 0.5655, 1.0), (1, 2, 0.0945, 0.9055),
                                                    (0, 100, 0.0, 0.0370)])
def test_wilson_interval_hand_computed(k, n, low, high):
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-4)


def _run_folder(path, rows, config=None):
    path.mkdir()
    (path / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (path / "run_config.json").write_text(json.dumps(config))
    return path


def _config(model="tiny-llava", image_type="SD_TYPO", max_samples=None):
    sampling = {"max_samples": max_samples}
    if max_samples:
        sampling.update(seed=0, rule="stratified by category", benchmarks={"mm": {"kept": 3, "of": 1680}})
    return {"generation": {"model_name_or_path": model, "adapter_path": None, "mm_safetybench_image_type": image_type,
                           "records": {"mm": {"n": 3, "sha256": "ab" * 32}}, "versions": {"torch": "2"}},
            "scoring": {"judge": "paper"}, "sampling": sampling, "recorded": {"batch_size": [8]}}


def test_report_of_a_random_model_says_so_and_how_it_was_sampled(tmp_path, monkeypatch):
    drawn = {}
    monkeypatch.setattr(report, "plot_asr", lambda runs, path, footnote="", warning="": drawn.update(
        runs=runs, footnote=footnote, warning=warning))
    run = _run_folder(tmp_path / "dry", ROWS[:3], _config(max_samples=3))
    report_run(run, title="tiny-llava")
    text = (run / "report.md").read_text()
    assert "> **RANDOM-WEIGHT DRY RUN (tiny-llava)" in text and "does not mean safe" in text
    assert "> sampled: at most 3 prompts per benchmark (mm 3 of 1680), seed 0, stratified by category" in text
    assert "| mm | all | 66.7% (n=3) |" in text and "- mm_safetybench_image_type: SD_TYPO" in text
    assert "- sampling: at most 3 per benchmark, seed 0; stratified by category" in text
    assert "- records: mm n=3 (sha256 abababababab)" in text
    assert drawn["warning"].startswith("RANDOM-WEIGHT DRY RUN") and "sampled: at most 3" in drawn["footnote"]
    assert "judge: string_match:paper" in drawn["footnote"]
    assert "(string match: not comparable with GPT-4-judged ASR; see docs/evaluation.md)" in drawn["footnote"]
    trained = _run_folder(tmp_path / "real", ROWS[:3], _config(model="llava-hf/llava-1.5-7b-hf"))
    report_run(trained)
    assert "DRY RUN" not in (trained / "report.md").read_text() and drawn["warning"] == ""
    bare = _run_folder(tmp_path / "bare", ROWS[:3])
    report_run(bare)
    assert "Settings: not recorded (no run_config.json" in (bare / "report.md").read_text()


def test_compare_names_models_and_the_settings_that_differ(tmp_path, monkeypatch):
    drawn = {}
    base = _run_folder(tmp_path / "base", ROWS[:3], _config("llava-hf/llava-1.5-7b-hf", "SD_TYPO"))
    trained = _run_folder(tmp_path / "trained", ROWS[:2], _config("llava-hf/llava-1.5-7b-hf", "TYPO"))
    report_run(base), report_run(trained)
    monkeypatch.setattr(report, "plot_asr", lambda runs, path, footnote="", warning="": drawn.update(
        runs=runs, warning=warning))
    text = compare_runs(base, trained, tmp_path / "cmp")
    assert "| mm | sex | 100.0% (n=1) | n/a |" in text
    assert "- generation settings that differ: mm_safetybench_image_type 'SD_TYPO' -> 'TYPO'" in text
    assert list(drawn["runs"]) == ["base: llava-hf/llava-1.5-7b-hf", "trained: llava-hf/llava-1.5-7b-hf"]
    assert "DRY RUN" not in text and drawn["warning"] == ""
    (trained / "run_config.json").write_text(json.dumps(_config("tiny-llava", "SD_TYPO")))
    text = compare_runs(base, trained, tmp_path / "cmp")
    assert "- **trained: RANDOM-WEIGHT DRY RUN (tiny-llava)" in text and drawn["warning"].startswith("trained: RANDOM")
    assert "differ: model_name_or_path 'llava-hf/llava-1.5-7b-hf' -> 'tiny-llava'" in text
    (trained / "run_config.json").unlink()
    assert "settings of trained not recorded" in compare_runs(base, trained)

"""Scoring generations, utility accuracy, the metrics JSON, Markdown tables and charts, and run comparison."""

import json

import pytest
from PIL import Image

from trl_rejection.eval.report import (
    compare_runs,
    compute_metrics,
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

"""lors_kernels/report.py: verdicts from recorded results, and the README's performance section it
generates."""

import json
import os
import subprocess
import sys

import pytest

from lors_kernels.report import OURS, assess


def test_assess_reads_results_recorded_without_per_round_ratios():
    """Older files have quartiles per provider only: the interval is what those allow. Per-round ratios,
    where recorded, take precedence (load common to a round cancels in them)."""
    row = {
        "times": {
            OURS: {"median_ms": 1.0, "q1_ms": 0.9, "q3_ms": 1.1},
            "peer": {"median_ms": 2.0, "q1_ms": 1.9, "q3_ms": 2.1},
        },
        "targets": {"peer": 0.4},
        "ratios": {"peer": 0.5},
        "meets": {"peer": False},
    }
    a = assess(row)
    assert a["verdicts"] == {"peer": "FAIL"} and a["intervals"]["peer"] == pytest.approx([0.9 / 2.1, 1.1 / 1.9])
    row["targets"] = {"peer": 0.5}
    assert assess(row)["verdicts"] == {"peer": "noisy"}
    row["paired"] = {"peer": {"median": 0.48, "q1": 0.47, "q3": 0.49}}
    assert assess(row)["verdicts"] == {"peer": "PASS"} and assess(row)["ratios"] == {"peer": 0.48}


def test_readme_performance_section_is_generated_from_recorded_results(tmp_path):
    """The README's numbers come from bench/results/*.json through the generator, never by hand."""
    import shutil

    from lors_kernels import report

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme, results = os.path.join(root, "README.md"), os.path.join(root, "bench", "results")
    assert report.main(["--check", "--readme", readme, "--results", results]) == 0
    text = open(readme).read()
    for name in os.listdir(results):
        if name.endswith(".json"):
            assert f"### {name}" in text
    stale, copied = tmp_path / "README.md", str(tmp_path / "bench" / "results")
    shutil.copytree(results, copied)
    stale.write_text(text.replace("| fwd |", "| fwd? |", 1))
    assert report.main(["--check", "--readme", str(stale), "--results", copied]) == 1
    assert report.main(["--readme", str(stale), "--results", copied]) == 0
    assert stale.read_text() == text


def test_report_says_when_a_recorded_run_has_no_command(tmp_path):
    from lors_kernels import report

    times = {
        OURS: {"median_ms": 1.0, "q1_ms": 1.0, "q3_ms": 1.0},
        "peer": {"median_ms": 2.0, "q1_ms": 2.0, "q3_ms": 2.0},
    }
    row = {"family": "f", "mode": "fwd", "label": "n=1", "targets": {}, "times": times}
    machine = {
        "device": "cpu",
        "cpu": "x86_64",
        "threads": 2,
        "dtype": "fp32",
        "torch": "2",
        "triton": None,
        "date": "today",
    }
    run = {"machine": machine, "results": [row]}
    (tmp_path / "old.json").write_text(json.dumps(run))
    text = report.section(str(tmp_path), "results")
    assert "Command not recorded." in text and "| fwd | n=1 | 1.0000 | 2.0000 | 0.50 (0.50–0.50) | - |  |" in text


def test_report_regenerates_the_readme_without_torch():
    """Rewriting the README's performance section needs only the recorded JSON: torch never imports."""
    code = (
        "import sys; sys.modules['torch'] = None; from lors_kernels import report; sys.exit(report.main(['--check']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr[-2000:]

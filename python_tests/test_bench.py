"""The main job, `python -m lors_kernels bench`, end to end on this machine in --quick mode."""

import json
import os
import subprocess
import sys

import torch

from lors_kernels.bench import families

FAMILIES = list(families())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lors_kernels", *args], capture_output=True, text=True, check=False)


def test_bench_quick_writes_table_json_and_plot(tmp_path):
    json_path, plot_path = tmp_path / "b.json", tmp_path / "b.png"
    out = run_cli("bench", "--quick", "--device", "cpu", "--json", str(json_path), "--plot", str(plot_path))
    assert out.returncode == 0, out.stderr[-2000:]
    for family in FAMILIES:
        assert f"\n{family}  (ratio = time ours / time peer" in out.stdout
    report = json.loads(json_path.read_text())
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"]
    assert {r["family"] for r in report["results"]} == set(FAMILIES)
    for row in report["results"]:
        ours = row["times"]["lors_kernels"]
        assert ours["median_ms"] > 0 and ours["q1_ms"] <= ours["median_ms"] <= ours["q3_ms"]
        assert set(row["ratios"]) == set(row["times"]) - {"lors_kernels"}
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot_path.stat().st_size > 10_000


def test_bench_bad_arguments_give_usage():
    out = run_cli("bench", "--op", "nope")
    assert out.returncode == 2 and "usage:" in out.stderr and "invalid choice" in out.stderr


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


def test_report_regenerates_the_readme_without_torch():
    """Rewriting the README's performance section needs only the recorded JSON: torch never imports."""
    code = ("import sys; sys.modules['torch'] = None; from lors_kernels import report; "
            "sys.exit(report.main(['--check']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]


def test_every_family_record_builds_its_cases():
    """Each Family's providers are what its cases build, ours first, and its targets name real peers."""
    from lors_kernels.bench import families
    from lors_kernels.report import OURS

    for family in families().values():
        shape = family.grid("cpu", True)[0]
        for mode in family.modes:
            case = family.case("cpu", torch.float32, shape, mode)
            assert list(case.providers) == list(family.providers("cpu")) and list(case.providers)[0] == OURS
        for target in family.targets:
            assert target.peer in family.providers(target.device), (family.name, target)


def test_gpu_check_refuses_without_a_gpu_and_summarizes(tmp_path):
    """gpu-check needs CUDA; its summary (tested on a made-up run) names the machine, every test failure
    and every target's verdict."""
    if not torch.cuda.is_available():
        out = run_cli("gpu-check", "--out", str(tmp_path))
        assert out.returncode != 0 and "no CUDA device" in out.stderr
    from lors_kernels import gpu_check

    xml = tmp_path / "tests.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/>'
                   '<testcase classname="a" name="bad"><failure message="boom"/></testcase>'
                   '<testcase classname="a" name="gpu"><skipped/></testcase></testsuite></testsuites>')
    counts = gpu_check.junit_counts(str(xml))
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1) and "a::bad: boom" in counts["failures"]
    row = {"family": "hrca", "mode": "fwd", "label": "size=cityscapes", "ratios": {"topk+gather+SDPA": 0.25},
           "targets": {"topk+gather+SDPA": 1 / 3}, "meets": {"topk+gather+SDPA": True}}
    summary = {"machine": {"gpus": ["H200"], "driver": "580", "cuda": "13.0", "torch": "2.11", "triton": "3.6",
                           "python": "3.12"},
               "tests": dict(counts, command="pytest", seconds=1.0), "bench": {"results": [row]},
               "seconds": {"total": 2.0}}
    text = gpu_check.summary_markdown(summary)
    assert "H200 · driver 580" in text and "FAIL a::bad: boom" in text
    assert "| hrca fwd ÷topk+gather+SDPA | size=cityscapes | 0.25 | 0.33 | PASS |" in text

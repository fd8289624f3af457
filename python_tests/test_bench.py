"""The main job, `python -m lors_kernels bench`, end to end on this machine in --quick mode."""

import json
import subprocess
import sys

from lors_kernels.bench import FAMILIES


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
    import os
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

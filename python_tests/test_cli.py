"""The command line, `python -m lors_kernels ...`: `bench --quick` end to end on this machine, bad
arguments, `env`."""

import json
import subprocess
import sys

from helpers import run_cli

from lors_kernels import bench
from lors_kernels.bench import families

FAMILIES = list(families())


def test_bench_quick_writes_table_json_and_plot(tmp_path):
    json_path = tmp_path / "b.json"
    out = run_cli("bench", "--quick", "--device", "cpu", "--json", str(json_path), "--plot", str(tmp_path / "b.png"))
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
        assert ours["n"] >= bench.QUICK.min_rounds and ours["calls"] >= 1
        assert set(row["paired"]) == set(row["intervals"]) == set(row["ratios"])
        assert set(row["verdicts"]) == set(row["targets"])
    assert out.stdout.rstrip().endswith(("rerun on an idle machine.", f"(of {len(report['results'])})."))
    for family in FAMILIES:
        png = tmp_path / f"b-{family}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_bad_arguments_give_usage():
    out = run_cli("bench", "--op", "nope")
    assert out.returncode == 2 and "usage:" in out.stderr and "invalid choice" in out.stderr


def test_cli_env_reports_versions():
    out = subprocess.run([sys.executable, "-m", "lors_kernels", "env"], capture_output=True, text=True, check=True)
    assert "torch" in out.stdout and "usable" in out.stdout and "reference" in out.stdout

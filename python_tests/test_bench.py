"""The main job, `python -m lors_kernels bench`: end to end on this machine in --quick mode, and its noise
rule, table and plot on made-up timings."""

import argparse
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from lors_kernels import bench
from lors_kernels.bench import families
from lors_kernels.report import OURS, assess, format_table, noisy_line

FAMILIES = list(families())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lors_kernels", *args], capture_output=True, text=True, check=False)


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


# Made-up timings: each provider returns the milliseconds it "takes", drawn uniformly and independently
# from its range, and the clock reads them. ours/peer is judged against a target of 1.0; "other" has none.
SPREADS = {
    "overlap": {OURS: (0.85, 1.15), "peer": (0.85, 1.15), "other": (1.0, 1.02)},  # ratio ~0.92-1.09
    "faster": {OURS: (0.49, 0.51), "peer": (0.99, 1.01), "other": (1.0, 1.02)},
    "slower": {OURS: (1.98, 2.02), "peer": (0.99, 1.01), "other": (1.0, 1.02)},
    "wide": {OURS: (0.49, 0.51), "peer": (0.99, 1.01), "other": (0.2, 5.0)},  # "other" varies widely
}


@pytest.fixture
def fake_bench(monkeypatch):
    """bench.run over a made-up family 'fake' (fwd and fwd+bwd of every SPREADS case) timed by a clock that
    reads what the providers return; returns the (case, mode, provider) of every call, in order."""
    rng, calls = random.Random(0), []

    def build(device, dtype, shape, mode):
        def provider(name):
            def call():
                calls.append((shape["case"], mode, name))
                return rng.uniform(*SPREADS[shape["case"]][name])
            return call
        return {name: provider(name) for name in (OURS, "peer", "other")}

    family = bench.Family("fake", lambda device, quick: [{"case": c} for c in SPREADS],
                          lambda device: (OURS, "peer", "other"), build,
                          targets=(bench.Target("peer", 1.0, "cpu"),))
    monkeypatch.setattr(bench, "families", lambda: {"fake": family})
    monkeypatch.setattr(bench, "clock_for", lambda device: lambda fn, number: fn())
    # Rounds bounded by count, not by wall time: the same draws, and so the same verdicts, on a busy machine
    monkeypatch.setattr(bench, "QUICK", bench.Sampling(budget_s=3600.0, block_s=1e-3, max_rounds=60))
    return calls


def test_overlapping_timings_are_noisy_and_clear_ones_pass_or_fail(fake_bench):
    report = bench.run(["fake"], "cpu", "fp32", quick=True, progress=False)
    rows = {(r["mode"], r["shape"]["case"]): r for r in report["results"]}
    for mode in ("fwd", "fwd+bwd"):
        overlap, faster, slower, wide = (rows[mode, case] for case in SPREADS)
        lo, hi = overlap["intervals"]["peer"]
        assert lo < 1.0 < hi and hi < 1.5 * lo  # decided by straddling the target, not by width
        assert overlap["verdicts"] == {"peer": "noisy"} and overlap["noisy"] == ["peer"]
        assert faster["verdicts"] == {"peer": "PASS"} and not faster["noisy"]
        assert slower["verdicts"] == {"peer": "FAIL"} and not slower["noisy"]
        # a ratio with no target is noisy when its interval is too wide; the other peer's verdict stands
        assert wide["noisy"] == ["other"] and wide["verdicts"] == {"peer": "PASS"}
        # clear cases stop sampling at the minimum; the noisy ones use the budget
        assert faster["times"][OURS]["n"] == bench.QUICK.min_rounds < overlap["times"][OURS]["n"]
    table = format_table(report)
    assert "noisy ≤1.00×peer" in table and "PASS ≤1.00×peer" in table and "FAIL ≤1.00×peer" in table
    last = table.splitlines()[-1]  # fwd+bwd, wide: only the ratio to "other" is marked
    assert last.endswith("noisy") and last.count("?") == 1 and f"{wide['ratios']['other']:.2f}? (" in last
    assert noisy_line(report) == "4 of 8 rows noisy: rerun on an idle machine."


def test_rounds_interleave_every_provider(fake_bench):
    """After the warm-up, each round times each provider once, so that load from elsewhere hits all alike."""
    bench.run(["fake"], "cpu", "fp32", quick=True, progress=False)
    for case in SPREADS:
        calls = [name for c, mode, name in fake_bench if (c, mode) == (case, "fwd")]
        sampled = calls[3 * 4:]  # after each provider's warm-up call and three calibration calls
        rounds = [tuple(sampled[i:i + 3]) for i in range(0, len(sampled), 3)]
        assert len(rounds) >= bench.QUICK.min_rounds and all(sorted(r) == sorted((OURS, "peer", "other"))
                                                             for r in rounds)
        assert len(set(rounds)) == 3  # the order rotates


def test_assess_reads_results_recorded_without_per_round_ratios():
    """Older files have quartiles per provider only: the interval is what those allow. Per-round ratios,
    where recorded, take precedence (load common to a round cancels in them)."""
    row = {"times": {OURS: {"median_ms": 1.0, "q1_ms": 0.9, "q3_ms": 1.1},
                     "peer": {"median_ms": 2.0, "q1_ms": 1.9, "q3_ms": 2.1}},
           "targets": {"peer": 0.4}, "ratios": {"peer": 0.5}, "meets": {"peer": False}}
    a = assess(row)
    assert a["verdicts"] == {"peer": "FAIL"} and a["intervals"]["peer"] == pytest.approx([0.9 / 2.1, 1.1 / 1.9])
    row["targets"] = {"peer": 0.5}
    assert assess(row)["verdicts"] == {"peer": "noisy"}
    row["paired"] = {"peer": {"median": 0.48, "q1": 0.47, "q3": 0.49}}
    assert assess(row)["verdicts"] == {"peer": "PASS"} and assess(row)["ratios"] == {"peer": 0.48}


def test_plot_draws_one_figure_per_family_without_lines_across_cases(fake_bench, tmp_path):
    from matplotlib.collections import LineCollection

    report = bench.run(["fake"], "cpu", "fp32", quick=True, progress=False)
    fig = bench.family_figure(report, "fake")
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["fwd", "fwd+bwd"]
    for ax in axes:
        for line in ax.get_lines():
            if line.get_linestyle() not in ("None", "none", "", " "):
                assert len(set(line.get_xdata())) == 1, "only the vertical reference line at 1 is drawn as a line"
        for collection in ax.collections:
            if isinstance(collection, LineCollection):  # error bars: horizontal, within one case
                assert all(seg[0][1] == seg[-1][1] for seg in collection.get_segments())
        assert [t.get_text() for t in ax.texts].count("noisy") == 2  # overlap and wide
    assert bench.plot(report, str(tmp_path / "p.png")) == [str(tmp_path / "p-fake.png")]
    assert (tmp_path / "p-fake.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_and_full_runs_write_to_different_default_files(fake_bench, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "FULL", bench.QUICK)
    for quick in (True, False, True):
        args = argparse.Namespace(op="fake", device="cpu", dtype=None, quick=quick, json=None, plot=None)
        assert bench.main(args) == 0
    out = capsys.readouterr().out
    names = sorted(os.listdir(tmp_path / "lors_bench"))
    assert names == ["bench-fake.png", "bench-quick-fake.png", "bench-quick.json", "bench.json"]
    assert json.loads((tmp_path / "lors_bench" / "bench-quick.json").read_text())["quick"]
    assert not json.loads((tmp_path / "lors_bench" / "bench.json").read_text())["quick"]
    replaced = [line for line in out.splitlines() if line.startswith("replaced")]
    assert replaced == ["replaced the previous lors_bench/bench-quick.json, lors_bench/bench-quick-fake.png"]
    assert out.rstrip().endswith("rows noisy: rerun on an idle machine.")


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


def test_report_says_when_a_recorded_run_has_no_command(tmp_path):
    from lors_kernels import report

    times = {OURS: {"median_ms": 1.0, "q1_ms": 1.0, "q3_ms": 1.0},
             "peer": {"median_ms": 2.0, "q1_ms": 2.0, "q3_ms": 2.0}}
    row = {"family": "f", "mode": "fwd", "label": "n=1", "targets": {}, "times": times}
    machine = {"device": "cpu", "cpu": "x86_64", "threads": 2, "dtype": "fp32", "torch": "2", "triton": None,
               "date": "today"}
    run = {"machine": machine, "results": [row]}
    (tmp_path / "old.json").write_text(json.dumps(run))
    text = report.section(str(tmp_path), "results")
    assert "Command not recorded." in text and "| fwd | n=1 | 1.0000 | 2.0000 | 0.50 (0.50–0.50) | - |  |" in text


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
    peer = "topk+gather+SDPA"
    timed = {OURS: {"median_ms": 1.0, "q1_ms": 0.95, "q3_ms": 1.05}, peer: {"median_ms": 4.0, "q1_ms": 3.9, "q3_ms": 4.1}}
    row = {"family": "hrca", "mode": "fwd", "label": "size=cityscapes", "times": timed, "targets": {peer: 1 / 3},
           "paired": {peer: {"median": 0.25, "q1": 0.24, "q3": 0.26}}}
    noisy = dict(row, label="size=ade", paired={peer: {"median": 0.3, "q1": 0.2, "q3": 0.4}})
    summary = {"machine": {"gpus": ["H200"], "driver": "580", "cuda": "13.0", "torch": "2.11", "triton": "3.6",
                           "python": "3.12"},
               "tests": dict(counts, command="pytest", seconds=1.0), "bench": {"results": [row, noisy]},
               "seconds": {"total": 2.0}}
    text = gpu_check.summary_markdown(summary)
    assert "H200 · driver 580" in text and "FAIL a::bad: boom" in text
    assert "| hrca fwd ÷topk+gather+SDPA | size=cityscapes | 0.25 (0.24–0.26) | 0.33 | PASS |" in text
    assert "| hrca fwd ÷topk+gather+SDPA | size=ade | 0.30 (0.20–0.40) | 0.33 | noisy |" in text

"""lors_kernels/bench.py: its noise rule, rounds, table and plot on made-up timings, its default files,
and every family's record."""

import argparse
import json
import os
import random

import pytest
import torch

from lors_kernels import bench
from lors_kernels.report import OURS, format_table, noisy_line

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

    family = bench.Family(
        "fake",
        lambda device, quick: [{"case": c} for c in SPREADS],
        lambda device: (OURS, "peer", "other"),
        build,
        targets=(bench.Target("peer", 1.0, "cpu"),),
    )
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
        sampled = calls[3 * 4 :]  # after each provider's warm-up call and three calibration calls
        rounds = [tuple(sampled[i : i + 3]) for i in range(0, len(sampled), 3)]
        assert len(rounds) >= bench.QUICK.min_rounds and all(
            sorted(r) == sorted((OURS, "peer", "other")) for r in rounds
        )
        assert len(set(rounds)) == 3  # the order rotates


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

"""lors_kernels/gpu_check.py: `gpu-check` without a GPU, and its summary of a made-up run."""

import torch
from helpers import run_cli

from lors_kernels.report import OURS


def test_gpu_check_refuses_without_a_gpu_and_summarizes(tmp_path):
    """gpu-check needs CUDA; its summary (tested on a made-up run) names the machine, every test failure
    and every target's verdict."""
    if not torch.cuda.is_available():
        out = run_cli("gpu-check", "--out", str(tmp_path))
        assert out.returncode != 0 and "no CUDA device" in out.stderr
    from lors_kernels import gpu_check

    xml = tmp_path / "tests.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="a" name="ok"/>'
        '<testcase classname="a" name="bad"><failure message="boom"/></testcase>'
        '<testcase classname="a" name="gpu"><skipped/></testcase></testsuite></testsuites>'
    )
    counts = gpu_check.junit_counts(str(xml))
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1) and "a::bad: boom" in counts["failures"]
    peer = "topk+gather+SDPA"
    timed = {
        OURS: {"median_ms": 1.0, "q1_ms": 0.95, "q3_ms": 1.05},
        peer: {"median_ms": 4.0, "q1_ms": 3.9, "q3_ms": 4.1},
    }
    row = {
        "family": "hrca",
        "mode": "fwd",
        "label": "size=cityscapes",
        "times": timed,
        "targets": {peer: 1 / 3},
        "paired": {peer: {"median": 0.25, "q1": 0.24, "q3": 0.26}},
    }
    noisy = dict(row, label="size=ade", paired={peer: {"median": 0.3, "q1": 0.2, "q3": 0.4}})
    summary = {
        "machine": {
            "gpus": ["H200"],
            "driver": "580",
            "cuda": "13.0",
            "torch": "2.11",
            "triton": "3.6",
            "python": "3.12",
        },
        "tests": dict(counts, command="pytest", seconds=1.0),
        "bench": {"results": [row, noisy]},
        "seconds": {"total": 2.0},
    }
    text = gpu_check.summary_markdown(summary)
    assert "H200 · driver 580" in text and "FAIL a::bad: boom" in text
    assert "| hrca fwd ÷topk+gather+SDPA | size=cityscapes | 0.25 (0.24–0.26) | 0.33 | PASS |" in text
    assert "| hrca fwd ÷topk+gather+SDPA | size=ade | 0.30 (0.20–0.40) | 0.33 | noisy |" in text


def test_a_run_cut_off_by_its_budget_still_names_each_failure_and_why(tmp_path):
    """Without a JUnit report (the budget ended pytest first) the counts and failures come from the
    `pytest -v` log: each test once, a crashed worker's test by the error conftest printed for it."""
    from lors_kernels import gpu_check

    log = tmp_path / "tests.log"
    log.write_text(
        "[gw0] [  1%] PASSED python_tests/a.py::test_x[a-b] \n"
        "FAILED-NOW python_tests/a.py::test_y (call): assert 1 == 2 | where 1 = f()\n"
        "[gw1] [  2%] FAILED python_tests/a.py::test_y \n"
        "[gw1] [  3%] SKIPPED python_tests/a.py::test_z \n"
        "python_tests/a.py::test_q[bf16] left the CUDA context broken: CUDA error: an illegal memory access\n"
        "[gw2] [  3%] FAILED python_tests/a.py::test_q[bf16] \n"
        "[gw2] node down: Not properly terminated\n"
        "[gw2] [  3%] FAILED python_tests/a.py::test_q[bf16] \n"
        "[gw3] [  4%] FAILED python_tests/a.py::test_w \n"
        "python_tests/a.py::test_v \n"  # started, never finished
    )
    counts = gpu_check.log_counts(str(log))
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["cut_off"]) == (1, 3, 1, True)
    assert counts["failures"] == [
        "python_tests/a.py::test_y: assert 1 == 2 | where 1 = f()",
        "python_tests/a.py::test_q[bf16]: left the CUDA context broken: CUDA error: an illegal memory access",
        "python_tests/a.py::test_w: failed (see tests.log)",
    ]
    stderr = "Traceback (most recent call last):\n  File x\ntorch.AcceleratorError: CUDA error: boom\n[W] Warning: y\n"
    assert gpu_check.crash_line(stderr) == "torch.AcceleratorError: CUDA error: boom"

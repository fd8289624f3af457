"""`python -m lors_kernels gpu-check --out DIR`: everything a GPU can validate, in one prepared command.

1. the machine: GPU, driver, CUDA, torch, triton, what was built;
2. the CUDA test suite (bf16 included; CUDA-graph capture of every op, deterministic mode bitwise twice,
   a non-default current device where two GPUs exist: python_tests/test_gpu.py), run from the source
   tree with pytest, in parallel where pytest-xdist is installed, without the ahead-of-time compile tests
   (they check CPU-side compilation, which CI does);
3. the benchmarks in --quick mode, in bf16, each family in a process of its own;
4. DIR/gpu-check.json and DIR/gpu-check.md: the machine, the test counts and failures, every benchmark
   target PASS/FAIL, and each stage's time.

A failure on the device must not hide the rest: tests.log names every test's result as it comes (a run
cut off by its budget still says what ran), a test that leaves the CUDA context broken (an illegal
address, a device-side assert) ends its pytest worker, which names it and is replaced by a fresh one
(python_tests/conftest.py), and a family whose benchmark crashes is reported with its error while the
other families run.

Nothing is built: it uses the torch and triton it finds, and the native extension if it was built
(``python setup.py build_ext --inplace`` first, for the CUDA kernels). The stages share a time budget
(--budget, 450 s by default: under 8 minutes on one H100/H200), two thirds of it for the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

from .report import assess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def say(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict:
    import torch

    from . import backend

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "env": backend.env_report(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        info["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def run_tests(out_dir: str, budget_s: float) -> dict:
    """The CUDA suite under pytest; counts and failures from its JUnit XML, or from its log where the
    budget cut the run off before pytest wrote the XML."""
    xml_path, log_path = os.path.join(out_dir, "tests.xml"), os.path.join(out_dir, "tests.log")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "python_tests",
        "-v",
        "-rfE",
        "--durations=30",
        "-k",
        "not aot and not distributed",
        f"--junitxml={xml_path}",
        "-p",
        "no:cacheprovider",
    ]
    try:
        import xdist  # noqa: F401

        cmd += ["-n", str(min(16, os.cpu_count() or 1))]  # Triton's compiles are the CPU-bound part
    except ImportError:
        pass
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONUNBUFFERED="1")
    say("tests: " + " ".join(cmd[2:]))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=budget_s
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = {"exit": code, "seconds": round(time.perf_counter() - start, 1), "command": " ".join(cmd[2:])}
    result.update(junit_counts(xml_path) if code != "timeout" else log_counts(log_path))
    say(
        f"tests: {result.get('passed', 0)} passed, {result.get('failed', 0)} failed, "
        f"{result.get('skipped', 0)} skipped in {result['seconds']} s (exit {code})"
    )
    return result


# pytest -v's result lines: "[gw3] [ 12%] PASSED python_tests/x.py::test[a]" (with xdist) or
# "python_tests/x.py::test[a] PASSED [ 12%]". A test whose worker died is reported FAILED after
# "node down" (sometimes twice: its own report, then the crash's).
_RESULT = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
# python_tests/conftest.py's lines, as they happen: "FAILED-NOW node (call): message" for each failure,
# "node left the CUDA context broken: error" for a test that ended its worker.
_MESSAGE = re.compile(r"^FAILED-NOW (\S+) \(\w+\): (.*)$|^(\S+::\S+) (left the CUDA context broken: .*)$")


def log_counts(path: str) -> dict:
    """Counts and failures read off a `pytest -v` log: what ran before the run was cut off."""
    outcomes, messages = {}, {}
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                line = line.rstrip("\n")
                message = _MESSAGE.match(line)
                if message:
                    node, text = (message.group(1), message.group(2)) if message.group(1) else message.group(3, 4)
                    messages.setdefault(node, text)
                    continue
                found = _RESULT.search(line)
                node = next((word for word in line.split() if "::" in word), None)
                if found and node and outcomes.get(node) not in ("FAILED", "ERROR"):
                    outcomes[node] = found.group(1)
    kinds = {"PASSED": "passed", "XFAIL": "passed", "SKIPPED": "skipped"}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "cut_off": True}
    for node, outcome in outcomes.items():
        counts[kinds.get(outcome, "failed")] += 1
        if kinds.get(outcome) is None:
            counts["failures"].append(f"{node}: {messages.get(node, outcome.lower() + ' (see tests.log)')}")
    return counts


def junit_counts(path: str) -> dict:
    if not os.path.exists(path):
        return {"failures": ["no JUnit report: the run ended before writing it (see tests.log)"]}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        if problem is not None:
            counts["failed"] += 1
            counts["failures"].append(f"{name}: {(problem.get('message') or '')[:300]}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def run_bench(out_dir: str, deadline: float) -> dict:
    """`bench --quick --dtype bf16`, each family in its own process while time is left: a family that
    breaks the CUDA context is reported (its error's last lines) and the others still run."""
    from . import bench

    results, crashes, skipped, header = [], {}, [], None
    for name in bench.families():
        left = deadline - time.perf_counter()
        if left < 10:
            say(f"bench: {name} skipped, out of time")
            skipped.append(name)
            continue
        say(f"bench: {name}")
        path = os.path.join(out_dir, f"bench-{name}.json")
        cmd = [sys.executable, "-m", "lors_kernels", "bench", "--op", name, "--device", "cuda", "--dtype", "bf16"]
        cmd += ["--quick", "--json", path, "--plot", os.path.join(out_dir, "bench.png")]  # bench-<family>.png
        try:
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=left)
            error = None if done.returncode == 0 else crash_line(done.stderr or done.stdout)
        except subprocess.TimeoutExpired:
            error = f"cut off after {left:.0f} s"
        if error:
            crashes[name] = error
            say(f"bench: {name} failed: {error}")
            continue
        with open(path) as f:
            family = json.load(f)
        os.remove(path)
        results += family.pop("results")
        header = header or family
    report = {**(header or {}), "results": results, "crashes": crashes, "skipped": skipped}
    report["command"] = "python -m lors_kernels bench --quick --dtype bf16 --op <family> (from gpu-check)"
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def crash_line(output: str) -> str:
    """The line of a crashed run that names its error (a traceback's last "...Error: ..."), else its end."""
    lines = output.strip().splitlines()
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
    return (named or lines[-1:] or ["no output"])[-1][:400]


def summary_markdown(summary: dict) -> str:
    m, tests = summary["machine"], summary["tests"]
    lines = [
        "# gpu-check",
        "",
        f"GPU: {', '.join(m['gpus'])} · driver {m['driver']} · CUDA {m['cuda']} · torch {m['torch']} · "
        f"triton {m['triton']} · python {m['python']}",
        "",
        f"Tests (`{tests['command']}`): {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
        f"{tests.get('skipped', 0)} skipped in {tests['seconds']} s"
        + (" (cut off by the time budget: the counts are what ran)." if tests.get("cut_off") else "."),
    ]
    lines += [f"- FAIL {f}" for f in tests.get("failures", [])]
    lines += [f"- BENCH FAILED {name}: {error}" for name, error in summary["bench"].get("crashes", {}).items()]
    lines += [f"- bench skipped (out of time): {name}" for name in summary["bench"].get("skipped", [])]
    lines += ["", "| target | shape | ratio | limit | verdict |", "|---|---|---|---|---|"]
    for row in summary["bench"].get("results", []):
        assessed = assess(row)
        for peer, verdict in assessed["verdicts"].items():
            low, high = assessed["intervals"][peer]
            lines.append(
                f"| {row['family']} {row['mode']} ÷{peer} | {row['label']} | "
                f"{assessed['ratios'][peer]:.2f} ({low:.2f}–{high:.2f}) | {row['targets'][peer]:.2f} | {verdict} |"
            )
    lines += ["", f"Stages (s): {summary['seconds']}"]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: torch sees no CUDA device")
    if not os.path.isdir(os.path.join(ROOT, "python_tests")):
        raise SystemExit(f"gpu-check: runs from a source checkout (no python_tests/ beside {ROOT})")
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    say("machine")
    summary = {"machine": machine(), "seconds": {}}
    say(", ".join(summary["machine"]["gpus"]) + f"; torch {torch.__version__}")
    summary["tests"] = run_tests(args.out, args.budget * 2 / 3)
    summary["seconds"]["tests"] = summary["tests"]["seconds"]
    bench_start = time.perf_counter()
    report = run_bench(args.out, start + args.budget)
    summary["bench"] = {key: report[key] for key in ("results", "crashes", "skipped")}
    summary["seconds"]["bench"] = round(time.perf_counter() - bench_start, 1)
    summary["seconds"]["total"] = round(time.perf_counter() - start, 1)
    verdicts = [v for row in report["results"] for v in assess(row)["verdicts"].values()]
    summary["targets"] = {"met": verdicts.count("PASS"), "of": len(verdicts), "noisy": verdicts.count("noisy")}
    with open(os.path.join(args.out, "gpu-check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "gpu-check.md"), "w") as f:
        f.write(summary_markdown(summary))
    say(
        f"targets met: {verdicts.count('PASS')} of {len(verdicts)} ({verdicts.count('noisy')} noisy); "
        f"wrote {args.out}/gpu-check.md and gpu-check.json in {summary['seconds']['total']} s"
    )
    passed = summary["tests"].get("failed", 1) == 0 and summary["tests"]["exit"] == 0
    return 0 if passed and not report["crashes"] else 1

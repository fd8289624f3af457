"""Every code block of README.md runs as written.

Python blocks run, each in a fresh namespace (a block marked ``<!-- readme-test: slow -->`` on the line
before its fence only with --run-slow). Bash blocks are checked, not run: ``python -m lors_kernels`` lines
against the CLI's own parser, ``python bench/<script>.py`` lines against the script's, pytest lines
against pytest's (options known, paths existing); pip and build lines are left to CI, which runs them.
"""

import collections
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lors_kernels.__main__ import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LANGUAGES = {"python", "bash", "text", ""}  # any other fence language is an error: nothing escapes unchecked
MARKS = {"slow"}

Block = collections.namedtuple("Block", "id language line source marks")


def readme_blocks():
    """Every fenced block, ids "<section>-<n>" (n counts the section's blocks)."""
    lines = README.read_text().splitlines()
    blocks, section, seen = [], "top", collections.Counter()
    i = 0
    while i < len(lines):
        heading = re.match(r"#{1,6} (.*)", lines[i])
        if heading:
            section = re.sub(r"[^a-z0-9]+", "-", heading.group(1).lower()).strip("-")
        fence = re.match(r"```(\S*)\s*$", lines[i])
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            mark = re.match(r"<!--\s*readme-test:\s*(.*?)\s*-->", lines[i - 1])
            language = fence.group(1)
            seen[section] += 1
            blocks.append(
                Block(
                    f"{section}-{seen[section]}",
                    language,
                    i + 2,
                    "\n".join(lines[i + 1 : end]) + "\n",
                    set(mark.group(1).split()) if mark else set(),
                )
            )
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks()


def test_every_fence_is_found():
    """An extractor that missed blocks would let the tests below pass on nothing."""
    fences = [line for line in README.read_text().splitlines() if line.startswith("```")]
    assert len(fences) == 2 * len(BLOCKS)
    counts = collections.Counter(b.language for b in BLOCKS)
    assert counts["python"] >= 6 and counts["bash"] >= 3, counts
    assert len({b.id for b in BLOCKS}) == len(BLOCKS)
    for block in BLOCKS:
        assert block.language in LANGUAGES, f"{block.id}: fence language {block.language!r} is not checked"
        assert block.marks <= MARKS, f"{block.id}: unknown readme-test marks {block.marks - MARKS}"


@pytest.fixture
def fresh_state(use_backend):
    """A block starts with the automatic choice; its backend override and process group end with it."""
    use_backend(None)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b, id=b.id, marks=[getattr(pytest.mark, m) for m in sorted(b.marks)])
        for b in BLOCKS
        if b.language == "python"
    ],
)
def test_python_block(block, fresh_state):
    # Padded so that a traceback names the README's own line numbers.
    code = compile("\n" * (block.line - 1) + block.source, str(README), "exec")
    exec(code, {"__name__": "__readme__"})


def commands(source: str):
    """The simple commands of a bash block: [argv without leading VAR=value assignments]."""
    found = []
    for line in source.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|"):
                while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                    argv.pop(0)
                if argv:
                    found.append(argv)
                argv = []
            else:
                argv.append(token)
    return found


# Parses pytest command lines as pytest does (plugins and conftests loaded) and stops before running
# anything: prints each one's exit code (4: bad usage) and the paths it would collect.
PARSE_PYTEST = """
import json, sys
import pytest

class Parsed:
    paths = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_cmdline_main(self, config):
        self.paths = [str(a).split("::")[0] for a in config.args]
        return 0

for args in json.loads(sys.argv[1]):
    parsed = Parsed()
    code = pytest.main(args, plugins=[parsed])
    print("parsed:", json.dumps([int(code), parsed.paths]))
"""


def _load_script(path):
    """A script of bench/ as a module (its main() not run): its build_parser() checks README lines."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS if b.language == "bash"])
def test_bash_block(block):
    pytest_lines = []
    for argv in commands(block.source):
        if argv[:3] == ["python", "-m", "lors_kernels"]:
            try:
                build_parser().parse_args(argv[3:])
            except SystemExit as exit:
                pytest.fail(f"{block.id}: {shlex.join(argv)} is refused by the CLI's parser (exit {exit.code})")
        elif argv[:3] == ["python", "-m", "pytest"] or argv[0] == "pytest":
            pytest_lines.append(argv[3:] if argv[0] == "python" else argv[1:])
        elif argv[0] == "python" and argv[1].startswith("bench/") and argv[1].endswith(".py"):
            script = _load_script(ROOT / argv[1])
            try:
                script.build_parser().parse_args(argv[2:])
            except SystemExit as exit:
                pytest.fail(f"{block.id}: {shlex.join(argv)} is refused by the script's parser (exit {exit.code})")
        elif argv[0] == "pip" or argv[:2] == ["python", "setup.py"]:
            continue  # a build step: CI runs it
        else:
            pytest.fail(f"{block.id}: no check for {shlex.join(argv)}; add one to {Path(__file__).name}")
    if not pytest_lines:
        return
    result = subprocess.run(
        [sys.executable, "-c", PARSE_PYTEST, json.dumps(pytest_lines)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    parsed = [json.loads(line[len("parsed:") :]) for line in result.stdout.splitlines() if line.startswith("parsed:")]
    assert len(parsed) == len(pytest_lines), result.stdout + result.stderr
    for args, (code, paths) in zip(pytest_lines, parsed):
        assert code == 0, f"pytest {shlex.join(args)}: exit {code}\n{result.stdout}{result.stderr}"
        missing = [p for p in paths if not (ROOT / p).exists()]
        assert not missing, f"pytest {shlex.join(args)}: no such path {missing}"

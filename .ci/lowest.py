"""Print pip constraints that hold every dependency of the test and bench extras at its lower bound.

CI installs with these (PIP_CONSTRAINT) to check that the oldest versions the extras allow still pass.
torch is left out: the install command pins it.
"""

import pathlib
import re

import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
pins = {}
for extra in ("test", "bench"):
    for requirement in project["optional-dependencies"][extra]:
        name, specifiers = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement).groups()
        lower = re.search(r"(?:>=|==)\s*([^,\s]+)", specifiers)
        if lower is None:
            raise SystemExit(f"{requirement!r} has no lower bound: every dependency of the extras needs one")
        pins[name.lower()] = lower.group(1)
print("\n".join(f"{name}=={version}" for name, version in sorted(pins.items())))

"""Print the pip requirements that pin every lower bound pyproject.toml declares.

CI installs these into a second virtual environment and runs the Hugging Face, Trainer,
TRL and experiment tests there, so a declared ``>=`` bound is a tested version.  Two kinds
of requirement are not pinned to their bound:

- torch: the only CPU build of torch CI can install is 2.13.0 (any other version pulls a
  multi-GB CUDA build), so it stays at that;
- the test tools (pytest, pytest-benchmark, hypothesis): they are not what the package
  runs on.

Usage: ``python .ci/lower_bounds.py [pyproject.toml]``, one requirement per line.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

CPU_TORCH = "torch==2.13.0"
TEST_TOOLS = {"pytest", "pytest-benchmark", "hypothesis"}
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lower_bounds(pyproject: Path) -> list[str]:
    """One pinned requirement per package named in the dependencies or any extra."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    bounds: dict[str, str] = {}
    for requirement in requirements:
        name, spec = REQUIREMENT.match(requirement).groups()
        name = _normalise(name)
        pinned = re.fullmatch(r"==\s*(\S+)", spec.strip())
        lower = re.fullmatch(r">=\s*(\S+)", spec.strip())
        if name == "torch":
            bounds[name] = CPU_TORCH
        elif name in TEST_TOOLS or not (pinned or lower):
            bounds.setdefault(name, name)
        else:
            version = (pinned or lower).group(1)
            previous = bounds.get(name, name)
            if previous != name and previous != f"{name}=={version}":
                raise SystemExit(f"pyproject.toml gives {name} two lower bounds: {previous} and {requirement}")
            bounds[name] = f"{name}=={version}"
    return sorted(bounds.values())


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "pyproject.toml"
    print("\n".join(lower_bounds(path)))

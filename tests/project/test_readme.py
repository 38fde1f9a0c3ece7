"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_ci_runs_the_readme_test_command():
    readme_commands = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).splitlines()
    ci = (README.parent / ".ci" / "run").read_text()
    assert len(readme_commands) == 2 and readme_commands[1] in ci

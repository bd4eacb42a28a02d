"""The README's commands are the ones CI runs, and its example runs as written."""

import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    # The two commands of "Set up and run"; later sections (e.g. "Use with TRL") have their own.
    setup = README.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", setup, re.S)
    commands = [line for block in blocks for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    test_command = next(c for c in commands if c.endswith("pytest"))
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_trainer_step_example_runs():
    code = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    mask = scope["response_mask"]
    assert scope["values"].shape == mask.shape and (scope["values"][~mask] == 0).all()
    assert torch.isfinite(scope["advantages"]).all()

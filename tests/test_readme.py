"""The README's Python examples run as written (with fewer steps)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_own_optax_loop_runs():
    block = next(b for b in python_blocks() if "optax.adamw" in b)
    code = block.replace("range(300)", "range(3)")
    assert code != block, "the README loop changed: update this test"
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert float(scope["loss"]) > 0

"""A/B children: one measurement run in a given checkout of asyncckpt, checked to have imported it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any


def run_in_tree(command: list[str], tree: str | os.PathLike[str]) -> dict[str, Any]:
    """Run ``command`` in checkout ``tree`` and return the JSON object its last line printed,
    without its ``"module"`` entry (the child's ``asyncckpt.__file__``), which must lie in
    ``tree``: else this raises :class:`SystemExit`.

    The child runs in the tree (``python -c`` puts the working directory first on the path,
    before ``PYTHONPATH``: a child started elsewhere would import that directory's asyncckpt)
    with the tree on ``PYTHONPATH``.
    """
    root = Path(tree).resolve()
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    module = Path(str(result.pop("module"))).resolve()
    if not module.is_relative_to(root):
        raise SystemExit(f"the child for {root} imported asyncckpt from {module}")
    return result


def write_report(text: str, out: str | None, results: Any) -> None:
    """Print ``text``; with ``out``, write it there and ``results`` as JSON beside it (``.json``)."""
    print(text)
    if out:
        Path(out).write_text(text)
        Path(out).with_suffix(".json").write_text(json.dumps(results, indent=1))

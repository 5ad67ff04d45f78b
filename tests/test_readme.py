"""The README's Python snippet runs as written."""

import os
import re

from conftest import REPO


def test_readme_python_snippet_runs(capsys):
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks, "README has no python snippet"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # pylint: disable=exec-used
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 and 0.0 <= float(printed[1]) <= 1.0

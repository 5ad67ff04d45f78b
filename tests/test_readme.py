"""The README's Python snippets run as written."""

import os
import re

from conftest import REPO


def test_readme_python_snippets_run(capsys):
    """The snippets in order, in one namespace, as a reader runs them."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 2, "README has no python snippets (API and fit())"
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
    assert namespace["model"].optimizer.iterations.numpy() == 2  # fit() trained
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 and 0.0 <= float(printed[1]) <= 1.0

"""The examples in the docstrings run as written (every library module)."""

import doctest
import importlib
import pathlib

import numpy as np
import pytest
import tensorflow as tf

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The command lines define their flags only when run; the rest is importable.
_CLI_FOLDERS = {"mlcrl_tf", "pipelines"}


def _library_modules():
    names = []
    for package in ("mlcrl_tf", "pipelines"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.stem == "__init__" or path.parent.name in _CLI_FOLDERS:
                continue
            names.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return names


@pytest.mark.parametrize("name", _library_modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    globs = {**vars(module), "np": np, "tf": tf}
    result = doctest.testmod(module, globs=globs, optionflags=doctest.ELLIPSIS,
                             report=True)
    assert result.failed == 0, f"{name}: {result.failed} docstring example(s) failed"

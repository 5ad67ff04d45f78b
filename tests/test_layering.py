"""The layers of the code base, read from the imports (ast), and short functions.

    pipelines/   the data layer: TFRecords, converters, tf.data, the demo set.
                 Imports neither mlcrl_tf nor Keras (it ships RGB pixels; the
                 model normalises them).
    mlcrl_tf/    model, losses, metrics, optimizer, training, evaluation,
                 export; may import pipelines.
    CLIs         `python -m` entry points: flags and `main` only. Nothing in
                 the package imports a CLI.

A failure here names the file and the import (or function) that breaks a rule.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("mlcrl_tf", "pipelines")
CLIS = {"mlcrl_tf.train", "mlcrl_tf.evaluate", "mlcrl_tf.export", "mlcrl_tf.predict",
        "mlcrl_tf.visualize", "pipelines.coco_to_tfrecord", "pipelines.voc_to_tfrecord",
        "pipelines.csv_to_tfrecord", "pipelines.demo_dataset"}
# The model, its losses, metrics and optimizer know nothing of data files or flags.
CORE = {"mlcrl_tf.model", "mlcrl_tf.losses", "mlcrl_tf.metrics", "mlcrl_tf.backbones",
        "mlcrl_tf.keras_hub_backbones", "mlcrl_tf.optim"}
CLI_FUNCTIONS = {"define_flags", "main"}
MAX_FUNCTION_LINES = 60


def _modules():
    """{dotted name: parsed tree} of every module of the two packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = f"{package}.{path.stem}" if path.stem != "__init__" else package
            modules[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return modules


MODULES = _modules()


def _imports(tree):
    """Every module name imported anywhere in `tree` (with `from X import y`
    also giving X.y, which may be a module)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _hits(module, rule):
    return [name for name in _imports(MODULES[module]) if rule(name)]


def test_every_cli_exists():
    assert CLIS <= set(MODULES)


@pytest.mark.parametrize("module", sorted(set(MODULES) - CLIS))
def test_no_library_imports_a_cli(module):
    assert not _hits(module, lambda name: name in CLIS), (
        f"{module} imports a command-line module; move the code it needs into a library")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("pipelines")))
def test_the_data_layer_imports_neither_mlcrl_tf_nor_keras(module):
    bad = _hits(module, lambda name: name.split(".")[0] in ("mlcrl_tf", "keras"))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(CORE))
def test_model_losses_metrics_import_no_data_layer_nor_flags(module):
    bad = _hits(module, lambda name: name.split(".")[0] == "pipelines"
                or name in ("absl.flags", "absl.app"))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_inside_a_function(module):
    found = []
    for node in ast.walk(MODULES[module]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [f"{node.name}: {ast.unparse(sub)}" for sub in ast.walk(node)
                      if isinstance(sub, (ast.Import, ast.ImportFrom))]
    assert not found, f"{module}: {found}"


@pytest.mark.parametrize("module", sorted(CLIS))
def test_a_cli_holds_flags_and_main_only(module):
    functions = {node.name for node in MODULES[module].body
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert functions <= CLI_FUNCTIONS, (
        f"{module} defines {sorted(functions - CLI_FUNCTIONS)}: library code in a CLI")


def _body_lines(node):
    """Lines of a function without its docstring."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _source_files():
    files = []
    for folder in PACKAGES + ("benchmarks",):
        files += sorted((ROOT / folder).glob("*.py"))
    return files


@pytest.mark.parametrize("path", _source_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_functions_are_short(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{node.name} ({_body_lines(node)} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and _body_lines(node) > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: split {long} (at most {MAX_FUNCTION_LINES} lines)"

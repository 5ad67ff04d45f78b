"""The folders are the layers (docs/design.md, Package layout), read from the
imports (ast), and the size rules: modules, classes and functions stay short.

A module may import its own folder and the folders below it in `LAYERS`,
never one above. The command lines (`python -m` entry points: flags and
`main` only) are the files directly in `mlcrl_tf/` and `pipelines/`; nothing
imports them. A failure names the file and the import (or definition) that
breaks a rule.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("mlcrl_tf", "pipelines")
# Lowest first. The data layer (pipelines/) knows neither mlcrl_tf nor Keras.
LAYERS = (
    "pipelines.utils",        # files, output checks, console, progress: shared by both
    "pipelines.records",      # the TFRecord schema, image checks, the shard writer, shard sets
    "pipelines.tfdata",       # the tf.data input: record stream, decoder, preprocessing
    "pipelines.converters",   # COCO, VOC, CSV -> TFRecords
    "pipelines.demo",         # the "outfits" demo set
    "mlcrl_tf.modeling",      # the paper: model, losses, objective, optimizer
    "mlcrl_tf.run_dir",       # a run's Config, run.json, checkpoints, lock
    "mlcrl_tf.serving",       # the SavedModel contract, export, predict
    "mlcrl_tf.evaluation",    # metrics, evaluating checkpoints and exports, CAMs
    "mlcrl_tf.training",      # flags, data, strategies, the loop, summaries
)
CLI_FUNCTIONS = {"define_flags", "main"}
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 250
MAX_FUNCTION_LINES = 60


def _name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    """{dotted name: (path, parsed tree)} of every module of the two packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return modules


MODULES = _modules()
CLIS = {name for name, (path, _) in MODULES.items()
        if path.parent.name in PACKAGES and path.stem != "__init__"}


def _layer(module):
    """The index in LAYERS of a module's folder (None: a package root or a CLI)."""
    for i, layer in enumerate(LAYERS):
        if module == layer or module.startswith(layer + "."):
            return i
    return None


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
    return [name for name in _imports(MODULES[module][1]) if rule(name)]


def test_every_library_module_lives_in_a_layer_folder():
    stray = [name for name in MODULES
             if name not in CLIS and name not in PACKAGES and _layer(name) is None]
    assert not stray, f"put {stray} in one of the folders {LAYERS}"
    folders = {name.rsplit(".", 1)[0] for name in MODULES
               if _layer(name) is not None and name not in LAYERS}
    assert folders <= set(LAYERS), (
        f"{sorted(folders - set(LAYERS))}: a folder inside a layer folder; give it its "
        "own entry in LAYERS")


def test_the_command_lines_are_the_documented_ones():
    assert CLIS == {"mlcrl_tf.train", "mlcrl_tf.evaluate", "mlcrl_tf.export",
                    "mlcrl_tf.predict", "mlcrl_tf.visualize", "pipelines.coco_to_tfrecord",
                    "pipelines.voc_to_tfrecord", "pipelines.csv_to_tfrecord",
                    "pipelines.demo_dataset"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) is not None))
def test_a_layer_imports_only_its_folder_and_the_folders_below(module):
    own = _layer(module)
    above = [name for name in _hits(module, lambda n: n.split(".")[0] in PACKAGES)
             if name in MODULES and name not in PACKAGES
             and (name in CLIS or (_layer(name) or 0) > own)]
    assert not above, f"{module} ({LAYERS[own]}) imports {above}, from a layer above it"


@pytest.mark.parametrize("module", sorted(set(MODULES) - CLIS))
def test_no_library_imports_a_cli(module):
    assert not _hits(module, lambda name: name in CLIS), (
        f"{module} imports a command-line module; move the code it needs into a library")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("pipelines")))
def test_the_data_layer_imports_neither_mlcrl_tf_nor_keras(module):
    bad = _hits(module, lambda name: name.split(".")[0] in ("mlcrl_tf", "keras"))
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("mlcrl_tf.modeling")))
def test_the_model_imports_no_data_layer_nor_flags(module):
    bad = _hits(module, lambda name: name.split(".")[0] == "pipelines"
                or name in ("absl.flags", "absl.app"))
    assert not bad, f"{module} imports {bad}"


def test_the_metrics_are_plain_numpy():
    assert not _hits("mlcrl_tf.evaluation.metrics", lambda name: name.split(".")[0] in (
        "tensorflow", "keras", "mlcrl_tf", "pipelines"))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_inside_a_function(module):
    found = []
    for node in ast.walk(MODULES[module][1]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [f"{node.name}: {ast.unparse(sub)}" for sub in ast.walk(node)
                      if isinstance(sub, (ast.Import, ast.ImportFrom))]
    assert not found, f"{module}: {found}"


@pytest.mark.parametrize("module", sorted(CLIS))
def test_a_cli_holds_flags_and_main_only(module):
    functions = {node.name for node in MODULES[module][1].body
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    assert functions <= CLI_FUNCTIONS, (
        f"{module} defines {sorted(functions - CLI_FUNCTIONS)}: library code in a CLI")


def _body_lines(node):
    """Lines of a definition without its docstring."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _source_files():
    files = []
    for folder in PACKAGES + ("benchmarks",):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def _short(path):
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", _source_files(), ids=_short)
def test_modules_classes_and_functions_are_short(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, (
        f"{_short(path)}: {len(text.splitlines())} lines; split it by job "
        f"(at most {MAX_MODULE_LINES})")
    tree = ast.parse(text)
    long = [f"function {node.name} ({_body_lines(node)} lines)" for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and _body_lines(node) > MAX_FUNCTION_LINES]
    long += [f"class {node.name} ({node.end_lineno - node.lineno + 1} lines)"
             for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
             and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES]
    assert not long, (f"{_short(path)}: split {long} (functions at most "
                      f"{MAX_FUNCTION_LINES} lines, classes {MAX_CLASS_LINES})")

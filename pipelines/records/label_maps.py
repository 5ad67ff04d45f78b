"""Label maps: the class-name rule, `labels.txt`, and checks that two agree.

Line i of `labels.txt` is the name of class id i; a class name holds no
character `str.splitlines` breaks on. `read_class_names` reads a labels.txt,
`class_names_for_shards` the one of selected shards, `check_same_classes`
compares two label maps (docs/data.md, Schema and split files).
"""

import os

import tensorflow as tf

from pipelines.records import generations
from pipelines.records import schema


def class_name_problem(name):
    """Returns why `name` cannot be a class name, or None if it can.

    A class name is a non-empty str without surrounding white space and
    without any character `str.splitlines` breaks on (\\n \\r \\x0b \\x0c
    \\x1c \\x1d \\x1e \\x85 \\u2028 \\u2029): labels.txt holds one per line.
    """
    if not isinstance(name, str):
        return f"is not a string ({type(name).__name__})"
    if not name.strip():
        return "is empty"
    if name != name.strip():
        return "has leading or trailing white space"
    if len(f"x{name}x".splitlines()) != 1:
        return ("contains a line break (one of \\n \\r \\x0b \\x0c \\x1c-\\x1e "
                "\\x85 \\u2028 \\u2029), which would split labels.txt")
    return None


def check_class_names(class_names, what="class_names"):
    """Returns `class_names` as a list of str.

    Raises:
        ValueError: naming `what`, if it is empty, repeats a name or has a
            name that `class_name_problem` refuses.
    """
    names = list(class_names)
    if not names:
        raise ValueError(f"{what} is empty")
    seen = set()
    for i, name in enumerate(names):
        problem = class_name_problem(name)
        if problem:
            raise ValueError(f"{what}: class name {name!r} (id {i}) {problem}")
        if name in seen:
            raise ValueError(f"{what}: class name {name!r} appears twice")
        seen.add(name)
    return names


def labels_file_text(class_names):
    """The text of a labels.txt: line i is the name of class id i."""
    return "".join(f"{name}\n" for name in check_class_names(class_names))


def read_class_names(path):
    """Reads a labels file (line i = name of class id i).

    Only "\\n" separates lines (a "\\r\\n" file is fine: names are stripped);
    any other line-break character inside a name is an error.

    Args:
        path: a labels.txt-style file, or a directory holding `labels.txt`.

    Returns:
        The list of class names.

    Raises:
        ValueError: the file is missing, empty, not UTF-8, has blank lines
            between names, a bad or repeated name, or a conversion into its
            directory was interrupted while switching files.
    """
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, schema.LABELS_FILENAME)
    if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
        raise ValueError(f"labels file {path} does not exist")
    generations.check_no_switch(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"labels file {path} is not UTF-8: {e}") from None
    names = [line.strip() for line in text.rstrip("\r\n").split("\n")]
    if names == [""]:
        raise ValueError(f"labels file {path} is empty")
    if "" in names:
        raise ValueError(f"labels file {path}: line {names.index('') + 1} is "
                         "blank (line i must be the name of class id i)")
    return check_class_names(names, f"labels file {path}")


def _first_difference(a, b):
    """Where two lists of class names differ, for a message."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"class id {i} is {x!r} in one and {y!r} in the other"
    return f"{len(a)} vs {len(b)} classes"


def class_names_for_shards(files):
    """The class names of shard files, from the labels.txt beside them.

    Every directory holding one of `files` must agree: all have a labels.txt
    with the same names, or none has one.

    Args:
        files: shard paths (e.g. from `find_shards`).

    Returns:
        The list of class names, or None if no directory has a labels.txt.

    Raises:
        ValueError: two labels.txt differ (both named), only some
            directories have one, or a labels.txt is unreadable.
    """
    found = {}
    missing = []
    for directory in dict.fromkeys(os.path.dirname(path) for path in files):
        path = os.path.join(directory, schema.LABELS_FILENAME)
        if tf.io.gfile.exists(path):
            found[path] = read_class_names(path)
        else:
            missing.append(directory or ".")
    if not found:
        return None
    first_path, first = next(iter(found.items()))
    if missing:
        raise ValueError(
            f"the shards in {missing[0]} have no {schema.LABELS_FILENAME} but those "
            f"beside {first_path} do: their class ids cannot be checked to "
            "agree; select shards of one label map")
    for path, names in found.items():
        if names != first:
            raise ValueError(
                f"{first_path} and {path} differ "
                f"({_first_difference(first, names)}): the selected shards "
                "use different class ids; select shards of one label map")
    return first


def check_same_classes(names, expected, what, expected_from,
                       consequence="every class id would be scored as another class",
                       advice="Convert the data with the same class list "
                              "(--classes=<labels.txt>)."):
    """Raises ValueError unless two label maps agree (None = unknown: passes).

    Args:
        names: the class names of the data being read (or None).
        expected: the class names of the run or export (or None).
        what: how to name the data in the message.
        expected_from: where `expected` came from, for the message.
        consequence: what a mismatch would do, for the message.
        advice: what to do, for the message.
    """
    if names is None or expected is None or list(names) == list(expected):
        return
    where = next((i for i, (a, b) in enumerate(zip(names, expected)) if a != b),
                 min(len(names), len(expected)))
    detail = (f"class id {where} is {names[where]!r} there but {expected[where]!r} in "
              f"{expected_from}" if where < min(len(names), len(expected))
              else f"{len(names)} classes there, {len(expected)} in {expected_from}")
    raise ValueError(f"{what}: the label map differs from the run's ({detail}); "
                     f"{consequence}. {advice}")

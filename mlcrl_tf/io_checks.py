"""Output locations checked before the work.

Shared by the command lines that write files (`predict --output`,
`export --export_dir`, `evaluate --output_json/--output_scores`,
`visualize --output_dir`): a missing, unwritable or full location is one
`ValueError` naming the flag and the path (the command line prints it as one
`error:` line), raised before anything long runs (before a checkpoint is
restored or an image read). A damaged checkpoint is one ValueError naming it
from `checkpoints.restore_model` itself.
"""

import os
import uuid

import tensorflow as tf

# What the file systems raise: Python's and TensorFlow's (tf.io.gfile).
IO_ERRORS = (OSError, tf.errors.OpError)


def error_text(error):
    """The first line of an OSError's or a TensorFlow error's message."""
    if isinstance(error, tf.errors.OpError):
        text = error.message
    elif isinstance(error, OSError) and error.strerror:
        text = error.strerror
    else:
        text = str(error)
    text = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return text.split("}} ")[-1]


def _probe(directory):
    """Writes and removes a hidden file in `directory`; raises what it raises."""
    probe = os.path.join(directory, f".write-test-{uuid.uuid4().hex[:8]}")
    with tf.io.gfile.GFile(probe, "w") as f:
        f.write("x")
    tf.io.gfile.remove(probe)


def _writable_dir_problem(directory):
    """None if `directory` exists (created if needed) and takes a file."""
    if tf.io.gfile.exists(directory) and not tf.io.gfile.isdir(directory):
        return f"{directory} is not a directory"
    try:
        tf.io.gfile.makedirs(directory)
    except IO_ERRORS as e:
        return f"cannot create the directory: {error_text(e)}"
    try:
        _probe(directory)
    except IO_ERRORS as e:
        return f"cannot write into {directory}: {error_text(e)}"
    return None


def ensure_output_dir(path, flag):
    """Creates `path` (and its parents) if needed and checks it is writable.

    Raises:
        ValueError: "--flag='path': cannot create the directory: ..." (or
            "is not a directory", "cannot write into ...").
    """
    problem = _writable_dir_problem(path)
    if problem:
        raise ValueError(f"--{flag}={path!r}: {problem}")


def ensure_output_file(path, flag):
    """Checks that the file `path` can be written: its directory is created
    (if missing) and writable, and `path` is not a directory.

    Raises:
        ValueError: naming the flag, the path and why.
    """
    if tf.io.gfile.isdir(path):
        raise ValueError(f"--{flag}={path!r} is a directory; give a file name.")
    problem = _writable_dir_problem(os.path.dirname(path) or ".")
    if problem:
        raise ValueError(f"--{flag}={path!r}: {problem}")

"""Output locations, checked before the work starts.

`ensure_output_dir` and `ensure_output_file` raise one `ValueError` naming the
flag and the path for a missing, unwritable or full location, before anything
long runs (docs/data.md, Files and output locations).
"""

import contextlib
import os
import uuid

import tensorflow as tf

from pipelines.utils import files


def _probe(directory):
    """Writes and removes a hidden file in `directory`; raises what writing
    raises (the file is removed whatever happens)."""
    probe = os.path.join(directory, f".write-test-{uuid.uuid4().hex[:8]}")
    try:
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("x")
    finally:
        with contextlib.suppress(*files.IO_ERRORS):
            if tf.io.gfile.exists(probe):
                tf.io.gfile.remove(probe)


def _writable_dir_problem(directory):
    """None if `directory` exists (created if needed) and takes a file."""
    if tf.io.gfile.exists(directory) and not tf.io.gfile.isdir(directory):
        return f"{directory} is not a directory"
    try:
        tf.io.gfile.makedirs(directory)
    except files.IO_ERRORS as e:
        return f"cannot create the directory: {files.error_text(e)}"
    try:
        _probe(directory)
    except files.IO_ERRORS as e:
        return f"cannot write into {directory}: {files.error_text(e)}"
    return None


def ensure_output_dir(path, flag):
    """Creates `path` (and its parents) if needed and checks it is writable.

    Args:
        path: the directory.
        flag: the flag that gave it, for the message.

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

    Args:
        path: the file.
        flag: the flag that gave it, for the message.

    Raises:
        ValueError: naming the flag, the path and why.
    """
    if tf.io.gfile.isdir(path):
        raise ValueError(f"--{flag}={path!r} is a directory; give a file name.")
    problem = _writable_dir_problem(os.path.dirname(path) or ".")
    if problem:
        raise ValueError(f"--{flag}={path!r}: {problem}")

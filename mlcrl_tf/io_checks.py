"""Output locations checked before the work, and restores that name the file.

Shared by the command lines that write files (`predict --output`,
`export --export_dir`, `evaluate --output_json/--output_scores`,
`visualize --output_dir`) and those that restore a checkpoint (export,
evaluate, visualize): a missing, unwritable or full location and a corrupt
checkpoint are one `ValueError` naming the flag and the path (the command
line prints it as one `error:` line), raised before anything long runs.
"""

import os
import uuid

import tensorflow as tf

from mlcrl_tf import checkpoints

# What the file systems raise: Python's and TensorFlow's (tf.io.gfile).
IO_ERRORS = (OSError, tf.errors.OpError)
# What reading a damaged checkpoint raises: a truncated data file gives
# IndexError("Read less bytes than requested"), a damaged one OpError
# (DataLossError, "checksum does not match", "not an sstable").
RESTORE_ERRORS = IO_ERRORS + (IndexError,)


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


def restore_model(model_dir, checkpoint=None, best=False, use_ema=True):
    """`checkpoints.restore_model`, with an unreadable checkpoint one error.

    Returns:
        What `checkpoints.restore_model` returns.

    Raises:
        ValueError: no run or no checkpoint (from `checkpoints`), or a
            checkpoint that cannot be read (corrupt, truncated, missing data
            file, unreadable): the message names the checkpoint.
    """
    try:
        return checkpoints.restore_model(model_dir, checkpoint=checkpoint, best=best,
                                         use_ema=use_ema)
    except RESTORE_ERRORS as e:
        raise _restore_error(e, model_dir, checkpoint, best) from None


def _restore_error(error, model_dir, checkpoint, best):
    try:
        path = checkpoints.resolve_checkpoint(model_dir, checkpoint, best)
    except (ValueError,) + IO_ERRORS:
        path = checkpoint or model_dir
    return ValueError(f"cannot restore the checkpoint {path!r} (corrupt, truncated or "
                      f"unreadable?): {error_text(error)}")


def check_checkpoint(model_dir, checkpoint=None, best=False):
    """Reads every tensor of the checkpoint a restore would load.

    For callers that restore through code that does not convert errors
    (e.g. `evaluate_lib.evaluate_target`): one read more, one clear error.

    Raises:
        ValueError: no run or checkpoint, or one that cannot be read, named.
    """
    checkpoints.read_run(model_dir)  # Not a training run: say that first.
    path = checkpoints.resolve_checkpoint(model_dir, checkpoint, best)
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except RESTORE_ERRORS as e:
        raise _restore_error(e, model_dir, checkpoint, best) from None

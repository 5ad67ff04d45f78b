"""Files written whole or not at all, strict JSON, and what kind a path is.

Every file a command writes goes through `atomic_output` (docs/reliability.md,
"Files"): a local path through the OS with fsync, any other path
(`gs://`, `s3://`, `ram://`, ...) through `tf.io.gfile`, never as a local
folder named like the URL.
"""

import contextlib
import json
import math
import numbers
import os
import stat
import uuid

import tensorflow as tf

# What the file systems raise: Python's and TensorFlow's (tf.io.gfile).
IO_ERRORS = (OSError, tf.errors.OpError)
FILE_SCHEME = "file://"
_TEMP_MARK = ".tmp-"
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


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


def is_url(path):
    """Whether `path` names a file system by its scheme (`gs://`, `ram://`, ...)."""
    return "://" in os.fspath(path)


def local_path(path):
    """The OS path of a local `path` (`file://` stripped), or None for a URL
    of another file system."""
    path = os.fspath(path)
    if path.startswith(FILE_SCHEME):
        return path[len(FILE_SCHEME):]
    return None if is_url(path) else path


def temporary_path(path):
    """A hidden sibling of `path` no other writer uses: `.<name>.tmp-<pid>-<hex>`."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{name}{_TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary_of(name, path_name):
    """Whether file `name` is a temporary of a file named `path_name`
    (also one of an earlier release: `.<name>.tmp-<pid>`)."""
    prefix = f".{path_name}{_TEMP_MARK}"
    if not name.startswith(prefix):
        return False
    rest = name[len(prefix):].split("-")
    return rest[0].isdigit() and len(rest) <= 2


def fsync_path(path):
    """fsyncs a local file or directory (a no-op where the OS refuses)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # Some file systems refuse fsync on a directory.
        pass
    finally:
        os.close(fd)


def _remove_quietly(path):
    with contextlib.suppress(*IO_ERRORS):
        local = local_path(path)
        if local is not None:
            if os.path.lexists(local):
                os.remove(local)
        elif tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)


@contextlib.contextmanager
def atomic_output(path, binary=False):
    """Yields a file to write; `path` appears, complete, only if the block ends.

    The data goes to a hidden temporary beside `path` (`temporary_path`),
    which replaces `path` in one rename once the block is done: a crash, a
    full disk or an exception leaves the previous file as it was and removes
    the temporary. Locally the temporary is fsynced before the rename and the
    directory after it; other file systems go through `tf.io.gfile` (their
    rename is a copy on object stores, whose objects appear whole).

    Args:
        path: the file to (re)place; its directory must exist.
        binary: bytes instead of UTF-8 text.
    """
    temp = temporary_path(path)
    local = local_path(temp)
    mode = "wb" if binary else "w"
    try:
        if local is not None:
            stream = open(local, mode, **({} if binary else {"encoding": "utf-8"}))
        else:
            stream = tf.io.gfile.GFile(temp, mode)
        with stream:
            yield stream
            if local is not None:
                stream.flush()
                os.fsync(stream.fileno())
        if local is not None:
            os.replace(local, local_path(path))
            fsync_path(os.path.dirname(local) or ".")
        else:
            tf.io.gfile.rename(temp, path, overwrite=True)
    finally:
        _remove_quietly(temp)


def write_atomically(path, data):
    """Writes `data` (str or bytes) to `path` whole or not at all."""
    with atomic_output(path, binary=isinstance(data, bytes)) as f:
        f.write(data)


def strict_json_value(value):
    """`value` with NumPy scalars and arrays as Python values and every
    NaN/infinity replaced by None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()  # a NumPy scalar or array
    if isinstance(value, dict):
        return {k: strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v) for v in value]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def strict_json(payload, **dump_options):
    """JSON text in which a NaN or an infinity is `null` (RFC 8259 has neither)."""
    return json.dumps(strict_json_value(payload), allow_nan=False, **dump_options)


def write_json_atomically(path, payload):
    """Writes `payload` as strict JSON (sorted keys, indented) whole or not at all."""
    write_atomically(path, strict_json(payload, indent=2, sort_keys=True) + "\n")


def special_file_kind(mode):
    """None for a regular file, else what it is ("a FIFO", ...) by `st_mode`."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "a special file")


def check_input_file(path, what):
    """Raises ValueError unless `path` is an existing regular file.

    Args:
        path: the file (symlinks are followed).
        what: how to name it, e.g. "CSV file".
    """
    if not os.path.exists(path):
        raise ValueError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} is not a regular file")


def unique_real_paths(paths):
    """(the paths naming distinct real files, in order; the later duplicates).

    Two paths of one file (a symlink, `./a.jpg`, the same path twice) count once.
    """
    seen, unique, duplicates = set(), [], []
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            duplicates.append(path)
        else:
            seen.add(real)
            unique.append(path)
    return unique, duplicates

"""Files written whole or not at all, strict JSON, and what kind a path is.

Every file a command writes goes through `atomic_output`: a local path through
the OS with fsync, any other path (`gs://`, `s3://`, `ram://`, ...) through
`tf.io.gfile`, never as a local folder named like the URL. Decisions:
docs/data.md, Files and output locations.
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


def exists(path):
    """Whether `path` names a file or directory (a dangling symlink counts),
    on any file system."""
    local = local_path(path)
    return os.path.lexists(local) if local is not None else tf.io.gfile.exists(path)


def require_local(path, what, why):
    """The OS path of `path` (`file://` stripped) for a feature that needs a
    local file system, else one ValueError: never a local folder named like
    the URL.

    Args:
        path: the path the user gave.
        what: how to name it, e.g. "--output_dir".
        why: what needs the local file system, for the message.
    """
    local = local_path(path)
    if local is None:
        raise ValueError(f"{what}={os.fspath(path)!r} is not on the local file system, "
                         f"which {why} needs. Write to a local path, then copy the files "
                         "where they belong (e.g. gsutil -m cp -r, or tf.io.gfile).")
    return local


def temporary_path(path):
    """A hidden sibling of `path` no other writer uses: `.<name>.tmp-<pid>-<hex>`."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{name}{_TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def temporary_owner(name):
    """The name of the file whose temporary `name` is (`temporary_path`'s, or
    an earlier release's `.<name>.tmp-<pid>`), or None."""
    if not name.startswith(".") or _TEMP_MARK not in name:
        return None
    owner, _, rest = name[1:].rpartition(_TEMP_MARK)
    parts = rest.split("-")
    return owner if parts[0].isdigit() and len(parts) <= 2 else None


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
    """Removes `path` if it exists; never raises an I/O error."""
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
    the temporary (docs/data.md, Files and output locations).

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


def unique_real_paths(items, key=None):
    """(the items naming distinct real files, in order; the later duplicates).

    Two paths of one file (a symlink, `./a.jpg`, the same path twice) count
    once. `key(item)` gives an item's path (default: the item is the path).
    """
    seen, unique, duplicates = set(), [], []
    for item in items:
        real = os.path.realpath(key(item) if key else item)
        if real in seen:
            duplicates.append(item)
        else:
            seen.add(real)
            unique.append(item)
    return unique, duplicates

"""One converter at a time changes the files an output directory's splits share.

Converters of different splits may run at once into one directory (train and
val in parallel); `labels.txt` is shared, so the check of it at the start and
the commit of a split at the end each run under an exclusive `flock` of the
output directory itself (docs/data.md, Shard writer). A lock on the
directory leaves no file behind; where a file system cannot lock a directory
(NFS maps `flock` to byte-range locks, which need a file open for writing),
the lock is the file `<output_dir>/.conversion.lock` instead.
"""

import contextlib
import fcntl
import os

LOCK_NAME = ".conversion.lock"


def _lock_directory(output_dir):
    """The locked descriptor of the directory, or None where it cannot be locked."""
    fd = os.open(output_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except OSError:  # EBADF on NFS; ENOLCK, EINVAL elsewhere
        os.close(fd)
        return None


@contextlib.contextmanager
def locked(output_dir):
    """Holds the directory's conversion lock for the block (waits for another
    converter's check or commit, which take moments).

    Example:
    >>> import tempfile
    >>> with locked(tempfile.mkdtemp()):
    ...     pass
    """
    fd = _lock_directory(output_dir)
    if fd is None:
        path = os.path.join(output_dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            raise ValueError(
                f"cannot lock {path} ({e.strerror}): this file system has no locks; "
                "convert into a local directory, then copy the files") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock

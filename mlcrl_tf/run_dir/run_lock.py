"""One training run at a time per model_dir: `model_dir/.lock`.

Created with O_CREAT|O_EXCL (atomic on local file systems and NFS), its
modification time is a heartbeat; a stale lock is broken, and a run whose
lock was taken stops before its next save (docs/design.md, Run lock;
docs/reliability.md).
"""

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from mlcrl_tf.run_dir import lock_owner
from pipelines.utils import files

LOCK_FILE = ".lock"
# A lock whose heartbeat is older than this is stale (another host); the holder
# refreshes it every LOCK_STALE_AFTER_SECS / 10 seconds. The default of
# --lock_timeout_secs.
LOCK_STALE_AFTER_SECS = 300


class LockLostError(RuntimeError):
    """This run's lock on its model_dir was broken by another run."""


# The locks this process holds, by real path of their model_dir (see check_lock).
_HELD_LOCKS = {}


def _format_time(seconds):
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _identity(stat):
    return stat.st_dev, stat.st_ino


class RunLock:
    """An exclusive lock on a model_dir for the lifetime of one training run.

    The file `model_dir/.lock`, created with O_CREAT|O_EXCL, holds JSON
    {host, pid, started, token, machine, process_start}; its modification
    time is the heartbeat, refreshed every `stale_after_secs / 10` seconds
    through the run's own open descriptor, so a heartbeat never rewrites a
    lock another run took. `verify` re-reads the file (the heartbeat and
    `check_lock`, before every save, call it): a lost lock stops training
    before its next save. A lock is stale, and broken with a warning, when
    its holder is gone (`lock_owner.gone_reason`: judged on its own machine
    only) or its heartbeat is older than `stale_after_secs`. The rules and
    their limits: docs/design.md, Run lock.

    Args:
        model_dir: an existing local directory.
        stale_after_secs: heartbeat age after which a lock is stale.

    Raises (on entering):
        ValueError: the model_dir is in use by a live run (named).

    Example:
    >>> import tempfile
    >>> with RunLock(tempfile.mkdtemp()) as lock:
    ...     lock.verify()
    True
    """

    def __init__(self, model_dir, stale_after_secs=LOCK_STALE_AFTER_SECS):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, LOCK_FILE)
        self.stale_after_secs = float(stale_after_secs)
        self.token = uuid.uuid4().hex
        self.lost = None
        self._stop = threading.Event()
        self._thread = None
        self._fd = None  # the lock file this run created, open for the heartbeat
        self._verify_lock = threading.Lock()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc_info):
        self.release()

    def acquire(self):
        """Takes the lock (breaking a stale one) and starts the heartbeat."""
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                text, holder, heartbeat = self._read()
                reason = self._stale_reason(holder, heartbeat)
                if reason is None:
                    raise ValueError(self._in_use(holder, heartbeat)) from None
                self._break(text, reason)
                continue
            self._fd = fd
            self._write_holder(fd)
            _HELD_LOCKS[os.path.realpath(self.model_dir)] = self
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=f"lock-heartbeat {self.path}")
            self._thread.start()
            return
        raise ValueError(f"--model_dir={self.model_dir!r}: could not take {self.path} "
                         "(other runs are taking it at the same time).")

    def _write_holder(self, fd):
        """Writes this run's holder JSON and its first heartbeat; a failure (a
        full disk) removes the file and is one ValueError naming it."""
        now = time.time()
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
                  "token": self.token, **lock_owner.identity()}
        try:
            os.write(fd, json.dumps(holder).encode())
            os.utime(fd, (now, now))  # the first heartbeat, on this host's clock
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            self._fd = None
            with contextlib.suppress(OSError):
                os.remove(self.path)
            raise ValueError(f"--model_dir={self.model_dir!r}: cannot write the lock file "
                             f"{self.path} ({e.strerror or e}).") from None

    def release(self):
        """Stops the heartbeat and removes the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD_LOCKS.pop(os.path.realpath(self.model_dir), None)
        if self._fd is None:
            return
        try:
            if self._lost_reason() is None:
                self._remove_own()
        except OSError as e:  # e.g. a read-only model_dir: not the error to report
            logging.warning("Could not remove the lock %s (%s); the next run breaks it "
                            "once it is stale.", self.path, e.strerror or e)
        finally:
            os.close(self._fd)
            self._fd = None

    def verify(self):
        """Re-reads the lock file: True while it is this run's lock.

        Once it is not, `lost` says why (logged once) and stays set.
        """
        with self._verify_lock:
            if self.lost is None and self._fd is not None:
                reason = self._lost_reason()
                if reason is not None:
                    self.lost = reason
                    logging.error("Lost the lock of --model_dir=%r: %s.",
                                  self.model_dir, reason)
            return self.lost is None

    def _lost_reason(self):
        """Why `path` is not this run's lock file any more, or None if it is."""
        try:
            with open(self.path) as f:
                same_file = _identity(os.fstat(f.fileno())) == _identity(
                    os.fstat(self._fd))
                text = f.read()
        except FileNotFoundError:
            return f"the lock {self.path} was removed"
        holder = _parse(text)
        if same_file and holder.get("token") == self.token:
            return None
        return (f"the lock {self.path} was taken by pid {holder.get('pid', '?')} on "
                f"host {holder.get('host', '?')}")

    def _remove_own(self):
        """Removes the lock file, and only if it is the one this run created."""
        aside = f"{self.path}.release-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _identity(os.stat(aside)) != _identity(os.fstat(self._fd)):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # not ours: put it back
        os.remove(aside)

    def _read(self):
        """(text, holder dict, heartbeat) of the lock file.

        ("", {}, None) when it is gone; holder is {} when unparsable (e.g.
        just being written). The heartbeat is the file's modification time.
        """
        try:
            with open(self.path) as f:
                heartbeat = os.fstat(f.fileno()).st_mtime
                text = f.read()
        except FileNotFoundError:
            return "", {}, None
        return text, _parse(text), heartbeat

    def _stale_reason(self, holder, heartbeat):
        """Why the lock `holder` describes is stale, or None if it is live."""
        if heartbeat is None:
            return "it is gone"
        gone = lock_owner.gone_reason(holder)
        if gone:
            return gone
        age = time.time() - heartbeat
        if age > self.stale_after_secs:
            return (f"its heartbeat is {age:.0f} s old, older than "
                    f"{self.stale_after_secs:.0f} s")
        return None

    def _in_use(self, holder, heartbeat):
        started = holder.get("started")
        since = f" since {_format_time(started)}" if isinstance(started, (int, float)) else ""
        beat = (f", last heartbeat {time.time() - heartbeat:.0f} s ago"
                if heartbeat is not None else "")
        legacy = ("; it was taken by mlcrl_tf 0.1, which does not record its machine, so "
                  "only its heartbeat can tell it is stale" if "machine" not in holder else "")
        return (f"--model_dir={self.model_dir!r} is in use by pid {holder.get('pid', '?')} "
                f"on host {holder.get('host', '?')}{since}{beat} (lock file {self.path}"
                f"{legacy}). Wait for that run to end or stop it, or use another "
                "--model_dir. A lock is broken automatically once its process is gone "
                f"(same machine) or its heartbeat is older than {self.stale_after_secs:.0f} s.")

    def _break(self, text, reason):
        """Removes the stale lock whose content was `text` (and only that one).

        The file is moved aside first and judged again there: a new lock
        taken meanwhile, or a holder that beat meanwhile, is put back.
        """
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run broke it first
        with open(aside) as f:
            heartbeat = os.fstat(f.fileno()).st_mtime
            moved = f.read()
        if moved != text or self._stale_reason(_parse(moved), heartbeat) is None:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            os.remove(aside)
            return
        os.remove(aside)
        logging.warning("Breaking the stale lock %s (%s): %s", self.path, reason,
                        text.strip() or "(empty)")

    def _beat(self):
        interval = max(0.05, self.stale_after_secs / 10)
        while not self._stop.wait(interval) and self.verify():
            now = time.time()
            try:  # through our descriptor: never another run's file
                os.utime(self._fd, (now, now))
            except OSError as e:  # e.g. a stale NFS handle: verify tells at the next beat
                logging.warning("Could not refresh the heartbeat of %s: %s", self.path, e)


def _parse(text):
    """The holder dict of a lock file's text ({} when unparsable)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def run_lock(model_dir, is_chief, stale_after_secs=LOCK_STALE_AFTER_SECS):
    """The lock a training run holds on `model_dir` (a context manager).

    Only the chief locks (the workers of one run share its model_dir). A
    `file://` model_dir is a local one and is locked; an object-store one
    (`gs://...`) cannot hold an O_EXCL lock file and is not locked (logged;
    what users of a shared bucket must do: docs/reliability.md).
    """
    if not is_chief:
        return contextlib.nullcontext()
    local = files.local_path(model_dir)
    if local is None:
        logging.warning("--model_dir=%r is not on a local or NFS file system: it is not "
                        "locked against a second run (docs/reliability.md).", model_dir)
        return contextlib.nullcontext()
    return RunLock(local, stale_after_secs)


def check_lock(model_dir):
    """Raises LockLostError if this process's lock on `model_dir` was lost.

    Re-reads the lock file (`RunLock.verify`), so a lock another run took
    since the last heartbeat is caught here, before the save. A no-op when
    this process holds no lock on it (e.g. a non-chief worker, or a library
    user running a Trainer without `RunLock`).
    """
    local = files.local_path(model_dir)
    lock = _HELD_LOCKS.get(os.path.realpath(local)) if local is not None else None
    if lock is not None and not lock.verify():
        raise LockLostError(
            f"--model_dir={model_dir!r} is no longer this run's: {lock.lost} (its "
            "heartbeat was judged stale, or the file was removed). Training stopped "
            "without saving, so that two runs never write the same checkpoints.")

"""One training run at a time per model_dir.

`run_lock(model_dir, is_chief, stale_after_secs)` is the lock a training run
holds for its lifetime: the file `model_dir/.lock`, created with
O_CREAT|O_EXCL (atomic on local filesystems and on NFS, where fcntl/flock
locks often are not), holding host, pid, start time and a heartbeat. A
second run on the same model_dir is refused with a message naming the
holder; a lock whose process is gone (same host) or whose heartbeat is
older than `stale_after_secs` (`--lock_timeout_secs`) is broken with a
warning. `check_lock` (called by `checkpoints.CheckpointRun` before every
save) stops a run whose lock another run broke, so two runs never write the
same checkpoints.
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

LOCK_FILE = ".lock"
# A lock whose heartbeat is older than this is stale (another host); the holder
# refreshes it every LOCK_STALE_AFTER_SECS / 10 seconds.
LOCK_STALE_AFTER_SECS = 300


class LockLostError(RuntimeError):
    """This run's lock on its model_dir was broken by another run."""


# The locks this process holds, by real path of their model_dir (see check_lock).
_HELD_LOCKS = {}


def _process_alive(pid):
    """Whether process `pid` runs on this host (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _format_time(seconds):
    return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


class RunLock:
    """An exclusive lock on a model_dir for the lifetime of one training run.

    The lock is the file `model_dir/.lock`, created with O_CREAT|O_EXCL (atomic
    on local filesystems and on NFS, where fcntl/flock locks often are not),
    holding JSON {host, pid, started, heartbeat, token}. While held, a thread
    rewrites the heartbeat every `stale_after_secs / 10` seconds; it also
    notices when the file is no longer this lock's (another run broke it),
    after which `check_lock` (called before every save) stops training.

    A lock that exists is stale, and is broken with a warning, when its
    holder's process is gone (same host) or its heartbeat is older than
    `stale_after_secs` (any host: clocks must agree to well within it).

    Use as a context manager; the lock is released on normal exit and on
    exceptions (a SIGKILLed run leaves a stale lock, broken by the next run).

    Args:
        model_dir: an existing directory (not an object-store URL).
        stale_after_secs: heartbeat age after which a lock is stale.

    Raises (on entering):
        ValueError: the model_dir is in use by a live run (named).
    """

    def __init__(self, model_dir, stale_after_secs=LOCK_STALE_AFTER_SECS):
        self.model_dir = model_dir
        self.path = os.path.join(model_dir, LOCK_FILE)
        self.stale_after_secs = float(stale_after_secs)
        self.token = uuid.uuid4().hex
        self.lost = None
        self._stop = threading.Event()
        self._thread = None
        self._holder = {}

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
                text, holder = self._read()
                reason = self._stale_reason(holder)
                if reason is None:
                    raise ValueError(self._in_use(holder)) from None
                self._break(text, reason)
                continue
            now = time.time()
            self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                            "started": now, "heartbeat": now, "token": self.token}
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._holder))
                f.flush()
                os.fsync(f.fileno())
            _HELD_LOCKS[os.path.realpath(self.model_dir)] = self
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name=f"lock-heartbeat {self.path}")
            self._thread.start()
            return
        raise ValueError(f"--model_dir={self.model_dir!r}: could not take {self.path} "
                         "(other runs are taking it at the same time).")

    def release(self):
        """Stops the heartbeat and removes the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _HELD_LOCKS.pop(os.path.realpath(self.model_dir), None)
        _, holder = self._read()
        if holder.get("token") == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def _read(self):
        """(text, holder dict) of the lock file; ("", {}) when gone or unparsable."""
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return "", {}
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return text, holder if isinstance(holder, dict) else {}

    def _stale_reason(self, holder):
        """Why the lock `holder` describes is stale, or None if it is live."""
        heartbeat = holder.get("heartbeat")
        if not isinstance(heartbeat, (int, float)):
            # Unreadable or just being written: judge by the file's age.
            try:
                heartbeat = os.stat(self.path).st_mtime
            except FileNotFoundError:
                return "it is gone"
        age = time.time() - heartbeat
        pid = holder.get("pid")
        if (holder.get("host") == socket.gethostname() and isinstance(pid, int)
                and not _process_alive(pid)):
            return f"its process (pid {pid}) is gone"
        if age > self.stale_after_secs:
            return (f"its heartbeat is {age:.0f} s old, older than "
                    f"{self.stale_after_secs:.0f} s")
        return None

    def _in_use(self, holder):
        started = holder.get("started")
        since = f" since {_format_time(started)}" if isinstance(started, (int, float)) else ""
        heartbeat = holder.get("heartbeat")
        beat = (f", last heartbeat {time.time() - heartbeat:.0f} s ago"
                if isinstance(heartbeat, (int, float)) else "")
        return (f"--model_dir={self.model_dir!r} is in use by pid {holder.get('pid', '?')} "
                f"on host {holder.get('host', '?')}{since}{beat} (lock file {self.path}). "
                "Wait for that run to end or stop it, or use another --model_dir. A lock "
                "is broken automatically once its process is gone (same host) or its "
                f"heartbeat is older than {self.stale_after_secs:.0f} s.")

    def _break(self, text, reason):
        """Removes the stale lock whose content was `text` (and only that one)."""
        aside = f"{self.path}.stale-{self.token}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run broke it first
        with open(aside) as f:
            moved = f.read()
        if moved != text:  # a new lock was taken meanwhile: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return
        os.remove(aside)
        logging.warning("Breaking the stale lock %s (%s): %s", self.path, reason,
                        text.strip() or "(empty)")

    def _beat(self):
        interval = max(0.05, self.stale_after_secs / 10)
        while not self._stop.wait(interval):
            _, holder = self._read()
            if holder.get("token") != self.token:
                self.lost = (f"the lock {self.path} was taken by pid {holder.get('pid', '?')}"
                             f" on host {holder.get('host', '?')}" if holder
                             else f"the lock {self.path} was removed")
                logging.error("Lost the lock of --model_dir=%r: %s.", self.model_dir,
                              self.lost)
                return
            self._holder["heartbeat"] = time.time()
            tmp = f"{self.path}.beat-{self.token}"
            try:
                with open(tmp, "w") as f:
                    f.write(json.dumps(self._holder))
                os.replace(tmp, self.path)
            except OSError as e:  # e.g. a full disk: try again at the next beat
                logging.warning("Could not refresh the heartbeat of %s: %s", self.path, e)


def run_lock(model_dir, is_chief, stale_after_secs=LOCK_STALE_AFTER_SECS):
    """The lock a training run holds on `model_dir` (a context manager).

    Only the chief locks (the workers of one run share its model_dir); an
    object-store model_dir (`gs://...`) cannot hold an O_EXCL lock file and is
    not locked (logged).
    """
    if not is_chief:
        return contextlib.nullcontext()
    if "://" in model_dir:
        logging.warning("--model_dir=%r is not a filesystem path: it is not locked "
                        "against a second run.", model_dir)
        return contextlib.nullcontext()
    return RunLock(model_dir, stale_after_secs)


def check_lock(model_dir):
    """Raises LockLostError if this process's lock on `model_dir` was lost.

    A no-op when this process holds no lock on it (e.g. a non-chief worker,
    or a library user running a Trainer without `RunLock`).
    """
    lock = _HELD_LOCKS.get(os.path.realpath(model_dir))
    if lock is not None and lock.lost:
        raise LockLostError(
            f"--model_dir={model_dir!r} is no longer this run's: {lock.lost} (its "
            "heartbeat was judged stale). Training stopped without saving, so that two "
            "runs never write the same checkpoints.")

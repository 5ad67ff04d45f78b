"""The run lock's ownership checks (mlcrl_tf.run_lock), without TensorFlow.

`check_lock` (called before every save) re-reads the lock file instead of
trusting what the heartbeat thread last saw, and a heartbeat refreshes only
this run's own file: it can never rewrite a lock another run has taken.
"""

import json
import os
import socket
import threading
import time

import pytest

from mlcrl_tf.run_dir import run_lock


def _take_over(path, token="other", pid=7):
    """What another run does when it breaks a lock and takes it."""
    aside = f"{path}.aside"
    os.rename(path, aside)
    os.remove(aside)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"host": "elsewhere", "pid": pid, "started": time.time(),
                            "token": token}))


def test_check_lock_rereads_the_file_before_a_save(tmp_path):
    """Failed before: check_lock trusted the heartbeat thread, which had not
    run yet (it beats every 30 s), so a save went ahead on a lost lock."""
    with run_lock.RunLock(str(tmp_path), stale_after_secs=300) as lock:
        run_lock.check_lock(str(tmp_path))  # ours: no error
        _take_over(lock.path)
        with pytest.raises(run_lock.LockLostError, match="pid 7 on host elsewhere"):
            run_lock.check_lock(str(tmp_path))
    assert json.loads((tmp_path / ".lock").read_text())["token"] == "other"  # kept


def test_check_lock_sees_a_lock_rewritten_in_place(tmp_path):
    with run_lock.RunLock(str(tmp_path), stale_after_secs=300) as lock:
        with open(lock.path, "w") as f:  # same file, another run's content
            f.write(json.dumps({"host": "elsewhere", "pid": 9, "token": "other"}))
        with pytest.raises(run_lock.LockLostError, match="pid 9 on host elsewhere"):
            run_lock.check_lock(str(tmp_path))


def test_check_lock_sees_a_removed_lock(tmp_path):
    with run_lock.RunLock(str(tmp_path), stale_after_secs=300) as lock:
        os.remove(lock.path)
        with pytest.raises(run_lock.LockLostError, match="was removed"):
            run_lock.check_lock(str(tmp_path))


def test_a_heartbeat_never_rewrites_a_lock_another_run_took(tmp_path, monkeypatch):
    """Failed before: the heartbeat read the file, found its token, and then
    replaced the file; a run that took the lock in between was overwritten."""
    taken = threading.Event()
    real_time = time.time

    def time_with_takeover():
        # Another run takes the lock right after the heartbeat checked it.
        thread = threading.current_thread().name
        if thread.startswith("lock-heartbeat") and not taken.is_set():
            taken.set()
            _take_over(os.path.join(str(tmp_path), run_lock.LOCK_FILE))
        return real_time()

    with run_lock.RunLock(str(tmp_path), stale_after_secs=0.5) as lock:
        monkeypatch.setattr(run_lock.time, "time", time_with_takeover)
        assert taken.wait(60)
        deadline = real_time() + 60
        while not lock.lost and real_time() < deadline:
            time.sleep(0.05)
        monkeypatch.undo()
        assert lock.lost and "pid 7 on host elsewhere" in lock.lost
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["token"] == "other" and holder["pid"] == 7  # theirs, intact


def test_the_heartbeat_is_the_files_modification_time(tmp_path):
    with run_lock.RunLock(str(tmp_path), stale_after_secs=1) as lock:
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["token"] == lock.token and holder["host"] == socket.gethostname()
        first = os.stat(lock.path).st_mtime
        deadline = time.monotonic() + 60
        while os.stat(lock.path).st_mtime <= first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.stat(lock.path).st_mtime > first
        assert json.loads((tmp_path / ".lock").read_text()) == holder  # content kept
        run_lock.check_lock(str(tmp_path))
    assert not (tmp_path / ".lock").exists()


def test_a_stale_lock_that_beats_while_being_broken_is_put_back(tmp_path):
    """The breaker re-judges the file it moved aside: a holder that beat in
    between is live, and its lock goes back in place."""
    holder = run_lock.RunLock(str(tmp_path), stale_after_secs=300)
    holder.acquire()
    try:
        old = time.time() - 600
        os.utime(holder.path, (old, old))
        breaker = run_lock.RunLock(str(tmp_path), stale_after_secs=300)
        text, seen, mtime = breaker._read()
        assert "older than" in breaker._stale_reason(seen, mtime)
        os.utime(holder.path)  # the holder beats now
        breaker._break(text, "stale")
        run_lock.check_lock(str(tmp_path))  # still the holder's
        assert json.loads((tmp_path / ".lock").read_text())["token"] == holder.token
    finally:
        holder.release()
    assert not (tmp_path / ".lock").exists()

"""Tests of mlcrl_tf.checkpoints: resuming from lost or corrupt checkpoints,
the run lock, failed saves and unreadable files (issue 13 items 2, 3, 8, 18).

The unit tests drive `CheckpointRun` and `RunLock` on tiny variables; the
others train small_cnn at 48 px for a few steps, in process or with the
train CLI in subprocesses (two real processes for the lock).
"""

import errno
import glob
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.run_dir import checkpoints
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import lock_owner
from mlcrl_tf.run_dir import restore
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.run_dir import run_lock
from mlcrl_tf.training import train_lib

from conftest import REPO
from conftest import run_module

SMALL = ["--backbone=small_cnn", "--backbone_weights=", "--image_size=48", "--lr_decay_epochs=",
         "--batch_size=8", "--learning_rate=0.05", "--backbone_learning_rate=0.02",
         "--log_every_steps=1", "--shuffle_buffer=64"]


def _config(demo_data, model_dir, **overrides):
    values = dict(model_dir=str(model_dir), train_files=demo_data["train_files"],
                  eval_files=None, backbone="small_cnn", image_size=48, batch_size=8,
                  epochs=1, steps_per_epoch=4, learning_rate=0.05,
                  backbone_learning_rate=0.005, log_every_steps=1,
                  checkpoint_every_steps=2, num_summary_images=0, shuffle_buffer=64,
                  backbone_weights=None, lr_decay_epochs=())
    values.update(overrides)
    return config_lib.Config(**values)


def _steps(directory):
    """Steps of the ckpt-<n>.index / .data-* files in `directory`."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted({int(m.group(1)) for m in map(re.compile(r"ckpt-(\d+)\.").match, names)
                   if m})


def _data_file(directory, step):
    return glob.glob(os.path.join(str(directory), f"ckpt-{step}.data-*"))[0]


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path, offset=10):
    with open(path, "r+b") as f:
        f.seek(offset)
        value = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([value ^ 0xFF]))


# ---------------------------------------------------------------------------
# Resuming when the newest checkpoint is lost or corrupt (item 2), on tiny
# variables: value = 100 * step, so a restored value names its step.
# ---------------------------------------------------------------------------

def _objects():
    return {"w": tf.Variable(np.zeros(300, np.float32)),
            "step": tf.Variable(0, dtype=tf.int64)}


def _run(model_dir, keep=3, is_chief=True, objects=None):
    objects = objects or _objects()
    return checkpoints.CheckpointRun(str(model_dir), objects, keep, is_chief), objects


def _saved_run(model_dir, steps=(2, 4, 6, 8), keep=3, best=None):
    """A run dir with checkpoints of `steps` (keep=3: 4, 6, 8 stay)."""
    run, objects = _run(model_dir, keep)
    for step in steps:
        objects["w"].assign(np.full(300, 100.0 * step, np.float32))
        objects["step"].assign(step)
        run.save(step)
        if step == best:
            run.save_best(step, {"step": step, "selection_mAP": 0.5,
                                 "metrics": {"mAP": 0.5}})
    return run


def _lose_state(d):
    os.remove(d / "checkpoint")


def _state_names_missing(d):
    (d / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-10"\nall_model_checkpoint_paths: "ckpt-6"\n'
        'all_model_checkpoint_paths: "ckpt-8"\nall_model_checkpoint_paths: "ckpt-10"\n')


DAMAGE = {
    # name: (damage, step restored, newest step set aside in .corrupt/)
    "truncated_data": (lambda d: _truncate(_data_file(d, 8)), 6, 8),
    "flipped_byte_in_data": (lambda d: _flip_byte(_data_file(d, 8)), 6, 8),
    "truncated_index": (lambda d: _truncate(str(d / "ckpt-8.index")), 6, 8),
    "empty_data": (lambda d: open(_data_file(d, 8), "wb").close(), 6, 8),
    "index_removed": (lambda d: os.remove(d / "ckpt-8.index"), 6, 8),
    "data_removed": (lambda d: os.remove(_data_file(d, 8)), 6, 8),
    "files_removed": (lambda d: [os.remove(p) for p in glob.glob(str(d / "ckpt-8.*"))],
                      6, None),
    "state_file_missing": (_lose_state, 8, None),
    "state_names_missing_prefix": (_state_names_missing, 8, None),
    "state_file_garbage": (lambda d: (d / "checkpoint").write_text("{{{ not a proto"),
                           8, None),
    "two_newest_corrupt": (lambda d: [_truncate(_data_file(d, 8)),
                                      _truncate(str(d / "ckpt-6.index"))], 4, 8),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_resume_takes_the_newest_loadable_checkpoint(tmp_path, case, caplog):
    """Failed on main: DataLossError/IndexError/OpError tracebacks, or None
    (a restart at step 0 that then rotated the older checkpoints away)."""
    damage, restored_step, set_aside = DAMAGE[case]
    model_dir = tmp_path / "run"
    _saved_run(model_dir)
    damage(model_dir)
    run, objects = _run(model_dir)
    with caplog.at_level(logging.INFO):
        path = run.restore_latest()
    assert path == str(model_dir / f"ckpt-{restored_step}")
    assert int(objects["step"].numpy()) == restored_step
    np.testing.assert_array_equal(objects["w"].numpy(), 100.0 * restored_step)
    if restored_step < 8:  # says which, and why the newer ones were skipped
        assert "newest checkpoint that loads" in caplog.text and "ckpt-8" in caplog.text
    # Unloadable newer checkpoints are moved aside, never deleted.
    corrupt = glob.glob(str(model_dir / ".corrupt" / "*" / "ckpt-*"))
    if set_aside:
        assert any(os.path.basename(p).startswith(f"ckpt-{set_aside}.") for p in corrupt)
    else:
        assert not corrupt
    # The state file lists what is on disk, in step order, latest = restored.
    state = tf.train.get_checkpoint_state(str(model_dir))
    assert state.model_checkpoint_path.endswith(f"ckpt-{restored_step}")
    on_disk = _steps(model_dir)
    assert [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths] == on_disk
    # Rotation deletes only checkpoints older than the one restored.
    objects["step"].assign(restored_step + 10)
    run.save(restored_step + 10)
    after = _steps(model_dir)
    assert [s for s in on_disk if s >= restored_step] == [
        s for s in after if restored_step <= s < restored_step + 10]
    assert after[-1] == restored_step + 10 and len(after) == min(3, len(on_disk) + 1)


def test_nothing_loadable_is_refused_and_nothing_moves(tmp_path):
    """Failed on main: an IndexError traceback."""
    model_dir = tmp_path / "run"
    _saved_run(model_dir)
    for step in (4, 6, 8):
        _truncate(_data_file(model_dir, step))
    before = sorted(os.listdir(model_dir))
    state = (model_dir / "checkpoint").read_text()
    run, _ = _run(model_dir)
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"none loads: .*ckpt-8 .*ckpt-6 .*ckpt-4.*new --model_dir"):
        run.restore_latest()
    assert sorted(os.listdir(model_dir)) == before
    assert (model_dir / "checkpoint").read_text() == state


def test_all_files_gone_but_listed_is_refused(tmp_path):
    """Failed on main: returned None (training restarted at step 0)."""
    model_dir = tmp_path / "run"
    _saved_run(model_dir)
    for path in glob.glob(str(model_dir / "ckpt-*")):
        os.remove(path)
    run, _ = _run(model_dir)
    with pytest.raises(checkpoints.CheckpointError, match="ckpt-8 .listed in checkpoint"):
        run.restore_latest()


def test_best_checkpoint_is_a_fallback(tmp_path):
    """Failed on main: returned None (restart at step 0)."""
    model_dir = tmp_path / "run"
    _saved_run(model_dir, best=6)
    for step in (4, 6, 8):
        _truncate(_data_file(model_dir, step))
    run, objects = _run(model_dir)
    assert run.restore_latest() == str(model_dir / "best" / "ckpt-6")
    assert int(objects["step"].numpy()) == 6
    # ckpt-8 and ckpt-6 are set aside; ckpt-4 (older, never tried) stays listed.
    assert len(glob.glob(str(model_dir / ".corrupt" / "*" / "ckpt-*"))) == 4
    assert _steps(model_dir) == [4] == checkpoints.listed_steps(str(model_dir))


def test_new_run_and_interrupted_save(tmp_path):
    model_dir = tmp_path / "run"
    run, _ = _run(model_dir)
    assert run.restore_latest() is None  # a new run: nothing to restore, no error
    _saved_run(model_dir, steps=(2, 4))
    (model_dir / "ckpt-6_temp").mkdir()  # a save killed before its files were merged
    (model_dir / "ckpt-6_temp" / "part-00000-of-00001.index").write_bytes(b"x")
    run, _ = _run(model_dir)
    assert run.restore_latest().endswith("ckpt-4")
    assert not (model_dir / "ckpt-6_temp").exists()


def test_worker_restores_without_moving_anything(tmp_path):
    model_dir = tmp_path / "run"
    _saved_run(model_dir)
    _truncate(_data_file(model_dir, 8))
    before = sorted(os.listdir(model_dir))
    run, _ = _run(model_dir, is_chief=False)
    assert run.restore_latest().endswith("ckpt-6")
    assert sorted(os.listdir(model_dir)) == before


def test_checkpoint_of_other_objects_is_refused_not_moved(tmp_path):
    model_dir = tmp_path / "run"
    _saved_run(model_dir)
    objects = dict(_objects(), ema=tf.Variable(np.zeros(3, np.float32)))
    run, _ = _run(model_dir, objects=objects)
    with pytest.raises(ValueError, match="does not hold what this run saves"):
        run.restore_latest()
    assert _steps(model_dir) == [4, 6, 8]


# ---------------------------------------------------------------------------
# The same through training, and through the CLI.
# ---------------------------------------------------------------------------

def _checkpoint_values(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith("save_counter")}


def test_cli_resumes_past_a_corrupt_checkpoint_bit_identically(demo_data, tmp_path):
    """Failed on main: a traceback (IndexError: Read less bytes than requested)."""
    model_dir = tmp_path / "run"
    args = SMALL + [f"--model_dir={model_dir}", f"--train_files={demo_data['train_files']}",
                    "--epochs=2", "--steps_per_epoch=4", "--lr_decay_epochs=1",
                    "--checkpoint_every_steps=2", "--deterministic", "--seed=3"]
    run_module("mlcrl_tf.train", args)
    assert _steps(model_dir) == [4, 6, 8]
    reference = _checkpoint_values(str(model_dir / "ckpt-8"))
    _truncate(_data_file(model_dir, 8))
    resumed = run_module("mlcrl_tf.train", args)
    assert "Resuming at step 6/8 (epoch 2)" in resumed.stdout
    assert "ckpt-8" in resumed.stderr and "newest checkpoint that loads" in resumed.stderr
    assert _steps(model_dir) == [4, 6, 8]  # nothing older was rotated away
    assert glob.glob(str(model_dir / ".corrupt" / "*" / "ckpt-8.data-*"))
    result = _checkpoint_values(str(model_dir / "ckpt-8"))
    assert result.keys() == reference.keys() and reference
    for name in reference:
        np.testing.assert_array_equal(result[name], reference[name], err_msg=name)
    # None loadable: refused (the CLI prints a CheckpointError as one line, see
    # test_cli_full_disk_is_one_line), nothing touched, the lock released.
    for step in (4, 6, 8):
        _truncate(_data_file(model_dir, step))
    config = config_lib.Config(
        model_dir=str(model_dir), train_files=demo_data["train_files"], epochs=2,
        steps_per_epoch=4, backbone="small_cnn", backbone_weights=None, image_size=48,
        batch_size=8, lr_decay_epochs=(1,), learning_rate=0.05,
        backbone_learning_rate=0.02)
    before = sorted(os.listdir(model_dir))
    with pytest.raises(checkpoints.CheckpointError, match="none loads"):
        train_lib.train_and_evaluate(config)
    assert sorted(os.listdir(model_dir)) == before


def test_restore_model_names_an_unreadable_checkpoint(demo_data, tmp_path):
    """Failed on main: IndexError traceback; without a state file, 'no checkpoint'."""
    config = _config(demo_data, tmp_path / "run", steps_per_epoch=2)
    train_lib.train_and_evaluate(config)
    _lose_state(tmp_path / "run")
    assert restore.restore_model(config.model_dir)[3].endswith("ckpt-2")
    _truncate(_data_file(tmp_path / "run", 2))
    with pytest.raises(ValueError, match=r"ckpt-2' cannot be read .*--checkpoint="):
        restore.restore_model(config.model_dir)


# ---------------------------------------------------------------------------
# Failed saves and unusable directories (item 18).
# ---------------------------------------------------------------------------

def _failing_save(error):
    original = tf.train.CheckpointManager.save

    def save(self, checkpoint_number=None, **kwargs):
        if checkpoint_number is not None and checkpoint_number >= 4:
            raise error
        return original(self, checkpoint_number=checkpoint_number, **kwargs)

    return save


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    (tf.errors.ResourceExhaustedError(None, None, "disk quota exceeded"),
     "ResourceExhaustedError: disk quota exceeded"),
])
def test_full_disk_at_checkpoint_time_stops_with_one_line(demo_data, tmp_path,
                                                          monkeypatch, error, reason):
    """Failed on main: the OSError/ResourceExhaustedError propagated as is."""
    monkeypatch.setattr(tf.train.CheckpointManager, "save", _failing_save(error))
    config = _config(demo_data, tmp_path / "run", steps_per_epoch=6)
    with pytest.raises(checkpoints.CheckpointError) as raised:
        train_lib.train_and_evaluate(config)
    message = str(raised.value)
    assert f"step 4 in {config.model_dir!r}" in message and reason in message
    assert "last good checkpoint is " + os.path.join(config.model_dir, "ckpt-2") in message
    assert "\n" not in message
    assert not (tmp_path / "run" / ".lock").exists()  # released on the exception


_FULL_DISK_CLI = """
import errno, runpy, sys
import tensorflow as tf
original = tf.train.CheckpointManager.save
def save(self, checkpoint_number=None, **kwargs):
    if checkpoint_number is not None and checkpoint_number >= 4:
        raise OSError(errno.ENOSPC, "No space left on device")
    return original(self, checkpoint_number=checkpoint_number, **kwargs)
tf.train.CheckpointManager.save = save
sys.argv = ["mlcrl_tf.train"] + sys.argv[1:]
runpy.run_module("mlcrl_tf.train", run_name="__main__")
"""


def test_cli_full_disk_is_one_line(demo_data, tmp_path):
    """Failed on main: an OSError traceback."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CLI, *SMALL, f"--model_dir={tmp_path / 'run'}",
         f"--train_files={demo_data['train_files']}", "--epochs=1", "--steps_per_epoch=6",
         "--checkpoint_every_steps=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = [text for text in proc.stderr.splitlines() if text.startswith("error:")]
    assert len(line) == 1 and "No space left on device" in line[0]
    assert "ckpt-2" in line[0] and str(tmp_path / "run") in line[0]


def test_unwritable_export_dir_fails_before_the_first_step(demo_data, tmp_path):
    """Failed on main: training ran to the end, then a FailedPreconditionError."""
    (tmp_path / "a_file").write_text("not a directory")
    config = _config(demo_data, tmp_path / "run",
                     export_dir=str(tmp_path / "a_file" / "export"))
    with pytest.raises(ValueError, match="--export_dir=.*(not a directory|cannot create)"):
        train_lib.train_and_evaluate(config)
    assert _steps(tmp_path / "run") == []


@pytest.mark.parametrize("flag", ["--export_dir", "--model_dir"])
def test_cli_unusable_directory_is_one_line(demo_data, tmp_path, flag):
    """--export_dir failed on main (a traceback after training); --model_dir
    passed already (the check existed)."""
    (tmp_path / "a_file").write_text("not a directory")
    dirs = {"--model_dir": str(tmp_path / "run"), "--export_dir": str(tmp_path / "export")}
    dirs[flag] = str(tmp_path / "a_file" / "sub")
    proc = run_module("mlcrl_tf.train", SMALL + [
        f"--train_files={demo_data['train_files']}", "--epochs=1", "--steps_per_epoch=2",
        *(f"{k}={v}" for k, v in dirs.items())], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {flag}=" in proc.stderr
    assert "not a directory" in proc.stderr or "cannot create" in proc.stderr
    assert "Finished at step" not in proc.stdout


# ---------------------------------------------------------------------------
# The run lock (item 3).
# ---------------------------------------------------------------------------

def _write_lock(model_dir, heartbeat=None, **fields):
    """Another run's lock (of this machine unless `fields` say otherwise); its
    heartbeat is the file's modification time."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "token": "other"}
    if "host" not in fields:
        holder.update(lock_owner.identity())
    holder.update(fields)
    (model_dir / ".lock").write_text(json.dumps(holder))
    if heartbeat is not None:
        os.utime(model_dir / ".lock", (heartbeat, heartbeat))


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_and_released(tmp_path):
    with run_lock.RunLock(str(tmp_path)) as lock:
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert holder["token"] == lock.token
        assert holder["started"] <= os.stat(tmp_path / ".lock").st_mtime <= time.time()
        with pytest.raises(ValueError, match=rf"is in use by pid {os.getpid()} on host "
                                             rf"{socket.gethostname()} since 20"):
            run_lock.RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / ".lock").exists()
    with pytest.raises(KeyError):
        with run_lock.RunLock(str(tmp_path)):
            raise KeyError("boom")
    assert not (tmp_path / ".lock").exists()  # released on an exception too


@pytest.mark.parametrize("fields, stale", [
    ({"pid": "dead"}, True),                                   # same host, process gone
    ({"host": "elsewhere", "pid": 1}, False),                  # other host, fresh heartbeat
    ({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 120}, True),
    ({"heartbeat": time.time() - 120}, True),                  # same host, hung
    ({"pid": "self", "process_start": 1}, True),               # our pid, reused: holder gone
    # Failed before: a run on another machine with the same host name (or in
    # another container) was judged dead because its pid is not alive here.
    ({"pid": "dead", "machine": f"{socket.gethostname()}|another boot|1:1"}, False),
    ({"pid": "dead", "machine": None}, False),                 # release 0.1's lock: no machine
])
def test_stale_locks_are_broken_live_ones_refused(tmp_path, caplog, fields, stale):
    if fields.get("pid") == "dead":
        fields = dict(fields, pid=_dead_pid())
    if fields.get("pid") == "self":
        fields = dict(fields, pid=os.getpid())
    _write_lock(tmp_path, **{k: v for k, v in fields.items() if v is not None})
    if fields.get("machine", "") is None:  # 0.1 wrote no machine nor start time
        holder = json.loads((tmp_path / ".lock").read_text())
        (tmp_path / ".lock").write_text(json.dumps(
            {k: v for k, v in holder.items() if k not in ("machine", "process_start")}))
    lock = run_lock.RunLock(str(tmp_path), stale_after_secs=60)
    if not stale:
        with pytest.raises(ValueError, match=rf"in use by pid {fields['pid']} on host "):
            lock.acquire()
        return
    with caplog.at_level(logging.WARNING), lock:
        assert json.loads((tmp_path / ".lock").read_text())["token"] == lock.token
    assert "Breaking the stale lock" in caplog.text


def test_heartbeat_is_refreshed_and_a_lost_lock_stops_saving(tmp_path):
    run, _ = _run(tmp_path)
    lock_file = tmp_path / ".lock"
    with run_lock.RunLock(str(tmp_path), stale_after_secs=1) as lock:
        first = os.stat(lock_file).st_mtime  # the heartbeat
        # The heartbeat runs every 0.1 s; the deadline only bounds a failure.
        deadline = time.monotonic() + 60
        while os.stat(lock_file).st_mtime <= first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.stat(lock_file).st_mtime > first
        run.save(1)
        _write_lock(tmp_path, host="elsewhere", pid=7)  # another run breaks it
        # The save re-reads the lock: no heartbeat needs to notice first.
        with pytest.raises(checkpoints.CheckpointError, match="no longer this run's"):
            run.save(2)
        assert lock.lost and "pid 7 on host elsewhere" in lock.lost
    assert json.loads(lock_file.read_text())["pid"] == 7  # theirs, kept


_HOLDER = """
import sys, time
from mlcrl_tf.run_dir import run_lock
with run_lock.RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_two_processes_cannot_share_a_model_dir(demo_data, tmp_path):
    """Failed on main: the second run trained into the same model_dir (rc 0)."""
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(model_dir)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, text=True)
    try:
        # A deadline, so that a holder that hangs before locking fails the test.
        ready, _, _ = select.select([holder.stdout], [], [], 300)
        assert ready, "the holder did not lock the model_dir within 300 s"
        assert holder.stdout.readline().strip() == "locked", (
            f"the holder did not print 'locked' (returncode {holder.poll()})")
        args = SMALL + [f"--model_dir={model_dir}", "--epochs=1", "--steps_per_epoch=2",
                        f"--train_files={demo_data['train_files']}"]
        refused = run_module("mlcrl_tf.train", args, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert (f"is in use by pid {holder.pid} on host {socket.gethostname()} since"
                in refused.stderr)
        assert sorted(os.listdir(model_dir)) == [".lock"]  # nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    # The killed holder left a stale lock: the next run breaks it and trains.
    proc = run_module("mlcrl_tf.train", args)
    assert "Breaking the stale lock" in proc.stderr and f"pid {holder.pid}" in proc.stderr
    assert "Finished at step 2" in proc.stdout
    assert not (model_dir / ".lock").exists()


# ---------------------------------------------------------------------------
# best/metrics.json (item 8).
# ---------------------------------------------------------------------------

def test_truncated_best_metrics_is_ignored_and_named(demo_data, tmp_path, caplog):
    """Passes on main (already handled by read_best_metrics); before the
    atomic write (9204379) this ended training with 'Expecting value'."""
    config = _config(demo_data, tmp_path / "run", eval_files=demo_data["test_files"],
                     steps_per_epoch=1, eval_steps=1)
    train_lib.train_and_evaluate(config)
    path = tmp_path / "run" / "best" / "metrics.json"
    text = path.read_text()
    path.write_text(text[:len(text) // 2])
    with caplog.at_level(logging.WARNING):
        assert run_files.read_best_metrics(str(path)) is None
        train_lib.train_and_evaluate(config.replace(epochs=2))
    assert f"Ignoring unreadable {path}" in caplog.text
    assert json.loads(path.read_text())["step"] == 2

"""A run's checkpoints: the newest that loads, rotation and repair.

    model_dir/checkpoint, ckpt-<n>.*   latest checkpoints (model, optimizer, step, EMA)
    model_dir/best/ckpt-<n>.*          the checkpoint with the best selection mAP
    model_dir/.corrupt/<time>/         unreadable checkpoints set aside at a resume

Decisions: docs/reliability.md, Training runs and checkpoints.
"""

import contextlib
import json
import os
import re
import shutil
import time

from absl import logging
import tensorflow as tf

from mlcrl_tf.run_dir import run_files
from mlcrl_tf.run_dir import run_lock
from pipelines.utils import files

CHECKPOINT_NAME = "ckpt"
STATE_FILE = "checkpoint"
CORRUPT_DIR = ".corrupt"
_CHECKPOINT_FILE = re.compile(r"^ckpt-(\d+)\.(index|data-\d{5}-of-\d{5})$")
_TEMP_DIR = re.compile(r"^ckpt-\d+_temp$")
# What reading a truncated, corrupt or missing checkpoint raises (measured on
# truncations and flipped bytes of .index and .data files).
UNREADABLE = (tf.errors.OpError, IndexError)


class CheckpointError(run_files.RunDirError):
    """A checkpoint could not be saved or restored, or the run lost its lock."""


def checkpoints_on_disk(directory):
    """{step: [file names]} of the `ckpt-<step>.index` / `.data-*` files in `directory`."""
    found = {}
    if not tf.io.gfile.isdir(directory):
        return found
    for name in tf.io.gfile.listdir(directory):
        match = _CHECKPOINT_FILE.match(name.rstrip("/"))
        if match:
            found.setdefault(int(match.group(1)), []).append(name.rstrip("/"))
    return found


def listed_steps(directory):
    """Steps of the checkpoints `directory`/checkpoint lists (its latest last).

    An absent or unparsable state file lists nothing (TensorFlow logs why).
    """
    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return []
    paths = list(state.all_model_checkpoint_paths) + [state.model_checkpoint_path]
    steps = []
    for path in paths:
        match = re.fullmatch(rf"{CHECKPOINT_NAME}-(\d+)", os.path.basename(path))
        if match and int(match.group(1)) not in steps:
            steps.append(int(match.group(1)))
    return steps


def write_checkpoint_state(directory, steps):
    """Rewrites `directory`/checkpoint to list `ckpt-<step>` for `steps`.

    The order is step order (the newest is the latest), so that
    tf.train.CheckpointManager's rotation deletes the oldest first. Each
    entry's timestamp is its .index file's modification time; the "last
    preserved" time is below all of them, so the manager manages (and may
    rotate) every listed checkpoint. No steps: the state file is removed.
    """
    path = os.path.join(directory, STATE_FILE)
    steps = sorted(steps)
    if not steps:
        if tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)
        return
    names = [f"{CHECKPOINT_NAME}-{step}" for step in steps]
    stamps = []
    for name in names:
        index = os.path.join(directory, f"{name}.index")
        stamps.append(tf.io.gfile.stat(index).mtime_nsec / 1e9
                      if tf.io.gfile.exists(index) else time.time())
    lines = [f'model_checkpoint_path: "{names[-1]}"']
    lines += [f'all_model_checkpoint_paths: "{name}"' for name in names]
    lines += [f"all_model_checkpoint_timestamps: {stamp!r}" for stamp in stamps]
    lines.append(f"last_preserved_timestamp: {min(stamps) - 1.0!r}")
    files.write_atomically(path, "\n".join(lines) + "\n")


def newest_on_disk(directory):
    """Prefix of the newest `ckpt-<n>` with an .index file in `directory`, or None."""
    steps = [step for step, names in checkpoints_on_disk(directory).items()
             if f"{CHECKPOINT_NAME}-{step}.index" in names]
    return os.path.join(directory, f"{CHECKPOINT_NAME}-{max(steps)}") if steps else None


def resolve_checkpoint(model_dir, checkpoint=None, best=False):
    """Path of the checkpoint to load: an explicit prefix, the best or latest.

    The latest is the one the `checkpoint` state file names; when that file
    is missing or names a checkpoint whose files are gone, it is the newest
    `ckpt-<n>.index` on disk (logged).

    Raises:
        ValueError: no checkpoint found.
    """
    if checkpoint:
        if not tf.io.gfile.glob(checkpoint + ".index"):
            raise ValueError(f"checkpoint={checkpoint!r}: no such checkpoint "
                             "(expected <prefix>.index).")
        return checkpoint
    directory = os.path.join(model_dir, run_files.BEST_DIR) if best else model_dir
    path = tf.train.latest_checkpoint(directory)
    if path is None:
        path = newest_on_disk(directory)
        if path is not None:
            logging.warning("%s lists no checkpoint whose files exist; using the newest "
                            "on disk, %s.", os.path.join(directory, STATE_FILE), path)
    if path is None:
        raise ValueError(f"no checkpoint in {directory!r}"
                         + (" (no eval has run yet: try without --best)" if best else ""))
    return path


class CheckpointRun:
    """The checkpoints of one training run in `model_dir` (layout above).

    Restores the newest checkpoint that loads (setting unreadable ones aside),
    saves every step once and keeps the best one in best/.

    Args:
        model_dir: the run's directory.
        objects: what a checkpoint holds, e.g. {"model", "optimizer", "step",
            "ema"} (trackables).
        keep: how many latest checkpoints to keep.
        is_chief: whether this worker's checkpoints are the run's (only the
            chief moves unreadable checkpoints aside and rewrites the state
            file; every worker restores the same, newest loadable one).
        worker: this worker's name; a non-chief worker of
            MultiWorkerMirroredStrategy must take part in every save, into
            `model_dir/.workers/<worker>/`, which is deleted after each save.

    Example:
    >>> import tempfile
    >>> step = tf.Variable(3, dtype=tf.int64)
    >>> run = CheckpointRun(tempfile.mkdtemp(), {"step": step}, keep=2)
    >>> run.restore_latest() is None  # a new run
    True
    >>> os.path.basename(run.save(3))
    'ckpt-3'
    """

    def __init__(self, model_dir, objects, keep, is_chief=True, worker="chief"):
        self.model_dir = model_dir
        self.is_chief = is_chief
        self.keep = keep
        self.checkpoint = tf.train.Checkpoint(**objects)
        self._directory = (model_dir if is_chief
                           else os.path.join(model_dir, ".workers", worker))
        self._make_managers()

    def _make_managers(self):
        """(Re)reads the state files: the managers' bookkeeping comes from them."""
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self._directory, max_to_keep=self.keep,
            checkpoint_name=CHECKPOINT_NAME)
        self.best_manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self._directory, run_files.BEST_DIR), max_to_keep=1,
            checkpoint_name=CHECKPOINT_NAME)

    @property
    def latest(self):
        """Path of the latest checkpoint of this run, or None."""
        return self.manager.latest_checkpoint

    # --- restore ----------------------------------------------------------------

    def restore_latest(self):
        """Restores the newest loadable checkpoint of the run; returns its path or None.

        Candidates are every `ckpt-<n>` of model_dir found on disk and
        best/ckpt-<n>, newest first (model_dir's first at equal steps). The
        newer ones that do not load are named in a warning with the reason;
        the chief then moves model_dir's unloadable ones to
        `.corrupt/<time>/` and rebuilds the state file from the checkpoints
        left (all older than the one restored).

        Returns:
            The restored prefix, or None for a new run (no checkpoint files
            and no state file listing any).

        Raises:
            CheckpointError: the run had checkpoints but none loads (nothing
                is moved or rewritten then).
            ValueError: a readable checkpoint does not hold this run's objects.
        """
        listed = listed_steps(self.model_dir)
        on_disk = checkpoints_on_disk(self.model_dir)
        skipped = []
        for step, path, own in self._candidates(on_disk):
            reason = self._try_restore(path)
            if reason is None:
                missing = [s for s in listed if s > step and s not in on_disk]
                self._report(path, skipped, missing)
                if self.is_chief:
                    self._repair(step, [s for s, _, _, mine in skipped if mine])
                return path
            skipped.append((step, path, reason, own))
        missing = [s for s in listed if s not in on_disk]
        if skipped or missing:
            raise CheckpointError(self._nothing_loadable(skipped, missing))
        return None

    def _candidates(self, on_disk):
        """[(step, prefix, in model_dir)] of model_dir's and best/'s checkpoints,
        newest first (model_dir's first at equal steps)."""
        best_dir = os.path.join(self.model_dir, run_files.BEST_DIR)
        found = [(step, True, os.path.join(self.model_dir, f"{CHECKPOINT_NAME}-{step}"))
                 for step in on_disk]
        found += [(step, False, os.path.join(best_dir, f"{CHECKPOINT_NAME}-{step}"))
                  for step in checkpoints_on_disk(best_dir)]
        return [(step, path, own) for step, own, path in sorted(found, reverse=True)]

    def _try_restore(self, path):
        """Restores `path`; returns None, or why it cannot be read.

        A failed read assigns nothing (TensorFlow reads every tensor before
        assigning), so trying an older checkpoint next is safe.

        Raises:
            ValueError: the checkpoint reads but lacks objects of this run.
        """
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except UNREADABLE as e:
            return f"{type(e).__name__}: {files.error_text(e)}"
        except AssertionError as e:
            raise ValueError(
                f"checkpoint {path!r} does not hold what this run saves "
                f"({files.error_text(e)}); was a setting that changes the saved state "
                "(e.g. --ema_decay, --precision) changed? Resume with the run's "
                "settings or use a new --model_dir.") from None
        return None

    def _report(self, path, skipped, missing):
        """Says which checkpoint was restored and why newer ones were not."""
        reasons = [f"{CHECKPOINT_NAME}-{s} (listed in {STATE_FILE} but its files are "
                   "gone)" for s in missing]
        reasons += [f"{p} ({reason})" for _, p, reason, _ in skipped]
        if not reasons:
            logging.info("Resumed from %s.", path)
            return
        aside = ""
        if self.is_chief and any(own for *_, own in skipped):
            aside = (f"; the unreadable ones of model_dir are moved to "
                     f"{os.path.join(self.model_dir, CORRUPT_DIR)}/")
        logging.warning("Resumed from %s, the newest checkpoint that loads. Skipped "
                        "newer: %s%s.", path, "; ".join(reasons), aside)

    def _nothing_loadable(self, skipped, missing):
        """The message of a run whose checkpoints all fail to load."""
        what = [f"{p} ({reason})" for _, p, reason, _ in skipped]
        what += [f"{CHECKPOINT_NAME}-{s} (listed in {STATE_FILE}, files gone)"
                 for s in missing]
        return (f"--model_dir={self.model_dir!r} holds checkpoints of an earlier run but "
                f"none loads: {'; '.join(what)}. Refusing to start again at step 0 over "
                "them (nothing was moved or deleted). Restore the files, or use a new "
                "--model_dir to start over.")

    def _repair(self, step, own):
        """Moves model_dir's unloadable checkpoints (steps `own`) aside, removes
        interrupted saves and rebuilds the state file from what is left."""
        if own:
            aside = os.path.join(
                self.model_dir, CORRUPT_DIR,
                time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}")
            tf.io.gfile.makedirs(aside)
            on_disk = checkpoints_on_disk(self.model_dir)
            for s in own:
                for name in on_disk[s]:
                    tf.io.gfile.rename(os.path.join(self.model_dir, name),
                                       os.path.join(aside, name))
        for name in tf.io.gfile.listdir(self.model_dir):
            if _TEMP_DIR.match(name.rstrip("/")):  # a save interrupted by a kill
                tf.io.gfile.rmtree(os.path.join(self.model_dir, name.rstrip("/")))
        kept = sorted(s for s in checkpoints_on_disk(self.model_dir) if s <= step)
        if own or listed_steps(self.model_dir) != kept:
            write_checkpoint_state(self.model_dir, kept)
            self._make_managers()

    # --- save ---------------------------------------------------------------------

    def save(self, step):
        """Saves the state of `step` (once per step); returns the path.

        Raises:
            CheckpointError: the save failed (e.g. the disk is full) or the
                run lost its lock; the message names the directory and the
                last good checkpoint.
        """
        if self.latest and self.latest.endswith(f"-{step}"):
            return self.latest
        self._check_lock()
        try:
            path = self.manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as e:
            raise self._save_failed(self._directory, step, e) from None
        self._clean_worker_dir()
        return path

    def best_metrics(self):
        """best/metrics.json (see `read_best_metrics`)."""
        return run_files.read_best_metrics(os.path.join(
            self.model_dir, run_files.BEST_DIR, run_files.BEST_METRICS_FILE))

    def save_best(self, step, payload):
        """Keeps the state of `step` as best/ with `payload` as its metrics.json.

        Raises:
            CheckpointError: as `save`.
        """
        self._check_lock()
        best_dir = os.path.join(self._directory, run_files.BEST_DIR)
        try:
            self.best_manager.save(checkpoint_number=step)
            if self.is_chief:
                files.write_json_atomically(
                    os.path.join(best_dir, run_files.BEST_METRICS_FILE), payload)
        except (OSError, tf.errors.OpError) as e:
            raise self._save_failed(best_dir, step, e) from None
        self._clean_worker_dir()

    def evaluated_step(self):
        """The step of the run's last finished end-of-epoch evaluation, or -1."""
        path = os.path.join(self.model_dir, run_files.EVALUATED_FILE)
        try:
            with tf.io.gfile.GFile(path) as f:
                return int(json.load(f)["step"])
        except (tf.errors.NotFoundError, ValueError, KeyError, TypeError):
            return -1

    def mark_evaluated(self, step):
        """Records that the end-of-epoch evaluation of `step` finished (chief)."""
        if self.is_chief:
            try:
                files.write_json_atomically(
                    os.path.join(self.model_dir, run_files.EVALUATED_FILE), {"step": int(step)})
            except (OSError, tf.errors.OpError) as e:
                raise self._save_failed(self.model_dir, step, e) from None

    def _save_failed(self, directory, step, error):
        """The error of a failed save; removes the save's temporary directory."""
        temp = os.path.join(directory, f"{CHECKPOINT_NAME}-{step}_temp")
        with contextlib.suppress(*files.IO_ERRORS):  # the save's error is the one to report
            if tf.io.gfile.isdir(temp):
                tf.io.gfile.rmtree(temp)
        reason = (os.strerror(error.errno) if isinstance(error, OSError) and error.errno
                  else f"{type(error).__name__}: {files.error_text(error)}")
        return CheckpointError(
            f"could not save the checkpoint of step {step} in {directory!r} ({reason}); "
            f"training stopped. The last good checkpoint is {self.latest or '(none yet)'}: "
            "free space (or fix the directory) and rerun the same command to resume "
            "from it.")

    def _check_lock(self):
        if self.is_chief:
            try:
                run_lock.check_lock(self.model_dir)
            except run_lock.LockLostError as e:
                raise CheckpointError(str(e)) from None

    def _clean_worker_dir(self):
        if not self.is_chief:
            shutil.rmtree(self._directory, ignore_errors=True)

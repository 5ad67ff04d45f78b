"""What a training run leaves in `model_dir`, and how to load it back.

    model_dir/
      run.json              the Config of the run + class names (written at start)
      .lock                 held by the run while it trains (`run_lock.RunLock`)
      checkpoint            TensorFlow's state file: the latest checkpoints, in order
      ckpt-<n>.*            latest checkpoints (model, optimizer, step, EMA)
      best/ckpt-<n>.*       the checkpoint with the best mAP on --selection_files,
                            else on --eval_files (for COCO/VOC: the test split)
      best/metrics.json     its step, what it was selected on, its metrics
      train/, eval/         TensorBoard event files
      .corrupt/<time>/      unreadable checkpoints set aside at a resume (never
                            deleted by mlcrl_tf)

`restore_model` rebuilds the training model from run.json and restores the
weights (the EMA weights when the run kept an EMA), for evaluate/export.

Decisions (docs/reliability.md, "Training runs and checkpoints"):
- A resume takes the newest checkpoint that actually loads, found from the
  files on disk (`ckpt-<n>.index` / `.data-*`) and best/, not only from the
  `checkpoint` state file, newest first. Newer ones that do not load are
  moved to `.corrupt/<time>/` (not deleted), and the state file is rebuilt
  from the files left, in step order, so that the manager's rotation can
  only delete checkpoints older than the one restored.
- When checkpoints of the run evidently existed (the state file lists some,
  or ckpt files are present) and none loads, training refuses to start
  (`CheckpointError`) and leaves every file where it is.
- One run at a time per model_dir: `RunLock`, a lock file created with
  O_CREAT|O_EXCL (works on NFS, unlike fcntl locks) holding host, pid, start
  time and a heartbeat; a lock whose process is gone (same host) or whose
  heartbeat is older than `stale_after_secs` is broken with a warning.
"""

import contextlib
import dataclasses
import json
import math
import numbers
import os
import re
import shutil
import time

from absl import logging
import keras
import tensorflow as tf

from mlcrl_tf import config as config_lib
from pipelines.utils import files
from mlcrl_tf import model as model_lib
from mlcrl_tf import optim
from mlcrl_tf import run_lock

RUN_FILE = "run.json"
# run.json "format": 2 = trained with PaperSGD (PyTorch's momentum rule). Runs
# without it used Keras SGD, whose momentum slots mean something else: their
# checkpoints evaluate and export, but training cannot resume from them.
RUN_FORMAT = 2
BEST_DIR = "best"
BEST_METRICS_FILE = "metrics.json"
CHECKPOINT_NAME = "ckpt"
STATE_FILE = "checkpoint"
CORRUPT_DIR = ".corrupt"
# Fields that define the network: a resumed run must agree on them.
MODEL_FIELDS = ("backbone", "variant", "image_size", "num_classes")
# A resumed run must also keep its preprocessing (evaluate/export follow run.json).
RESUME_FIELDS = MODEL_FIELDS + ("antialias",)
EVALUATED_FILE = "evaluated.json"
_CHECKPOINT_FILE = re.compile(r"^ckpt-(\d+)\.(index|data-\d{5}-of-\d{5})$")
_TEMP_DIR = re.compile(r"^ckpt-\d+_temp$")
# What reading a truncated, corrupt or missing checkpoint raises (measured on
# truncations and flipped bytes of .index and .data files).
_UNREADABLE = (tf.errors.OpError, IndexError)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or restored, or the run lost its lock."""


def _write_atomically(path, text):
    """Writes `text` to a hidden temporary file, then renames it over `path`."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def _strict_json_value(value):
    """`value` with every NaN/infinity (Python or NumPy float) replaced by None."""
    if isinstance(value, dict):
        return {k: _strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json_value(v) for v in value]
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


def write_json_atomically(path, payload):
    """Writes strict JSON (NaN and infinities as null) to a hidden temporary
    file, then renames it over `path`."""
    _write_atomically(path, json.dumps(_strict_json_value(payload), indent=2,
                                       sort_keys=True, default=float, allow_nan=False))


def write_run(model_dir, config, class_names):
    """Writes run.json (atomically) so evaluate/export can rebuild the model."""
    payload = {"config": dataclasses.asdict(config), "class_names": list(class_names),
               "format": RUN_FORMAT}
    write_json_atomically(os.path.join(model_dir, RUN_FILE), payload)


def read_best_metrics(path):
    """best/metrics.json as a dict; None if absent or unreadable (logged).

    An unreadable file (e.g. truncated by a crash of an older version that
    wrote it in place) is not fatal: the next evaluation rewrites it.
    """
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path) as f:
            payload = json.load(f)
        best_selection_score(payload)
        return payload
    except (ValueError, KeyError, TypeError) as e:
        logging.warning("Ignoring unreadable %s (%s); the next evaluation rewrites it.",
                        path, e)
        return None


def best_selection_score(best):
    """The mAP best/ was selected on (older files: their eval mAP)."""
    return float(best.get("selection_mAP", best["metrics"]["mAP"]))


def read_run(model_dir):
    """Returns (Config, class_names) of the run in model_dir.

    Raises:
        ValueError: model_dir has no run.json (not a training directory).
    """
    path = os.path.join(model_dir, RUN_FILE)
    if not tf.io.gfile.exists(path):
        raise ValueError(f"model_dir={model_dir!r} holds no {RUN_FILE}: not the "
                         "model_dir of an mlcrl_tf training run.")
    with tf.io.gfile.GFile(path) as f:
        payload = json.load(f)
    fields = {f.name for f in dataclasses.fields(config_lib.Config)}
    values = {k: v for k, v in payload["config"].items() if k in fields}
    for key in ("crop_scales", "lr_decay_epochs"):
        values[key] = tuple(values.get(key, ()))
    # Runs from before --antialias resized with antialiasing; every run.json
    # written since has the key.
    values.setdefault("antialias", True)
    return config_lib.Config(**values), payload["class_names"]


def check_resumable(model_dir, config):
    """Raises ValueError if training cannot resume the run in `model_dir`.

    A run.json of another network, or checkpoints of a run trained with the
    old (Keras SGD) optimizer state, are refused with a message saying what
    to do; a model_dir without run.json is a new run.
    """
    path = os.path.join(model_dir, RUN_FILE)
    if not tf.io.gfile.exists(path):
        return
    saved, _ = read_run(model_dir)
    check_resume_compatible(saved, config)
    with tf.io.gfile.GFile(path) as f:
        run_format = json.load(f).get("format", 1)
    if run_format < RUN_FORMAT and checkpoints_on_disk(model_dir):
        raise ValueError(
            f"--model_dir={model_dir!r} holds checkpoints of an earlier mlcrl_tf whose "
            "optimizer was Keras SGD (its momentum slots do not mean what PaperSGD's "
            "do), so training cannot resume from them exactly. They still evaluate "
            "and export; to train, use a new --model_dir.")


def check_resume_compatible(saved, config):
    """Raises ValueError if `config` would build a different network (or
    preprocess differently)."""
    for name in RESUME_FIELDS:
        if getattr(saved, name) != getattr(config, name):
            raise ValueError(
                f"--{name}={getattr(config, name)!r} differs from the run already in "
                f"--model_dir={config.model_dir!r} ({getattr(saved, name)!r}); use a "
                "new --model_dir or the same setting to resume.")


@contextlib.contextmanager
def dtype_policy(policy):
    """Builds layers under a Keras dtype policy, then restores the global one.

    Layers keep the policy they were built with, so float32 and
    mixed-precision models can live in one process.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build_model_for(config, backbone_weights=None):
    """The training model described by a Config.

    Args:
        config: a `Config` with num_classes set.
        backbone_weights: None (random init, e.g. before restoring a
            checkpoint) or what `--backbone_weights` names.
    """
    return model_lib.build_model(
        config.num_classes, backbone=config.backbone, image_size=config.image_size,
        variant=config.variant, backbone_weights=backbone_weights)


# ---------------------------------------------------------------------------
# Checkpoints on disk (not only those the `checkpoint` state file lists).
# ---------------------------------------------------------------------------

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
    _write_atomically(path, "\n".join(lines) + "\n")


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
    directory = os.path.join(model_dir, BEST_DIR) if best else model_dir
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


def restore_model(model_dir, checkpoint=None, best=False, use_ema=True,
                  precision="float32"):
    """Rebuilds a run's model and restores its weights for inference.

    Args:
        model_dir: a training run's directory.
        checkpoint: an explicit checkpoint prefix; default the latest.
        best: take the best-by-mAP checkpoint instead of the latest.
        use_ema: load the EMA weights when the run kept an EMA.
        precision: the Keras policy to build the model under (its variables
            are float32 whatever the policy, so any checkpoint restores).

    Returns:
        (model, config, class_names, checkpoint_path).

    Raises:
        ValueError: no run.json, no checkpoint, the checkpoint cannot be
            read (truncated, corrupt, files missing) or holds another model:
            the message names it.
    """
    config, class_names = read_run(model_dir)
    path = resolve_checkpoint(model_dir, checkpoint, best)
    with dtype_policy(precision):
        model = build_model_for(config)
    objects = {"model": model}
    ema = None
    if use_ema and config.ema_decay > 0:
        ema = optim.ExponentialMovingAverage(model.trainable_variables, config.ema_decay)
        objects["ema"] = ema
    try:
        status = tf.train.Checkpoint(**objects).restore(path)
    except _UNREADABLE as e:
        raise ValueError(
            f"checkpoint {path!r} cannot be read "
            f"({type(e).__name__}: {files.error_text(e)}); "
            "it is truncated, corrupt or incomplete. Choose another one with "
            "--checkpoint=<prefix> (or resume training, which sets it aside).") from None
    # Every variable of the rebuilt model must come from the checkpoint (the
    # optimizer state in it is not needed here).
    try:
        status.assert_existing_objects_matched().expect_partial()
    except AssertionError as e:
        raise ValueError(
            f"checkpoint {path!r} does not hold the model described by {model_dir!r}/"
            f"{RUN_FILE} ({config.variant}/{config.backbone}, {config.num_classes} classes"
            f"{', EMA' if ema is not None else ''}): {files.error_text(e)[:300]}. Is it "
            "a checkpoint of another run? (--use_ema=false loads a run without its EMA.)"
        ) from None
    if ema is not None:
        ema.copy_to_model()
    return model, config, class_names, path


class CheckpointRun:
    """The checkpoints of one training run in `model_dir` (layout above).

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
            self.checkpoint, os.path.join(self._directory, BEST_DIR), max_to_keep=1,
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
        best_dir = os.path.join(self.model_dir, BEST_DIR)
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
        except _UNREADABLE as e:
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
        return read_best_metrics(os.path.join(self.model_dir, BEST_DIR, BEST_METRICS_FILE))

    def save_best(self, step, payload):
        """Keeps the state of `step` as best/ with `payload` as its metrics.json.

        Raises:
            CheckpointError: as `save`.
        """
        self._check_lock()
        best_dir = os.path.join(self._directory, BEST_DIR)
        try:
            self.best_manager.save(checkpoint_number=step)
            if self.is_chief:
                write_json_atomically(os.path.join(best_dir, BEST_METRICS_FILE), payload)
        except (OSError, tf.errors.OpError) as e:
            raise self._save_failed(best_dir, step, e) from None
        self._clean_worker_dir()

    def evaluated_step(self):
        """The step of the run's last finished end-of-epoch evaluation, or -1."""
        path = os.path.join(self.model_dir, EVALUATED_FILE)
        try:
            with tf.io.gfile.GFile(path) as f:
                return int(json.load(f)["step"])
        except (tf.errors.NotFoundError, ValueError, KeyError, TypeError):
            return -1

    def mark_evaluated(self, step):
        """Records that the end-of-epoch evaluation of `step` finished (chief)."""
        if self.is_chief:
            try:
                write_json_atomically(os.path.join(self.model_dir, EVALUATED_FILE),
                                      {"step": int(step)})
            except (OSError, tf.errors.OpError) as e:
                raise self._save_failed(self.model_dir, step, e) from None

    def _save_failed(self, directory, step, error):
        """The error of a failed save; removes the save's temporary directory."""
        temp = os.path.join(directory, f"{CHECKPOINT_NAME}-{step}_temp")
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

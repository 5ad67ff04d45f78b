"""What a training run leaves in `model_dir`, and how to load it back.

    model_dir/
      run.json              the Config of the run + class names (written at start)
      ckpt-<n>.*            latest checkpoints (model, optimizer, step, EMA)
      best/ckpt-<n>.*       the checkpoint with the best mAP on --selection_files,
                            else on --eval_files (for COCO/VOC: the test split)
      best/metrics.json     its step, what it was selected on, its metrics
      train/, eval/         TensorBoard event files

`restore_model` rebuilds the training model from run.json and restores the
weights (the EMA weights when the run kept an EMA), for evaluate/export.
"""

import dataclasses
import json
import os
import shutil

from absl import logging
import tensorflow as tf

from mlcrl_tf import config as config_lib
from mlcrl_tf import model as model_lib
from mlcrl_tf import optim

RUN_FILE = "run.json"
# run.json "format": 2 = trained with PaperSGD (PyTorch's momentum rule). Runs
# without it used Keras SGD, whose momentum slots mean something else: their
# checkpoints evaluate and export, but training cannot resume from them.
RUN_FORMAT = 2
BEST_DIR = "best"
BEST_METRICS_FILE = "metrics.json"
# Fields that define the network: a resumed run must agree on them.
MODEL_FIELDS = ("backbone", "variant", "image_size", "num_classes")


def write_json_atomically(path, payload):
    """Writes JSON to a hidden temporary file, then renames it over `path`."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(payload, indent=2, sort_keys=True, default=float))
    tf.io.gfile.rename(tmp, path, overwrite=True)


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
    if run_format < RUN_FORMAT and tf.train.latest_checkpoint(model_dir):
        raise ValueError(
            f"--model_dir={model_dir!r} holds checkpoints of an earlier mlcrl_tf whose "
            "optimizer was Keras SGD (its momentum slots do not mean what PaperSGD's "
            "do), so training cannot resume from them exactly. They still evaluate "
            "and export; to train, use a new --model_dir.")


def check_resume_compatible(saved, config):
    """Raises ValueError if `config` would build a different network."""
    for name in MODEL_FIELDS:
        if getattr(saved, name) != getattr(config, name):
            raise ValueError(
                f"--{name}={getattr(config, name)!r} differs from the run already in "
                f"--model_dir={config.model_dir!r} ({getattr(saved, name)!r}); use a "
                "new --model_dir or the same setting to resume.")


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


def resolve_checkpoint(model_dir, checkpoint=None, best=False):
    """Path of the checkpoint to load: an explicit prefix, the best or latest.

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
        raise ValueError(f"no checkpoint in {directory!r}"
                         + (" (no eval has run yet: try without --best)" if best else ""))
    return path


def restore_model(model_dir, checkpoint=None, best=False, use_ema=True):
    """Rebuilds a run's model and restores its weights for inference.

    Args:
        model_dir: a training run's directory.
        checkpoint: an explicit checkpoint prefix; default the latest.
        best: take the best-by-mAP checkpoint instead of the latest.
        use_ema: load the EMA weights when the run kept an EMA.

    Returns:
        (model, config, class_names, checkpoint_path).
    """
    config, class_names = read_run(model_dir)
    path = resolve_checkpoint(model_dir, checkpoint, best)
    model = build_model_for(config)
    objects = {"model": model}
    ema = None
    if use_ema and config.ema_decay > 0:
        ema = optim.ExponentialMovingAverage(model.trainable_variables, config.ema_decay)
        objects["ema"] = ema
    status = tf.train.Checkpoint(**objects).restore(path)
    # Every variable of the rebuilt model must come from the checkpoint (the
    # optimizer state in it is not needed here).
    status.assert_existing_objects_matched().expect_partial()
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
        is_chief: whether this worker's checkpoints are the run's.
        worker: this worker's name; a non-chief worker of
            MultiWorkerMirroredStrategy must take part in every save, into
            `model_dir/.workers/<worker>/`, which is deleted after each save.
    """

    def __init__(self, model_dir, objects, keep, is_chief=True, worker="chief"):
        self.model_dir = model_dir
        self.is_chief = is_chief
        self.checkpoint = tf.train.Checkpoint(**objects)
        self._directory = (model_dir if is_chief
                           else os.path.join(model_dir, ".workers", worker))
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self._directory, max_to_keep=keep, checkpoint_name="ckpt")
        self.best_manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self._directory, BEST_DIR), max_to_keep=1,
            checkpoint_name="ckpt")

    @property
    def latest(self):
        """Path of the latest checkpoint of this run, or None."""
        return self.manager.latest_checkpoint

    def restore_latest(self):
        """Restores the latest checkpoint of model_dir; returns its path or None."""
        latest = tf.train.latest_checkpoint(self.model_dir)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            logging.info("Resumed from %s.", latest)
        return latest

    def save(self, step):
        """Saves the state of `step` (once per step); returns the path."""
        if self.latest and self.latest.endswith(f"-{step}"):
            return self.latest
        path = self.manager.save(checkpoint_number=step)
        self._clean_worker_dir()
        return path

    def best_metrics(self):
        """best/metrics.json (see `read_best_metrics`)."""
        return read_best_metrics(os.path.join(self.model_dir, BEST_DIR, BEST_METRICS_FILE))

    def save_best(self, step, payload):
        """Keeps the state of `step` as best/ with `payload` as its metrics.json."""
        self.best_manager.save(checkpoint_number=step)
        self._clean_worker_dir()
        if self.is_chief:
            write_json_atomically(
                os.path.join(self.model_dir, BEST_DIR, BEST_METRICS_FILE), payload)

    def _clean_worker_dir(self):
        if not self.is_chief:
            shutil.rmtree(self._directory, ignore_errors=True)

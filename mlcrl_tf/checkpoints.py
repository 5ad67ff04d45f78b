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

from absl import logging
import tensorflow as tf

from mlcrl_tf import config as config_lib
from mlcrl_tf import model as model_lib

RUN_FILE = "run.json"
# run.json "format": 2 = trained with PaperSGD (PyTorch's momentum rule). Runs
# without it used Keras SGD, whose momentum slots mean something else: their
# checkpoints evaluate and export, but training cannot resume from them.
RUN_FORMAT = 2
BEST_DIR = "best"
BEST_METRICS_FILE = "metrics.json"
# Fields that define the network: a resumed run must agree on them.
MODEL_FIELDS = ("backbone", "variant", "image_size", "num_classes")


class ExponentialMovingAverage(tf.Module):
    """Shadow copies of the trainable weights: ema = d * ema + (1 - d) * w.

    The shadow variables are created in the distribution strategy's scope
    with ONLY_FIRST_REPLICA aggregation, so `update` can run inside
    `strategy.run` (every replica computes the same value).
    """

    def __init__(self, variables, decay):
        super().__init__(name="ema")
        self.decay = float(decay)
        self._model_variables = list(variables)
        self.shadow = [
            tf.Variable(v, trainable=False, name=v.name.split(":")[0] + "_ema",
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for v in self._model_variables]

    def update(self):
        for s, v in zip(self.shadow, self._model_variables):
            s.assign(self.decay * s + (1.0 - self.decay) * tf.cast(v, s.dtype))

    def copy_to_model(self):
        """Overwrites the model's weights with the averages (for eval/export)."""
        for s, v in zip(self.shadow, self._model_variables):
            v.assign(tf.cast(s, v.dtype))

    def swap(self):
        """Exchanges model weights and averages (call twice to undo)."""
        for s, v in zip(self.shadow, self._model_variables):
            tmp = tf.identity(v)
            v.assign(tf.cast(s, v.dtype))
            s.assign(tf.cast(tmp, s.dtype))


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
        ema = ExponentialMovingAverage(model.trainable_variables, config.ema_decay)
        objects["ema"] = ema
    status = tf.train.Checkpoint(**objects).restore(path)
    # Every variable of the rebuilt model must come from the checkpoint (the
    # optimizer state in it is not needed here).
    status.assert_existing_objects_matched().expect_partial()
    if ema is not None:
        ema.copy_to_model()
    return model, config, class_names, path

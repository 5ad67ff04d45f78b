"""The files of a run directory: run.json, best/metrics.json, evaluated.json."""

import dataclasses
import json
import os

from absl import logging
import tensorflow as tf

from mlcrl_tf.run_dir import checkpoints
from mlcrl_tf.run_dir import config as config_lib
from pipelines.utils import files

RUN_FILE = "run.json"
# run.json "format": 2 = trained with PaperSGD (PyTorch's momentum rule). Runs
# without it used Keras SGD, whose momentum slots mean something else: their
# checkpoints evaluate and export, but training cannot resume from them.
RUN_FORMAT = 2
BEST_DIR = "best"
BEST_METRICS_FILE = "metrics.json"
# Fields that define the network: a resumed run must agree on them.
MODEL_FIELDS = ("backbone", "variant", "image_size", "num_classes")
# A resumed run must also keep its preprocessing (evaluate/export follow run.json).
RESUME_FIELDS = MODEL_FIELDS + ("antialias",)
EVALUATED_FILE = "evaluated.json"


def write_run(model_dir, config, class_names):
    """Writes run.json (atomically) so evaluate/export can rebuild the model."""
    payload = {"config": dataclasses.asdict(config), "class_names": list(class_names),
               "format": RUN_FORMAT}
    files.write_json_atomically(os.path.join(model_dir, RUN_FILE), payload)


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
    if run_format < RUN_FORMAT and checkpoints.checkpoints_on_disk(model_dir):
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

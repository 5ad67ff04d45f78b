"""The files of a run directory besides its checkpoints: run.json,
best/metrics.json and evaluated.json (docs/reliability.md, Training runs and
checkpoints).
"""

import dataclasses
import json
import os

from absl import logging
import tensorflow as tf

from mlcrl_tf.run_dir import config as config_lib
from pipelines.utils import files

RUN_FILE = "run.json"
# run.json "format": 2 = trained with PaperSGD (PyTorch's momentum rule). Runs
# without it used Keras SGD, whose momentum slots mean something else: their
# checkpoints evaluate and export, but training cannot resume from them.
RUN_FORMAT = 2
BEST_DIR = "best"
BEST_METRICS_FILE = "metrics.json"
EVALUATED_FILE = "evaluated.json"


class RunDirError(RuntimeError):
    """A file of a run directory could not be written; the message names the
    file and the cause (a full disk, a read-only or unwritable directory)."""


def write_json(path, payload):
    """Writes a run file as strict JSON, whole or not at all.

    Raises:
        RunDirError: naming `path` and why it could not be written.
    """
    try:
        files.write_json_atomically(path, payload)
    except files.IO_ERRORS as e:
        raise RunDirError(f"could not write {path} ({files.error_text(e)})") from None


def write_run(model_dir, config, class_names):
    """Writes run.json (atomically) so evaluate/export can rebuild the model.

    Raises:
        RunDirError: it could not be written.
    """
    payload = {"config": dataclasses.asdict(config), "class_names": list(class_names),
               "format": RUN_FORMAT}
    write_json(os.path.join(model_dir, RUN_FILE), payload)


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



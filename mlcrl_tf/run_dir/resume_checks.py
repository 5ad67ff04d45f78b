"""What a resumed run must keep: the network, its preprocessing and its label
map; and no checkpoints of an optimizer it cannot continue
(docs/reliability.md, Training runs and checkpoints).
"""

import json
import os

import tensorflow as tf

from mlcrl_tf.run_dir import checkpoints
from mlcrl_tf.run_dir import run_files
from pipelines.records import label_maps

# Fields that define the network: a resumed run must agree on them.
MODEL_FIELDS = ("backbone", "variant", "image_size", "num_classes")
# A resumed run must also keep its preprocessing (evaluate/export follow run.json).
RESUME_FIELDS = MODEL_FIELDS + ("antialias",)


def check_resumable(model_dir, config, class_names):
    """Raises ValueError if training cannot resume the run in `model_dir`.

    A run.json of another network or preprocessing, another label map (the
    same classes in another order would train every output on another
    class), or checkpoints of a run trained with the old (Keras SGD)
    optimizer state are refused with a message saying what to do; nothing is
    written. A model_dir without run.json is a new run.

    Args:
        model_dir: the run's directory.
        config: the Config of the run about to start.
        class_names: the class names of its training data.
    """
    path = os.path.join(model_dir, run_files.RUN_FILE)
    if not tf.io.gfile.exists(path):
        return
    saved, saved_names = run_files.read_run(model_dir)
    check_resume_compatible(saved, config)
    label_maps.check_same_classes(
        class_names, saved_names, f"--train_files={config.train_files!r}", path,
        consequence="resuming would train every output on another class's labels",
        advice="Resume on shards of the run's label map, or use a new --model_dir "
               "(nothing was written).")
    with tf.io.gfile.GFile(path) as f:
        run_format = json.load(f).get("format", 1)
    if run_format < run_files.RUN_FORMAT and checkpoints.checkpoints_on_disk(model_dir):
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

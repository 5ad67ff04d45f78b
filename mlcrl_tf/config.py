"""Training configuration: the absl flags and the frozen `Config` built from them.

This is the only module that reads the training FLAGS (`config_from_flags`);
everything below it takes a `Config`. Defaults are the paper's recipe
(SPEC §4); `configs/base.flags` spells them out and the dataset flagfiles
include it.
"""

import dataclasses
import json
import os

from absl import flags

from mlcrl_tf.backbones import BACKBONES
from mlcrl_tf.model import VARIANTS

STRATEGIES = ("default", "mirrored", "multi_worker")

def define_flags(flag_values=flags.FLAGS):
    """Defines the training flags (called once by `mlcrl_tf.train`)."""
    # --- data ---
    flags.DEFINE_string("model_dir", None, "Where checkpoints, TensorBoard events and "
                        "config.json go. A rerun with the same model_dir resumes.",
        flag_values=flag_values)
    flags.DEFINE_string("train_files", None, "Glob of training TFRecord shards, "
                        "e.g. data/coco/train2014-*.tfrecord.",
        flag_values=flag_values)
    flags.DEFINE_string("eval_files", None, "Glob of evaluation TFRecord shards.",
        flag_values=flag_values)
    flags.DEFINE_string("labels_file", None, "Class names, one per line; default: "
                        "labels.txt beside the training shards.",
        flag_values=flag_values)
    flags.DEFINE_integer("num_classes", 0, "Number of classes; 0 = the number of lines "
                         "of the labels file.",
        flag_values=flag_values)
    flags.DEFINE_integer("shuffle_buffer", 2048, "Training shuffle buffer (records).",
        flag_values=flag_values)
    flags.DEFINE_bool("random_flip", False, "Random horizontal flips (off in the paper).",
        flag_values=flag_values)
    flags.DEFINE_list("crop_scales", [], "Multi-scale random crop scales, e.g. "
                      "1.0,0.875,0.75 (off in the paper).",
        flag_values=flag_values)
    # --- model ---
    flags.DEFINE_enum("backbone", "resnet101", list(BACKBONES),
                      "Feature extractor f_cnn.",
        flag_values=flag_values)
    flags.DEFINE_string("backbone_weights", None, "None, 'imagenet' or a local weights file.",
        flag_values=flag_values)
    flags.DEFINE_enum("variant", "crl", list(VARIANTS),
                      "Model variant (SPEC §3).",
        flag_values=flag_values)
    flags.DEFINE_integer("image_size", 448, "Square input size.",
        flag_values=flag_values)
    # --- optimisation ---
    flags.DEFINE_integer("batch_size", 16, "Global batch size (all replicas).",
        flag_values=flag_values)
    flags.DEFINE_integer("epochs", 20, "Training epochs.",
        flag_values=flag_values)
    flags.DEFINE_integer("steps_per_epoch", 0, "Cap on steps per epoch; 0 = one pass "
                         "over the training set.",
        flag_values=flag_values)
    flags.DEFINE_float("learning_rate", 0.01, "Learning rate of every non-backbone layer.",
        flag_values=flag_values)
    flags.DEFINE_float("backbone_learning_rate", 0.001, "Learning rate of the backbone.",
        flag_values=flag_values)
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.",
        flag_values=flag_values)
    flags.DEFINE_float("weight_decay", 1e-4, "L2 weight decay (PyTorch SGD semantics).",
        flag_values=flag_values)
    flags.DEFINE_list("lr_decay_epochs", [], "Epochs after which both learning rates "
                      "are multiplied by lr_decay_factor (step decay).",
        flag_values=flag_values)
    flags.DEFINE_float("lr_decay_factor", 0.1, "Step decay factor.",
        flag_values=flag_values)
    flags.DEFINE_float("ema_decay", 0.0, "EMA of weights for eval/export; 0 = off.",
        flag_values=flag_values)
    # --- losses ---
    flags.DEFINE_float("cls_weight", 1.0, "alpha of Eq. 10 (classification loss).",
        flag_values=flag_values)
    flags.DEFINE_float("aux_weight", 1.0, "beta of Eq. 10 (CRL or MSE loss).",
        flag_values=flag_values)
    flags.DEFINE_float("crl_margin", 0.5, "CRL margin delta.",
        flag_values=flag_values)
    flags.DEFINE_float("crl_image_weight", 0.5, "CRL lambda_1 (image term).",
        flag_values=flag_values)
    flags.DEFINE_float("crl_label_weight", 0.5, "CRL lambda_2 (label term).",
        flag_values=flag_values)
    flags.DEFINE_enum("crl_reduction", "mean", ["mean", "sum"],
                      "Mean over valid triplets (default) or the paper's plain sums.",
        flag_values=flag_values)
    # --- runtime ---
    flags.DEFINE_enum("strategy", "default", list(STRATEGIES),
                      "default (one device), mirrored (all local GPUs) or multi_worker "
                      "(from TF_CONFIG).",
        flag_values=flag_values)
    flags.DEFINE_integer("num_cpu_devices", 0, "Split the CPU into this many logical "
                         "devices (tests of multi-replica runs without GPUs); 0 = off.",
        flag_values=flag_values)
    flags.DEFINE_bool("mixed_precision", False, "mixed_float16 with dynamic loss scaling.",
        flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed for initialisation and data order.",
        flag_values=flag_values)
    flags.DEFINE_bool("deterministic", False, "Enable TF op determinism (slower); with "
                      "the seed, a run is bit-reproducible, also across a resume.",
        flag_values=flag_values)
    flags.DEFINE_integer("checkpoint_every_steps", 500, "Checkpoint period (also at each "
                         "epoch end).",
        flag_values=flag_values)
    flags.DEFINE_integer("keep_checkpoints", 3, "Latest checkpoints kept.",
        flag_values=flag_values)
    flags.DEFINE_integer("log_every_steps", 50, "Progress line and TensorBoard period.",
        flag_values=flag_values)
    flags.DEFINE_integer("eval_steps", 0, "Cap on evaluation batches; 0 = all.",
        flag_values=flag_values)
    flags.DEFINE_integer("num_summary_images", 4, "Eval images with predictions and "
                         "CAMs logged to TensorBoard per epoch.",
        flag_values=flag_values)
    flags.DEFINE_string("export_dir", None, "Export the inference model here at the end "
                        "(TF Serving layout <export_dir>/<version>/); empty = no export.",
        flag_values=flag_values)
    flags.DEFINE_float("threshold", 0.5, "Probability threshold of the metrics and export.",
        flag_values=flag_values)

    flags.mark_flags_as_required(["model_dir", "train_files"], flag_values=flag_values)



@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs; see the flag help for each field."""

    model_dir: str
    train_files: str
    eval_files: str | None = None
    labels_file: str | None = None
    num_classes: int = 0
    shuffle_buffer: int = 2048
    random_flip: bool = False
    crop_scales: tuple = ()
    backbone: str = "resnet101"
    backbone_weights: str | None = None
    variant: str = "crl"
    image_size: int = 448
    batch_size: int = 16
    epochs: int = 20
    steps_per_epoch: int = 0
    learning_rate: float = 0.01
    backbone_learning_rate: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_decay_epochs: tuple = ()
    lr_decay_factor: float = 0.1
    ema_decay: float = 0.0
    cls_weight: float = 1.0
    aux_weight: float = 1.0
    crl_margin: float = 0.5
    crl_image_weight: float = 0.5
    crl_label_weight: float = 0.5
    crl_reduction: str = "mean"
    strategy: str = "default"
    num_cpu_devices: int = 0
    mixed_precision: bool = False
    seed: int = 0
    deterministic: bool = False
    checkpoint_every_steps: int = 500
    keep_checkpoints: int = 3
    log_every_steps: int = 50
    eval_steps: int = 0
    num_summary_images: int = 4
    export_dir: str | None = None
    threshold: float = 0.5

    def replace(self, **changes):
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def config_from_flags(flag_values=flags.FLAGS):
    """Builds the `Config` from parsed absl flags (the only FLAGS reader)."""
    values = {}
    for field in dataclasses.fields(Config):
        value = flag_values[field.name].value
        if field.name == "crop_scales":
            value = tuple(float(s) for s in value)
        elif field.name == "lr_decay_epochs":
            value = tuple(int(s) for s in value)
        values[field.name] = value
    if values["backbone_weights"] in ("", "none", "None"):
        values["backbone_weights"] = None
    if not values["export_dir"]:
        values["export_dir"] = None
    return Config(**values)


def validate(config):
    """Checks values that flags alone cannot; raises ValueError naming the flag."""
    positive = ("image_size", "batch_size", "epochs", "checkpoint_every_steps",
                "keep_checkpoints", "log_every_steps")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(config, name)}.")
    for name in ("steps_per_epoch", "eval_steps", "num_classes", "weight_decay",
                 "num_summary_images", "num_cpu_devices"):
        if getattr(config, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(config, name)}.")
    for name in ("learning_rate", "backbone_learning_rate"):
        if not getattr(config, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(config, name)}.")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1), got {config.ema_decay}.")
    if not 0.0 < config.threshold < 1.0:
        raise ValueError(f"--threshold must be in (0, 1), got {config.threshold}.")
    if config.variant not in VARIANTS:
        raise ValueError(f"--variant={config.variant!r} is unknown; choose one of "
                         f"{', '.join(VARIANTS)}.")
    if config.backbone not in BACKBONES:
        raise ValueError(f"--backbone={config.backbone!r} is unknown; choose one of "
                         f"{', '.join(BACKBONES)}.")
    if config.strategy not in STRATEGIES:
        raise ValueError(f"--strategy={config.strategy!r} is unknown; choose one of "
                         f"{', '.join(STRATEGIES)}.")
    if any(not 0.0 < s <= 1.0 for s in config.crop_scales):
        raise ValueError(f"--crop_scales must be in (0, 1], got {config.crop_scales}.")
    if config.model_dir and os.path.exists(config.model_dir) and not os.path.isdir(
            config.model_dir):
        raise ValueError(f"--model_dir={config.model_dir!r} exists and is not a directory.")

"""`Config`: every setting of a training run, one field per training flag.

`run.json` stores it; its defaults are the paper's recipe (docs/design.md,
Training). `validate` checks what flags alone cannot, before any work.
"""

import dataclasses
import os

from mlcrl_tf.modeling import backbones
from mlcrl_tf.modeling import hardware
from mlcrl_tf.modeling import losses
from mlcrl_tf.modeling import precision as precision_lib
from mlcrl_tf.modeling.backbones import BACKBONES
from mlcrl_tf.modeling.model import VARIANTS
from mlcrl_tf.run_dir import run_lock

STRATEGIES = ("default", "mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def _field(default, help_text, choices=None, element=None):
    """A Config field that is also a flag: default and help live here only."""
    return dataclasses.field(default=default, metadata={
        "help": help_text, "choices": choices, "element": element})


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs; each field is the training flag of
    that name, with its default and help (`train_flags.define_flags`).

    Frozen; `replace` gives a changed copy and `validate` checks one.

    Example:
    >>> config = Config(model_dir="runs/demo", train_files="data/train-*.tfrecord")
    >>> config.replace(epochs=2, lr_decay_epochs=(1,)).epochs, config.epochs
    (2, 40)
    """

    # --- data ---
    model_dir: str = _field(None, "Where checkpoints, TensorBoard events and run.json "
                            "go. A rerun with the same model_dir resumes.")
    train_files: str = _field(None, "Glob of training TFRecord shards, e.g. "
                              "data/coco/train2014-*.tfrecord.")
    eval_files: str | None = _field(None, "Glob of evaluation TFRecord shards, evaluated "
                                    "after every epoch. Unless --selection_files is given, "
                                    "best/ is chosen by mAP on these files, which for "
                                    "COCO/VOC are the split the paper reports on.")
    selection_files: str | None = _field(None, "Glob of held-out shards (e.g. a few "
                                         "training shards left out of --train_files) on "
                                         "which best/ is chosen instead of --eval_files, "
                                         "so that the reported test metrics are not "
                                         "selected on the test set.")
    labels_file: str | None = _field(None, "Class names, one per line; default: "
                                     "labels.txt beside the training shards.")
    data_dir: str | None = _field(None, "TensorFlow Datasets data directory for "
                                  "tfds:NAME:SPLIT sources (default TFDS's own).")
    tfds_download: bool = _field(False, "Download and prepare a tfds: source that is "
                                 "not prepared yet (otherwise: an error naming the "
                                 "command that prepares it).")
    num_classes: int = _field(0, "Number of classes; 0 = the number of lines of the "
                              "labels file.")
    shuffle_buffer: int = _field(2048, "Training shuffle buffer (records).")
    random_flip: bool = _field(False, "Random horizontal flips (off in the paper).")
    crop_scales: tuple = _field((), "Multi-scale random crop scales, e.g. "
                                "1.0,0.875,0.75 (off in the paper).", element=float)
    max_image_pixels: int = _field(100_000_000, "Pixel budget of one image (width x "
                                   "height, x frames for a GIF), read from its header "
                                   "before decoding: a larger image is skipped undecoded "
                                   "(a decompression bomb cannot exhaust memory).")
    antialias: bool = _field(False, "Antialiased (PIL-like) bilinear resizing, as the "
                             "paper's PyTorch preprocessing; about 3x slower input on "
                             "640x480 photos (docs/performance.md). Stored with the run: "
                             "evaluation and export use the run's setting.")
    # --- model ---
    backbone: str = _field("resnet101", "Feature extractor f_cnn: "
                           f"{', '.join(BACKBONES)} or keras_hub:<preset> (e.g. "
                           "keras_hub:resnet_101_imagenet).")
    backbone_weights: str | None = _field("imagenet", "'imagenet', a local weights file, "
                                          "or empty (or 'random') for random "
                                          "initialisation.")
    variant: str = _field("crl", "Model variant (docs/design.md, Model).", choices=VARIANTS)
    image_size: int = _field(448, "Square input size.")
    # --- optimisation ---
    batch_size: int = _field(16, "Global batch size (all replicas).")
    epochs: int = _field(40, "Training epochs.")
    steps_per_epoch: int = _field(0, "Cap on steps per epoch; 0 = one pass over the "
                                  "training set.")
    learning_rate: float = _field(0.01, "Learning rate of every non-backbone layer.")
    backbone_learning_rate: float = _field(0.001, "Learning rate of the backbone.")
    momentum: float = _field(0.9, "SGD momentum.")
    weight_decay: float = _field(1e-4, "L2 weight decay (PyTorch SGD semantics).")
    lr_decay_epochs: tuple = _field((30,), "Epochs after which both learning rates are "
                                    "multiplied by lr_decay_factor (step decay); each "
                                    "in [1, epochs); empty = no decay.", element=int)
    lr_decay_factor: float = _field(0.1, "Step decay factor.")
    ema_decay: float = _field(0.0, "EMA of weights for eval/export; 0 = off.")
    # --- losses ---
    cls_weight: float = _field(1.0, "alpha of Eq. 10 (classification loss).")
    aux_weight: float = _field(1.0, "beta of Eq. 10 (CRL or MSE loss).")
    crl_margin: float = _field(0.5, "CRL margin delta.")
    crl_image_weight: float = _field(0.5, "CRL lambda_1 (image term).")
    crl_label_weight: float = _field(0.5, "CRL lambda_2 (label term).")
    crl_reduction: str = _field("mean", "Mean over valid triplets (default) or the "
                                "paper's plain sums.", choices=losses.TRIPLET_REDUCTIONS)
    # --- runtime ---
    strategy: str = _field("default", "default (one device), mirrored (all local GPUs) "
                           "or multi_worker (from TF_CONFIG).", choices=STRATEGIES)
    num_cpu_devices: int = _field(0, "Split the CPU into this many logical devices "
                                  "(tests of multi-replica runs without GPUs); 0 = off.")
    precision: str = _field("float32", "Compute precision of training: float32, "
                            "mixed_float16 (dynamic loss scaling; NVIDIA GPUs) or "
                            "mixed_bfloat16 (no loss scaling; only where the chip computes "
                            "bfloat16: 1.4-1.5x faster than float32 on an Intel Xeon with "
                            "AMX-BF16, 7-13x SLOWER on an AVX2-only AMD EPYC, which "
                            "gets a warning; GPUs of compute capability >= 8.0, TPUs). "
                            "Variables, losses, CRL and metrics stay float32.",
                            choices=PRECISIONS)
    mixed_precision: bool = _field(False, "Deprecated spelling of "
                                   "--precision=mixed_float16.")
    onednn: str = _field("auto", "TensorFlow's oneDNN CPU kernels: auto = on on Linux "
                         "x86-64 CPUs where TensorFlow 2.21 leaves them off (those without "
                         "AVX-512 VNNI/BF16 or AMX; a crl step took 3.80 s instead of 4.53 s "
                         "on an AVX2-only AMD EPYC), TensorFlow's default elsewhere; on; "
                         "off. Read by `python -m mlcrl_tf.train` from its command line "
                         "(flagfiles included) before TensorFlow loads; a "
                         "TF_ENABLE_ONEDNN_OPTS in the environment wins.",
                         choices=hardware.ONEDNN_SETTINGS)
    jit_compile: bool = _field(False, "Compile the training step with XLA "
                               "(docs/performance.md has the measured ratio).")
    seed: int = _field(0, "Seed for initialisation and data order.")
    deterministic: bool = _field(False, "Enable TF op determinism (slower); with the "
                                 "seed, a run is bit-reproducible, also across a resume.")
    checkpoint_every_steps: int = _field(500, "Checkpoint period (also at each epoch "
                                         "end).")
    keep_checkpoints: int = _field(3, "Latest checkpoints kept.")
    lock_timeout_secs: int = _field(run_lock.LOCK_STALE_AFTER_SECS,
                                    "A model_dir lock whose heartbeat is older than "
                                    "this is stale (its run died on another host) and is "
                                    "broken; the holder refreshes it every tenth of it.")
    log_every_steps: int = _field(50, "Progress line and TensorBoard period.")
    eval_steps: int = _field(0, "Cap on evaluation batches; 0 = all.")
    num_summary_images: int = _field(4, "Eval images with predictions and CAMs logged "
                                     "to TensorBoard per epoch (0 = none).")
    export_dir: str | None = _field(None, "Export the inference model here at the end "
                                    "(TF Serving layout <export_dir>/<version>/); empty "
                                    "= no export.")
    threshold: float = _field(0.5, "Probability threshold of the metrics and export.")

    def replace(self, **changes):
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


REQUIRED_FLAGS = ("model_dir", "train_files")


def validate(config):
    """Checks values that flags alone cannot; raises ValueError naming the flag.

    Everything is checked before any work starts (no data is read here).
    """
    _validate_ranges(config)
    _validate_schedule(config)
    _validate_names(config)
    if config.model_dir and os.path.exists(config.model_dir) and not os.path.isdir(
            config.model_dir):
        raise ValueError(f"--model_dir={config.model_dir!r} exists and is not a directory.")


def _validate_ranges(config):
    for name in REQUIRED_FLAGS:
        if not getattr(config, name):
            raise ValueError(f"--{name} is required.")
    positive = ("image_size", "batch_size", "epochs", "checkpoint_every_steps",
                "keep_checkpoints", "log_every_steps", "lock_timeout_secs",
                "max_image_pixels")
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
    if not 0.0 <= config.momentum < 1.0:
        raise ValueError(f"--momentum must be in [0, 1), got {config.momentum}.")
    for name in ("crl_margin", "cls_weight", "aux_weight", "crl_image_weight",
                 "crl_label_weight"):
        if not getattr(config, name) >= 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(config, name)}.")
    if any(not 0.0 < s <= 1.0 for s in config.crop_scales):
        raise ValueError(f"--crop_scales must be in (0, 1], got {config.crop_scales}.")
    if config.mixed_precision and config.precision not in ("float32", "mixed_float16"):
        raise ValueError(f"--mixed_precision (= mixed_float16) contradicts "
                         f"--precision={config.precision}; give --precision only.")
    if config.precision not in PRECISIONS:
        raise ValueError(f"--precision={config.precision!r} is unknown; choose one of "
                         f"{', '.join(PRECISIONS)}.")


def compute_policy(config):
    """The Keras dtype policy of a run ("float32", "mixed_float16", ...)."""
    return "mixed_float16" if config.mixed_precision else config.precision


def _validate_schedule(config):
    if not 0.0 < config.lr_decay_factor <= 1.0:
        raise ValueError(f"--lr_decay_factor must be in (0, 1], got "
                         f"{config.lr_decay_factor}.")
    decay = config.lr_decay_epochs
    if len(set(decay)) != len(decay):
        raise ValueError(f"--lr_decay_epochs lists an epoch twice: {list(decay)}.")
    for epoch in decay:
        if not 1 <= epoch < config.epochs:
            raise ValueError(
                f"--lr_decay_epochs={','.join(map(str, decay))}: every decay epoch must be "
                f"in [1, --epochs) = [1, {config.epochs}); {epoch} is not (a decay at or "
                "after the last epoch never happens). Set --lr_decay_epochs to fit "
                "--epochs, or empty for no decay.")


def _validate_names(config):
    if config.variant not in VARIANTS:
        raise ValueError(f"--variant={config.variant!r} is unknown; choose one of "
                         f"{', '.join(VARIANTS)}.")
    try:
        backbones.check_backbone_name(config.backbone)
    except ValueError as e:
        raise ValueError(f"--{e}") from None
    if config.onednn not in hardware.ONEDNN_SETTINGS:
        raise ValueError(f"--onednn={config.onednn!r} is unknown; choose one of "
                         f"{', '.join(hardware.ONEDNN_SETTINGS)}.")
    if config.strategy not in STRATEGIES:
        raise ValueError(f"--strategy={config.strategy!r} is unknown; choose one of "
                         f"{', '.join(STRATEGIES)}.")


def warnings_for(config):
    """Legal but probably unintended settings, as one message each.

    Returns:
        A list of warning strings (empty when the setting is the recipe's).
    """
    messages = []
    if (config.backbone in backbones.IMAGENET_BACKBONES
            and config.backbone_weights in backbones.RANDOM_WEIGHTS
            and config.backbone_learning_rate < config.learning_rate):
        messages.append(
            f"--backbone={config.backbone} is trained from random initialisation "
            f"(--backbone_weights is empty) with a backbone learning rate "
            f"({config.backbone_learning_rate:g}) "
            f"{config.learning_rate / config.backbone_learning_rate:g}x smaller than "
            f"the head's ({config.learning_rate:g}): the paper's two rates "
            "assume an ImageNet-pretrained backbone. Use --backbone_weights=imagenet "
            "(or a file), or give the backbone the head's rate.")
    if compute_policy(config) == "mixed_bfloat16":
        problem = precision_lib.native_bfloat16_problem()
        if problem:
            messages.append(f"--precision=mixed_bfloat16 on {problem}: "
                            f"{precision_lib.SLOW_BFLOAT16_TRAINING}; use "
                            "--precision=float32 on this machine.")
    onednn = hardware.onednn_warning(config.onednn, os.environ)
    if onednn:
        messages.append(onednn)
    return messages

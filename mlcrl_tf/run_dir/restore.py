"""Rebuilding a run's model from run.json and restoring its (EMA) weights,
for evaluation, export and CAMs.
"""

from absl import logging
import tensorflow as tf

from mlcrl_tf.modeling import model as model_lib
from mlcrl_tf.modeling import optim
from mlcrl_tf.modeling import precision as precision_lib
from mlcrl_tf.run_dir import checkpoints
from mlcrl_tf.run_dir import run_files
from pipelines.utils import files

# Attempts to read the latest checkpoint while a training run rotates them.
_ROTATION_RETRIES = 3


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


def _restore_newest(checkpoint_object, model_dir, checkpoint, best):
    """Restores the checkpoint `resolve_checkpoint` names; returns (path, status).

    A training run may rotate its checkpoints meanwhile: when the latest
    checkpoint's files are gone by the time they are read, the newest one
    is resolved again (an explicit `checkpoint` is not replaced).

    Raises:
        ValueError: the checkpoint cannot be read (named).
    """
    for attempt in range(_ROTATION_RETRIES):
        path = checkpoints.resolve_checkpoint(model_dir, checkpoint, best)
        try:
            return path, checkpoint_object.restore(path)
        except checkpoints.UNREADABLE as e:
            rotated = not tf.io.gfile.glob(path + ".index")
            if checkpoint is None and rotated and attempt + 1 < _ROTATION_RETRIES:
                logging.warning("%s was deleted while it was read (the training run "
                                "rotated its checkpoints); taking the newest one now.", path)
                continue
            raise ValueError(
                f"checkpoint {path!r} cannot be read "
                f"({type(e).__name__}: {files.error_text(e)}); "
                + ("its files were deleted while they were read. " if rotated else
                   "it is truncated, corrupt or incomplete. ")
                + "Choose another one with --checkpoint=<prefix> (or resume training, "
                "which sets it aside).") from None
    return None  # not reached: the last attempt returns or raises


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
    config, class_names = run_files.read_run(model_dir)
    with precision_lib.dtype_policy(precision):
        model = build_model_for(config)
    objects = {"model": model}
    ema = None
    if use_ema and config.ema_decay > 0:
        ema = optim.ExponentialMovingAverage(model.trainable_variables, config.ema_decay)
        objects["ema"] = ema
    path, status = _restore_newest(tf.train.Checkpoint(**objects), model_dir, checkpoint,
                                   best)
    # Every variable of the rebuilt model must come from the checkpoint (the
    # optimizer state in it is not needed here).
    try:
        status.assert_existing_objects_matched().expect_partial()
    except AssertionError as e:
        raise ValueError(
            f"checkpoint {path!r} does not hold the model described by {model_dir!r}/"
            f"{run_files.RUN_FILE} ({config.variant}/{config.backbone}, "
            f"{config.num_classes} classes"
            f"{', EMA' if ema is not None else ''}): {files.error_text(e)[:300]}. Is it "
            "a checkpoint of another run? (--use_ema=false loads a run without its EMA.)"
        ) from None
    if ema is not None:
        ema.copy_to_model()
    return model, config, class_names, path

"""`train_and_evaluate`: a whole training run, from a Config to the export."""

from absl import logging
import keras
import tensorflow as tf

from mlcrl_tf.modeling import backbones
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import resume_checks
from mlcrl_tf.run_dir import run_lock
from mlcrl_tf.serving import export_lib
from mlcrl_tf.training import data as data_lib
from mlcrl_tf.training import distribute
from mlcrl_tf.training import trainer as trainer_lib
from pipelines.utils import output_checks


def train_and_evaluate(config):
    """Runs a whole training run described by `config`; see the module doc.

    Returns:
        dict with `model_dir`, `step`, `metrics` (last eval or None),
        `export_path` (or None) and `fingerprint`.

    Raises:
        ValueError: bad flags or data (message names the flag), an unwritable
            --model_dir or --export_dir, a --model_dir in use by another run,
            a keras_hub: backbone without keras-hub installed.
        NonFiniteLossError: the loss diverged.
        checkpoints.CheckpointError: a checkpoint could not be saved (e.g. a
            full disk), none of the run's checkpoints loads, or the lock was lost.
    """
    config_lib.validate(config)
    backbones.check_backbone_available(config.backbone)  # before reading any data
    for message in config_lib.warnings_for(config):
        logging.warning("%s", message)
    strategy = distribute.make_strategy(config.strategy, config.num_cpu_devices)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    config, class_names, num_records = data_lib.resolve_data(config)
    chief = distribute.is_chief(strategy)
    if config.backbone_weights == "imagenet" and not trainer_lib.resuming(config):
        backbones.fetch_imagenet_weights(config.backbone)  # before anything is created
    output_checks.ensure_output_dir(config.model_dir, "model_dir")
    if config.export_dir and chief:  # checked before the first step, not after the last
        output_checks.ensure_output_dir(config.export_dir, "export_dir")
    with run_lock.run_lock(config.model_dir, chief, config.lock_timeout_secs):
        # A resumed run must be the same network (run.json is rewritten by
        # Trainer.train once its checkpoint has loaded).
        resume_checks.check_resumable(config.model_dir, config, class_names)
        return _train_and_export(config, class_names, strategy, num_records)


def _train_and_export(config, class_names, strategy, num_records):
    """Trains, exports (chief); returns train_and_evaluate's dict."""
    trainer = trainer_lib.Trainer(config, class_names, strategy, num_records)
    logging.info("Training %s/%s on %d records, %d steps/epoch x %d epochs, %d replicas.",
                 config.variant, config.backbone, num_records, trainer.steps_per_epoch,
                 config.epochs, strategy.num_replicas_in_sync)
    result = trainer.train()
    export_path = None
    if config.export_dir and trainer.is_chief:
        # From the final checkpoint, rebuilt in float32 (whatever the training
        # precision), with the EMA weights if the run kept them.
        export_path = export_lib.export_from_model_dir(config.model_dir,
                                                       config.export_dir)
    return {"model_dir": config.model_dir, "step": int(trainer.step.numpy()),
            "metrics": result.metrics if result else None, "export_path": export_path,
            "fingerprint": trainer.weights_fingerprint()}

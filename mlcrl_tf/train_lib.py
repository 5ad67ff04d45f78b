"""The training loop: one loop for every `tf.distribute` strategy.

`train_and_evaluate(config)` runs the whole recipe: it resolves the data,
builds the model in the strategy's scope, resumes from the latest checkpoint
in `model_dir`, trains with `strategy.run` of a `tf.function` step, evaluates
every epoch with `mlcrl_tf.metrics`, keeps the best-by-mAP checkpoint, writes
TensorBoard summaries and finally exports the inference model.

Decisions (see docs/design.md):
- The optimizer is PyTorch's SGD rule exactly (`mlcrl_tf.optim.PaperSGD`):
  coupled weight decay, a momentum buffer in gradient units, the backbone's
  rate as a per-variable multiplier of the (step-decayed) head rate. One
  optimizer keeps one iteration counter, one schedule and one loss scale.
- The step is the model's own `train_step` (the one `model.fit()` runs), on
  the model's own objective (`losses.Objective`): each replica's
  classification and MSE loss is its sum divided by the GLOBAL batch and the
  CRL triplet counts are all-reduced, so the gradients the optimizer sums
  across replicas are exactly one device's on the same global batch.
- Resume: each epoch's data order is a function of (seed, epoch); a resumed
  run skips the records of the steps it already did in the current epoch, so
  with --deterministic it ends bit-identical to an uninterrupted run.
"""

import json
import math
import os
import shutil

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from mlcrl_tf import checkpoints
from mlcrl_tf import config as config_lib
from mlcrl_tf import evaluate as evaluate_lib
from mlcrl_tf import export as export_lib
from mlcrl_tf import losses
from mlcrl_tf import optim
from mlcrl_tf import progress as progress_lib
from mlcrl_tf import summaries
from pipelines import input_pipeline
from pipelines import tfrecord_lib


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


# ---------------------------------------------------------------------------
# Set-up: devices, strategy, data.
# ---------------------------------------------------------------------------

def split_cpu(num_devices):
    """Makes `num_devices` logical CPU devices (before TF initialises)."""
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)


def make_strategy(config):
    """The tf.distribute strategy named by --strategy.

    Raises:
        ValueError: multi_worker without TF_CONFIG.
    """
    if config.num_cpu_devices > 1:
        split_cpu(config.num_cpu_devices)
    if config.strategy == "default":
        return tf.distribute.get_strategy()
    if config.strategy == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        # NCCL needs GPUs: reduce on the host instead.
        return tf.distribute.MirroredStrategy(
            devices=devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
    if "TF_CONFIG" not in os.environ:
        raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment "
                         "variable describing the cluster (see README).")
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy):
    """True on the worker that writes checkpoints, summaries and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    cluster = resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def resolve_data(config):
    """Checks the data flags; fills num_classes; finds class names and sizes.

    Returns:
        (config with num_classes set, class_names, number of training records)

    Raises:
        ValueError: missing/empty/incomplete shards, a labels file that
            disagrees with --num_classes, or neither of them.
    """
    train_files = _find_shards(config.train_files, "train_files")
    if config.eval_files:
        _find_shards(config.eval_files, "eval_files")
    if config.selection_files:
        held_out = _find_shards(config.selection_files, "selection_files")
        shared = sorted(set(map(os.path.realpath, held_out))
                        & set(map(os.path.realpath, train_files)))
        if shared:
            raise ValueError(
                f"--selection_files={config.selection_files!r} shares {len(shared)} file(s) "
                f"with --train_files (e.g. {shared[0]}): selection data must be held out "
                "of training.")
    labels_file = config.labels_file or os.path.join(
        os.path.dirname(train_files[0]), tfrecord_lib.LABELS_FILENAME)
    class_names = None
    if tf.io.gfile.exists(labels_file):
        class_names = tfrecord_lib.read_class_names(labels_file)
    elif config.labels_file:
        raise ValueError(f"--labels_file={config.labels_file!r} does not exist.")
    num_classes = config.num_classes
    if num_classes == 0:
        if class_names is None:
            raise ValueError(f"--num_classes is 0 and there is no labels file at "
                             f"{labels_file!r}: give --num_classes or --labels_file.")
        num_classes = len(class_names)
    elif class_names is not None and num_classes != len(class_names):
        raise ValueError(f"--num_classes={num_classes} disagrees with the data's "
                         f"label map {labels_file!r} ({len(class_names)} classes).")
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    return (config.replace(num_classes=num_classes), class_names,
            count_records(train_files))


def _find_shards(pattern, flag):
    if not pattern:
        raise ValueError(f"--{flag} is empty: give a glob of TFRecord shards.")
    try:
        return tfrecord_lib.find_shards(pattern)
    except ValueError as e:
        raise ValueError(f"--{flag}={pattern!r}: {e}") from None


def count_records(files):
    """Records in the shards: from the converters' reports, else by reading."""
    by_split = {}
    for path in files:
        name = os.path.basename(path)
        split = name.split("-")[0] if "-" in name else None
        by_split.setdefault((os.path.dirname(path), split), []).append(path)
    total = 0
    for (directory, split), paths in by_split.items():
        report = tfrecord_lib.report_path(directory, split) if split else None
        if report and tf.io.gfile.exists(report):
            with tf.io.gfile.GFile(report) as f:
                total += int(json.load(f)["num_records"])
        else:
            total += int(tf.data.TFRecordDataset(paths).reduce(
                np.int64(0), lambda n, _: n + 1).numpy())
    return total


# ---------------------------------------------------------------------------
# The trainer.
# ---------------------------------------------------------------------------

class Trainer:
    """Owns the model, optimizer, checkpoints and summaries of one run.

    Args:
        config: a validated `Config` with num_classes set.
        class_names: list of C names.
        strategy: a `tf.distribute.Strategy`.
        num_train_records: size of the training set.
    """

    def __init__(self, config, class_names, strategy, num_train_records):
        self.config = config
        self.class_names = list(class_names)
        self.strategy = strategy
        self.is_chief = is_chief(strategy)
        self.steps_per_epoch = config.steps_per_epoch or max(
            1, num_train_records // config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        with strategy.scope():
            self.model = checkpoints.build_model_for(config, config.backbone_weights)
            self.optimizer = optim.make_optimizer(
                self.model, config.learning_rate, config.backbone_learning_rate,
                momentum=config.momentum, weight_decay=config.weight_decay,
                decay_boundaries=self.decay_boundaries(), decay_factor=config.lr_decay_factor,
                loss_scaling=config.mixed_precision)
            self.model.compile(optimizer=self.optimizer, objective=objective_from(config))
            self.step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="global_step",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.ema = (checkpoints.ExponentialMovingAverage(
                self.model.trainable_variables, config.ema_decay)
                if config.ema_decay > 0 else None)
        self._lr_ratio = config.backbone_learning_rate / config.learning_rate
        self._setup_checkpoints()
        self._setup_summaries()
        self.train_step = tf.function(self._distributed_step)

    # --- optimisation -------------------------------------------------------

    def decay_boundaries(self):
        """Steps at which both learning rates are multiplied by the decay factor.

        Always a schedule of the step, never a plain float: a float would be
        an optimizer variable restored from the checkpoint, so a resumed run
        could not change --learning_rate.
        """
        return [int(e) * self.steps_per_epoch for e in sorted(self.config.lr_decay_epochs)]

    def current_learning_rates(self):
        """(head, backbone) learning rates at the current step."""
        head = float(keras.ops.convert_to_numpy(
            optim.inner_optimizer(self.optimizer).learning_rate))
        return head, head * self._lr_ratio

    def _replica_step(self, batch):
        # The model's own Keras train_step: the step model.fit() runs.
        terms = self.model.train_step(batch)
        if self.ema is not None:
            self.ema.update()
        self.step.assign_add(1)
        return terms

    def _distributed_step(self, batch):
        per_replica = self.strategy.run(self._replica_step, args=(batch,))
        # train_step returns global values from every replica (see
        # MLCRLModel.train_step): their mean is the global batch's value.
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                for k, v in per_replica.items()}

    # --- data -----------------------------------------------------------------

    def train_dataset(self, epoch, skip_steps=0):
        """The distributed training data of one epoch, resumable mid-epoch."""
        c = self.config

        def dataset_fn(input_context):
            return input_pipeline.make_dataset(
                c.train_files, c.batch_size, c.image_size, c.num_classes, c.backbone,
                training=True, shuffle_buffer=c.shuffle_buffer,
                input_context=input_context, random_flip=c.random_flip,
                crop_scales=c.crop_scales or None, seed=c.seed * 100003 + epoch,
                skip_batches=skip_steps)

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def eval_dataset(self, files):
        c = self.config
        return input_pipeline.make_dataset(
            files, c.batch_size, c.image_size, c.num_classes, c.backbone,
            training=False)

    # --- checkpoints and summaries -------------------------------------------

    def _setup_checkpoints(self):
        objects = {"model": self.model, "optimizer": self.optimizer, "step": self.step}
        if self.ema is not None:
            objects["ema"] = self.ema
        self.checkpoint = tf.train.Checkpoint(**objects)
        directory = self.config.model_dir
        if not self.is_chief:
            # Every worker must take part in saving; only the chief's copy stays.
            resolver = self.strategy.cluster_resolver
            directory = os.path.join(directory, ".workers",
                                     f"{resolver.task_type}_{resolver.task_id}")
        self._checkpoint_dir = directory
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, directory, max_to_keep=self.config.keep_checkpoints,
            checkpoint_name="ckpt")
        self.best_manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(directory, checkpoints.BEST_DIR), max_to_keep=1,
            checkpoint_name="ckpt")

    def restore_or_initialize(self):
        """Restores the latest checkpoint of model_dir; returns the step."""
        latest = tf.train.latest_checkpoint(self.config.model_dir)
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            logging.info("Resumed from %s at step %d.", latest, int(self.step.numpy()))
        return int(self.step.numpy())

    def save(self):
        """Saves a checkpoint of the current step (never a diverged state)."""
        step = int(self.step.numpy())
        if not all(bool(tf.reduce_all(tf.math.is_finite(v)).numpy())
                   for v in self.model.trainable_variables):
            raise self._diverged(f"The weights became NaN or infinite by step {step}")
        if self.manager.latest_checkpoint and self.manager.latest_checkpoint.endswith(
                f"-{step}"):
            return self.manager.latest_checkpoint
        path = self.manager.save(checkpoint_number=step)
        self._clean_worker_dir()
        return path

    def _diverged(self, what):
        """The error that stops a diverged run, naming the last good checkpoint."""
        return NonFiniteLossError(
            f"{what}; training stopped without saving this state. The last good "
            f"checkpoint is {self.manager.latest_checkpoint or '(none yet)'}. Lower "
            "--learning_rate or check the data.")

    def _clean_worker_dir(self):
        if not self.is_chief:
            shutil.rmtree(self._checkpoint_dir, ignore_errors=True)

    def best_metrics(self):
        """best/metrics.json, or None (absent, or unreadable: then it is rewritten)."""
        path = os.path.join(self.config.model_dir, checkpoints.BEST_DIR,
                            checkpoints.BEST_METRICS_FILE)
        return checkpoints.read_best_metrics(path)

    def _maybe_save_best(self, selected_on, selection, reported):
        """Keeps best/ if `selection` (an EvalResult) has the highest mAP so far.

        Args:
            selected_on: "selection_files" or "eval_files".
            selection: the EvalResult the choice is made on.
            reported: the --eval_files EvalResult (or None), stored with it.
        """
        best = self.best_metrics()
        score = selection.metrics["mAP"]
        if best is not None and checkpoints.best_selection_score(best) >= score:
            return False
        step = int(self.step.numpy())
        self.best_manager.save(checkpoint_number=step)
        self._clean_worker_dir()
        if self.is_chief:
            shown = reported or selection
            payload = {"step": step, "selected_on": selected_on,
                       "selection_files": getattr(self.config, selected_on),
                       "selection_mAP": score,
                       "metrics": shown.metrics,
                       "per_class_ap": dict(zip(self.class_names, shown.per_class_ap))}
            if reported is None:
                payload["note"] = "metrics are those of the selection files"
            checkpoints.write_json_atomically(
                os.path.join(self.config.model_dir, checkpoints.BEST_DIR,
                             checkpoints.BEST_METRICS_FILE), payload)
        return True

    def _setup_summaries(self):
        if self.is_chief:
            self.train_writer = tf.summary.create_file_writer(
                os.path.join(self.config.model_dir, "train"))
            self.eval_writer = tf.summary.create_file_writer(
                os.path.join(self.config.model_dir, "eval"))
        else:
            self.train_writer = self.eval_writer = tf.summary.create_noop_writer()

    def _write_train_summaries(self, terms, speed):
        step = int(self.step.numpy())
        head_lr, backbone_lr = self.current_learning_rates()
        with self.train_writer.as_default(step=step):
            for name, value in terms.items():
                tf.summary.scalar(f"loss/{name}", value)
            tf.summary.scalar("learning_rate/head", head_lr)
            tf.summary.scalar("learning_rate/backbone", backbone_lr)
            tf.summary.scalar("throughput/images_per_sec", speed["images_per_sec"])
            tf.summary.scalar("throughput/steps_per_sec", speed["steps_per_sec"])
            if self.config.mixed_precision:
                tf.summary.scalar("loss_scale", float(self.optimizer.dynamic_scale.numpy()))

    # --- evaluation -------------------------------------------------------------

    def evaluate(self, files, num_samples=0):
        """Evaluates the (EMA) weights on `files`; returns the EvalResult."""
        if self.ema is not None:
            self.ema.swap()
        try:
            result = evaluate_lib.evaluate_model(
                self.model, self.eval_dataset(files), self.config.num_classes,
                threshold=self.config.threshold, max_steps=self.config.eval_steps,
                num_samples=num_samples)
        finally:
            if self.ema is not None:
                self.ema.swap()
        return result

    def _write_eval_summaries(self, result, prefix="metrics"):
        step = int(self.step.numpy())
        with self.eval_writer.as_default(step=step):
            for name, value in result.metrics.items():
                tf.summary.scalar(f"{prefix}/{name}", value)
            if prefix != "metrics":
                return
            for name, ap in zip(self.class_names, result.per_class_ap):
                if np.isfinite(ap):
                    tf.summary.scalar(f"per_class_ap/{name}", ap)
            if result.samples is not None:
                summaries.write_eval_images(
                    result.samples, self.model, self.config.backbone, self.class_names,
                    max_images=self.config.num_summary_images)

    def _evaluate_epoch(self, epoch, progress):
        """Evaluates after an epoch, keeps best/; returns the --eval_files result."""
        c = self.config
        reported = selection = None
        if c.eval_files:
            reported = self.evaluate(c.eval_files, c.num_summary_images)
            self._write_eval_summaries(reported)
        if c.selection_files:
            selection = self.evaluate(c.selection_files)
            self._write_eval_summaries(selection, prefix="selection_metrics")
        chosen = selection or reported
        if chosen is None:
            return None
        improved = self._maybe_save_best(
            "selection_files" if selection else "eval_files", chosen, reported)
        if reported:
            progress.message(evaluate_lib.format_result_line(
                reported.metrics, epoch + 1, improved and not selection))
        if selection:
            progress.message(f"Selection mAP after epoch {epoch + 1}: "
                             f"{100 * selection.metrics['mAP']:.1f}"
                             + (" (best so far: kept in best/)" if improved else ""))
        return reported

    # --- the loop -------------------------------------------------------------

    def train(self):
        """Runs (or resumes) training to the last step; returns the last eval."""
        c = self.config
        start = self.restore_or_initialize()
        progress = progress_lib.Progress(self.total_steps, c.batch_size)
        progress.start(start)
        if start:
            progress.message(f"Resuming at step {start}/{self.total_steps} "
                             f"(epoch {start // self.steps_per_epoch + 1}).")
        last_eval = None
        for epoch in range(start // self.steps_per_epoch, c.epochs):
            epoch_end = (epoch + 1) * self.steps_per_epoch
            step = int(self.step.numpy())
            iterator = iter(self.train_dataset(epoch, skip_steps=step - epoch * self.steps_per_epoch))
            while step < epoch_end:
                terms = {k: float(v) for k, v in self.train_step(next(iterator)).items()}
                step = int(self.step.numpy())
                if not math.isfinite(terms["loss"]):
                    raise self._diverged(f"The loss became {terms['loss']} at step {step}")
                if step % c.log_every_steps == 0 or step == epoch_end:
                    speed = progress.update(step, terms["loss"], f"epoch {epoch + 1}/{c.epochs}")
                    self._write_train_summaries(terms, speed)
                if step % c.checkpoint_every_steps == 0:
                    self.save()
            path = self.save()
            progress.message(f"Epoch {epoch + 1}/{c.epochs} done at step {step}; "
                             f"checkpoint {path}")
            last_eval = self._evaluate_epoch(epoch, progress) or last_eval
        self.train_writer.flush()
        self.eval_writer.flush()
        return last_eval

    def weights_fingerprint(self):
        """A short digest of the weights (replicas/workers must agree)."""
        total = sum(float(np.abs(v.numpy().astype(np.float64)).sum())
                    for v in self.model.variables)
        return f"{total:.10e}"


def objective_from(config):
    """The `losses.Objective` of a Config's loss flags."""
    return losses.Objective(
        cls_weight=config.cls_weight, aux_weight=config.aux_weight,
        margin=config.crl_margin, image_weight=config.crl_image_weight,
        label_weight=config.crl_label_weight, reduction=config.crl_reduction)


def train_and_evaluate(config):
    """Runs a whole training run described by `config`; see the module doc.

    Returns:
        dict with `model_dir`, `step`, `metrics` (last eval or None),
        `export_path` (or None) and `fingerprint`.

    Raises:
        ValueError: bad flags or data (message names the flag).
        NonFiniteLossError: the loss diverged.
    """
    config_lib.validate(config)
    for message in config_lib.warnings_for(config):
        logging.warning("%s", message)
    strategy = make_strategy(config)
    if config.deterministic:
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()
    else:
        keras.utils.set_random_seed(config.seed)
    config, class_names, num_records = resolve_data(config)
    _prepare_model_dir(config, class_names, is_chief(strategy))
    trainer = Trainer(config, class_names, strategy, num_records)
    logging.info("Training %s/%s on %d records, %d steps/epoch x %d epochs, %d replicas.",
                 config.variant, config.backbone, num_records, trainer.steps_per_epoch,
                 config.epochs, strategy.num_replicas_in_sync)
    result = trainer.train()
    export_path = None
    if config.export_dir and trainer.is_chief:
        if trainer.ema is not None:
            trainer.ema.copy_to_model()
        export_path = export_lib.export_model(
            trainer.model, config.export_dir, trainer.class_names,
            backbone=config.backbone, threshold=config.threshold)
    return {"model_dir": config.model_dir, "step": int(trainer.step.numpy()),
            "metrics": result.metrics if result else None, "export_path": export_path,
            "fingerprint": trainer.weights_fingerprint()}


def _prepare_model_dir(config, class_names, chief):
    """Creates model_dir, checks a resumed run is the same network, writes run.json."""
    try:
        tf.io.gfile.makedirs(config.model_dir)
        probe = os.path.join(config.model_dir, ".write_test")
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        raise ValueError(f"--model_dir={config.model_dir!r} is not writable: {e}") from None
    checkpoints.check_resumable(config.model_dir, config)
    if chief:
        checkpoints.write_run(config.model_dir, config, class_names)

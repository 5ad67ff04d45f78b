"""The training loop: one loop for every `tf.distribute` strategy.

`train_and_evaluate(config)` runs the whole recipe: it checks the data
(`mlcrl_tf.data`), builds the model and the paper's optimizer in the
strategy's scope, resumes from the latest checkpoint in `model_dir`
(`checkpoints.CheckpointRun`), trains with `strategy.run` of a `tf.function`
step, evaluates every epoch (`evaluate_lib`), keeps the best checkpoint,
writes TensorBoard summaries (`summaries`) and finally exports the inference
model (`export_lib`).

Decisions (see docs/design.md):
- The optimizer is PyTorch's SGD rule exactly (`mlcrl_tf.optim.PaperSGD`):
  coupled weight decay, a momentum buffer in gradient units, the backbone's
  rate as a per-variable multiplier of the (step-decayed) head rate. One
  optimizer keeps one iteration counter, one schedule and one loss scale.
- The step is the model's own `train_step` (the one `model.fit()` runs), on
  the model's own objective (`losses.Objective`): each replica's
  classification and MSE loss is its sum divided by the GLOBAL batch and the
  CRL triplet counts are all-reduced, so the gradients the optimizer sums
  across replicas are exactly one device's on the same global batch. This
  loop exists beside `fit()` for `MultiWorkerMirroredStrategy` (where `fit()`
  fails, tensorflow/tensorflow#72388) and for exact mid-epoch resume.
- Resume: each epoch's data order is a function of (seed, epoch); a resumed
  run skips the records of the steps it already did in the current epoch, so
  with --deterministic it ends bit-identical to an uninterrupted run.
"""

import math

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from mlcrl_tf import backbones
from mlcrl_tf import checkpoints
from mlcrl_tf import config as config_lib
from mlcrl_tf import data as data_lib
from mlcrl_tf import distribute
from mlcrl_tf import evaluate_lib
from mlcrl_tf import export_lib
from pipelines.utils import outputs
from mlcrl_tf import losses
from mlcrl_tf import optim
from mlcrl_tf import progress as progress_lib
from mlcrl_tf import run_lock
from mlcrl_tf import summaries as summaries_lib
from pipelines.tfdata import preprocessing
from pipelines.tfdata import record_stream
from pipelines.tfdata import tfds_source
from pipelines.tfdata import input_pipeline


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


def objective_from(config):
    """The `losses.Objective` of a Config's loss flags."""
    return losses.Objective(
        cls_weight=config.cls_weight, aux_weight=config.aux_weight,
        margin=config.crl_margin, image_weight=config.crl_image_weight,
        label_weight=config.crl_label_weight, reduction=config.crl_reduction)


class Trainer:
    """The model, optimizer, checkpoints and summaries of one run, and its loop.

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
        self.is_chief = distribute.is_chief(strategy)
        self.steps_per_epoch = config.steps_per_epoch or max(
            1, num_train_records // config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.policy = config_lib.compute_policy(config)
        with strategy.scope(), checkpoints.dtype_policy(self.policy):
            self._build_state()
        objects = {"model": self.model, "optimizer": self.optimizer, "step": self.step}
        if self.ema is not None:
            objects["ema"] = self.ema
        self.checkpoints = checkpoints.CheckpointRun(
            config.model_dir, objects, config.keep_checkpoints, self.is_chief,
            distribute.worker_name(strategy))
        self.summaries = summaries_lib.TrainingSummaries(config.model_dir, self.is_chief)
        self._replica_fn = (tf.function(self._replica_step, jit_compile=True)
                            if config.jit_compile else self._replica_step)
        self.train_step = tf.function(self._distributed_step)

    def _build_state(self):
        """Model, optimizer, step counter and EMA (in the strategy's scope)."""
        c = self.config
        self.model = checkpoints.build_model_for(c, c.backbone_weights)
        self.optimizer = optim.make_optimizer(
            self.model, c.learning_rate, c.backbone_learning_rate, momentum=c.momentum,
            weight_decay=c.weight_decay, decay_boundaries=self.decay_boundaries(),
            decay_factor=c.lr_decay_factor, loss_scaling=self.policy == "mixed_float16")
        self.model.compile(optimizer=self.optimizer, objective=objective_from(c),
                           jit_compile=c.jit_compile)
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.ema = (optim.ExponentialMovingAverage(self.model.trainable_variables,
                                                   c.ema_decay)
                    if c.ema_decay > 0 else None)

    # --- optimisation -------------------------------------------------------

    def decay_boundaries(self):
        """Steps at which both learning rates are multiplied by the decay factor."""
        return [int(e) * self.steps_per_epoch for e in sorted(self.config.lr_decay_epochs)]

    def current_learning_rates(self):
        """(head, backbone) learning rates at the current step."""
        head = float(keras.ops.convert_to_numpy(
            optim.inner_optimizer(self.optimizer).learning_rate))
        return head, head * self.config.backbone_learning_rate / self.config.learning_rate

    def _replica_step(self, batch):
        # The model's own Keras train_step: the step model.fit() runs.
        terms = self.model.train_step(batch)
        if self.ema is not None:
            self.ema.update()
        self.step.assign_add(1)
        return terms

    def _distributed_step(self, batch):
        # Only what the step needs: XLA cannot take the string filenames.
        inputs = {"images": batch["images"], "labels": batch["labels"]}
        per_replica = self.strategy.run(self._replica_fn, args=(inputs,))
        if self.strategy.num_replicas_in_sync == 1:
            return per_replica
        # train_step returns global values from every replica (see
        # MLCRLModel.train_step): their mean is the global batch's value.
        return {k: self.strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None)
                for k, v in per_replica.items()}

    # --- data -----------------------------------------------------------------

    def train_dataset(self, epoch, skip_steps=0):
        """The distributed training data of one epoch, resumable mid-epoch."""
        c = self.config
        augmentation = preprocessing.Augmentation(c.random_flip, c.crop_scales or None)

        def dataset_fn(input_context):
            return input_pipeline.make_dataset(
                c.train_files, c.batch_size, c.image_size, c.num_classes, training=True,
                shuffle_buffer=c.shuffle_buffer, input_context=input_context,
                augmentation=augmentation, seed=c.seed * 100003 + epoch,
                skip_batches=skip_steps, data_dir=c.data_dir, antialias=c.antialias,
                deterministic=c.deterministic, max_pixels=c.max_image_pixels)

        return self.strategy.distribute_datasets_from_function(dataset_fn)

    def eval_dataset(self, source):
        c = self.config
        return input_pipeline.make_dataset(source, c.batch_size, c.image_size,
                                           c.num_classes, training=False,
                                           data_dir=c.data_dir, antialias=c.antialias,
                                           max_pixels=c.max_image_pixels)

    # --- checkpoints ------------------------------------------------------------

    def save(self):
        """Saves a checkpoint of the current step (never a diverged state)."""
        step = int(self.step.numpy())
        if not all(bool(tf.reduce_all(tf.math.is_finite(v)).numpy())
                   for v in self.model.trainable_variables):
            raise self._diverged(f"The weights became NaN or infinite by step {step}")
        return self.checkpoints.save(step)

    def _diverged(self, what):
        """The error that stops a diverged run, naming the last good checkpoint."""
        return NonFiniteLossError(
            f"{what}; training stopped without saving this state. The last good "
            f"checkpoint is {self.checkpoints.latest or '(none yet)'}. Lower "
            "--learning_rate or check the data.")

    def _maybe_save_best(self, selected_on, selection, reported):
        """Keeps best/ if `selection` (an EvalResult) has the highest mAP so far.

        Args:
            selected_on: "selection_files" or "eval_files".
            selection: the EvalResult the choice is made on.
            reported: the --eval_files EvalResult (or None), stored with it.
        """
        best = self.checkpoints.best_metrics()
        score = selection.metrics["mAP"]
        if best is not None and checkpoints.best_selection_score(best) >= score:
            return False
        shown = reported or selection
        payload = {"step": int(self.step.numpy()), "selected_on": selected_on,
                   "selection_files": getattr(self.config, selected_on),
                   "selection_mAP": score, "metrics": shown.metrics,
                   "per_class_ap": dict(zip(self.class_names, shown.per_class_ap))}
        if reported is None:
            payload["note"] = "metrics are those of the selection files"
        self.checkpoints.save_best(payload["step"], payload)
        return True

    # --- evaluation -------------------------------------------------------------

    def evaluate(self, source, num_samples=0):
        """Evaluates the (EMA) weights on `source`; returns the EvalResult.

        With several replicas (or workers) every replica scores its share
        (`evaluate_lib.evaluate_distributed`); a TFDS source, whose shares
        are not known in advance, is scored on one device per worker.
        """
        if self.ema is not None:
            self.ema.swap()
        try:
            if (self.strategy.num_replicas_in_sync > 1
                    and not tfds_source.is_tfds(source)):
                return self._evaluate_distributed(source, num_samples)
            return evaluate_lib.evaluate_model(
                self.model, self.eval_dataset(source), self.config.num_classes,
                threshold=self.config.threshold, max_steps=self.config.eval_steps,
                num_samples=num_samples)
        finally:
            if self.ema is not None:
                self.ema.swap()

    def _evaluate_distributed(self, source, num_samples):
        c = self.config
        replicas = self.strategy.num_replicas_in_sync
        pipelines = distribute.num_workers(self.strategy)
        batches, steps = input_pipeline.eval_batches_per_pipeline(
            source, c.batch_size, replicas, pipelines)
        if c.eval_steps:
            steps = min(steps, c.eval_steps)
            batches = steps * max(1, replicas // pipelines)

        def dataset_fn(input_context):
            return input_pipeline.padded_eval_dataset(
                source, c.batch_size, c.image_size, c.num_classes, input_context, batches,
                data_dir=c.data_dir, antialias=c.antialias, max_pixels=c.max_image_pixels)

        return evaluate_lib.evaluate_distributed(
            self.model, self.strategy, dataset_fn, steps, c.num_classes,
            threshold=c.threshold, num_samples=num_samples)

    def _evaluate_epoch(self, epoch, progress):
        """Evaluates after an epoch, keeps best/; returns the --eval_files result."""
        c = self.config
        step = int(self.step.numpy())
        self.summaries.write_label_embeddings(step, self.model, self.class_names,
                                              c.train_files, c.data_dir)
        reported = selection = None
        if c.eval_files:
            reported = self.evaluate(c.eval_files, c.num_summary_images)
            self.summaries.write_eval(step, reported, self.model, self.class_names,
                                      c.num_summary_images)
        if c.selection_files:
            selection = self.evaluate(c.selection_files)
            self.summaries.write_eval(step, selection, self.model, self.class_names,
                                      prefix="selection_metrics")
        chosen = selection or reported
        improved = chosen is not None and self._maybe_save_best(
            "selection_files" if selection else "eval_files", chosen, reported)
        self.checkpoints.mark_evaluated(step)
        if reported:
            progress.message(evaluate_lib.format_result_line(
                reported.metrics, epoch + 1, improved and not selection))
        if selection:
            progress.message(f"Selection mAP after epoch {epoch + 1}: "
                             f"{100 * selection.metrics['mAP']:.1f}"
                             + (" (best so far: kept in best/)" if improved else ""))
        return reported

    # --- the loop -------------------------------------------------------------

    def restore_or_initialize(self):
        """Restores the latest checkpoint of model_dir; returns the step."""
        self.checkpoints.restore_latest()
        return int(self.step.numpy())

    def train(self):
        """Runs (or resumes) training to the last step; returns the last eval.

        The TensorBoard writers are flushed and closed when it returns or
        raises.
        """
        try:
            return self._train_epochs()
        finally:
            self.summaries.close()

    def _train_epochs(self):
        """The body of `train`."""
        c = self.config
        start = self.restore_or_initialize()
        if self.is_chief:  # only once the checkpoint loaded: a refused resume changes nothing
            checkpoints.write_run(c.model_dir, c, self.class_names)
        progress = progress_lib.Progress(self.total_steps, c.batch_size)
        progress.start(start)
        if start:
            progress.message(f"Resuming at step {start}/{self.total_steps} "
                             f"(epoch {start // self.steps_per_epoch + 1}).")
        last_eval = self._missed_evaluation(start, progress)
        progress.resume()
        for epoch in range(start // self.steps_per_epoch, c.epochs):
            self._train_epoch(epoch, progress)
            path = self.save()
            progress.message(f"Epoch {epoch + 1}/{c.epochs} done at step "
                             f"{int(self.step.numpy())}; checkpoint {path}")
            last_eval = self._evaluate_epoch(epoch, progress) or last_eval
            progress.resume()  # the next speed is of training steps only
        return last_eval

    def _missed_evaluation(self, start, progress):
        """Runs the evaluation of the epoch that ended at `start` if the run
        stopped after its checkpoint but before the evaluation finished."""
        c = self.config
        if (not start or start % self.steps_per_epoch or not (c.eval_files or c.selection_files)
                or self.checkpoints.evaluated_step() >= start):
            return None
        epoch = start // self.steps_per_epoch - 1
        progress.message(f"Evaluating epoch {epoch + 1}: the run stopped before its "
                         "evaluation finished.")
        return self._evaluate_epoch(epoch, progress)

    def _train_epoch(self, epoch, progress):
        """The steps of one epoch (from the current step, when resuming)."""
        c = self.config
        epoch_end = (epoch + 1) * self.steps_per_epoch
        step = int(self.step.numpy())
        iterator = iter(self.train_dataset(epoch,
                                           skip_steps=step - epoch * self.steps_per_epoch))
        while step < epoch_end:
            with record_stream.readable_errors("training data"):
                batch = next(iterator)
            terms = {k: float(v) for k, v in self.train_step(batch).items()}
            step = int(self.step.numpy())
            if not math.isfinite(terms["loss"]):
                raise self._diverged(f"The loss became {terms['loss']} at step {step}")
            if step % c.log_every_steps == 0 or step == epoch_end:
                speed = progress.update(step, terms["loss"], f"epoch {epoch + 1}/{c.epochs}")
                self.summaries.write_train(step, terms, self.current_learning_rates(),
                                           speed, self._loss_scale())
            if step % c.checkpoint_every_steps == 0:
                self.save()

    def _loss_scale(self):
        if self.policy != "mixed_float16":
            return None
        return float(self.optimizer.dynamic_scale.numpy())

    def weights_fingerprint(self):
        """A short digest of the weights (replicas/workers must agree)."""
        total = sum(float(np.abs(v.numpy().astype(np.float64)).sum())
                    for v in self.model.variables)
        return f"{total:.10e}"


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
    outputs.ensure_output_dir(config.model_dir, "model_dir")
    if config.export_dir and chief:  # checked before the first step, not after the last
        outputs.ensure_output_dir(config.export_dir, "export_dir")
    with run_lock.run_lock(config.model_dir, chief, config.lock_timeout_secs):
        # A resumed run must be the same network (run.json is rewritten by
        # Trainer.train once its checkpoint has loaded).
        checkpoints.check_resumable(config.model_dir, config)
        return _train_and_export(config, class_names, strategy, num_records)


def _train_and_export(config, class_names, strategy, num_records):
    """Trains, exports (chief); returns train_and_evaluate's dict."""
    trainer = Trainer(config, class_names, strategy, num_records)
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

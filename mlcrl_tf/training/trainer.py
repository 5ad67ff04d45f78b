"""`Trainer`: the one training loop, for every `tf.distribute` strategy.

Its step is the model's own `train_step` in `strategy.run`; a resume continues
mid-epoch with the same data order (docs/design.md, Training).
"""

import math
import signal

import keras
import numpy as np
import tensorflow as tf

from mlcrl_tf.modeling import objective as objective_lib
from mlcrl_tf.modeling import optim
from mlcrl_tf.modeling import precision as precision_lib
from mlcrl_tf.run_dir import checkpoints
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import restore
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.training import distribute
from mlcrl_tf.training import epoch_evaluation
from mlcrl_tf.training import step_progress
from mlcrl_tf.training import stop_signals
from mlcrl_tf.training import summaries as summaries_lib
from pipelines.tfdata import input_pipeline
from pipelines.tfdata import preprocessing
from pipelines.tfdata import record_stream


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


def resuming(config):
    """Whether `config.model_dir` holds checkpoints to resume from (the
    backbone's starting weights are then not needed: the checkpoint has them)."""
    return bool(checkpoints.checkpoints_on_disk(config.model_dir))


def objective_from(config):
    """The `objective.Objective` of a Config's loss flags."""
    return objective_lib.Objective(
        cls_weight=config.cls_weight, aux_weight=config.aux_weight,
        margin=config.crl_margin, image_weight=config.crl_image_weight,
        label_weight=config.crl_label_weight, reduction=config.crl_reduction)


class Trainer:
    """The model, optimizer, checkpoints and summaries of one run, and its loop.

    Built in the strategy's scope and under the run's precision policy;
    `train()` restores the newest loadable checkpoint, trains to the last
    step, evaluates after each epoch (`epoch_evaluation`) and saves.

    Args:
        config: a validated `Config` with num_classes set.
        class_names: list of C names.
        strategy: a `tf.distribute.Strategy`.
        num_train_records: size of the training set.

    Example:
        config, names, count = data.resolve_data(config)
        trainer = Trainer(config, names, distribute.make_strategy("default"), count)
        last_eval = trainer.train()
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
        with strategy.scope(), precision_lib.dtype_policy(self.policy):
            self._build_state()
        objects = {"model": self.model, "optimizer": self.optimizer, "step": self.step}
        if self.ema is not None:
            objects["ema"] = self.ema
        self.checkpoints = checkpoints.CheckpointRun(
            config.model_dir, objects, config.keep_checkpoints, self.is_chief,
            distribute.worker_name(strategy))
        self.summaries = summaries_lib.TrainingSummaries(config.model_dir, self.is_chief)
        self.evaluation = epoch_evaluation.EpochEvaluation(self)
        self._replica_fn = (tf.function(self._replica_step, jit_compile=True)
                            if config.jit_compile else self._replica_step)
        self.train_step = tf.function(self._distributed_step)
        self.signals = stop_signals.StopSignals()  # installed by `train`
        # Workers agree after each step whether one of them was asked to stop.
        self._agree_on_stop = (tf.function(self._any_worker_stops)
                               if distribute.num_workers(strategy) > 1 else None)

    def _build_state(self):
        """Model, optimizer, step counter and EMA (in the strategy's scope)."""
        c = self.config
        # A resume restores every weight: no ImageNet download (or file) is needed.
        self.model = restore.build_model_for(c, None if resuming(c) else c.backbone_weights)
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

    def _any_worker_stops(self, signal_number):
        # ReduceOp has SUM and MEAN only: count the replicas asked to stop.
        asked = tf.cast(signal_number > 0, tf.float32)
        per_replica = self.strategy.run(lambda n: n, args=(asked,))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None) > 0

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

    # --- the loop -------------------------------------------------------------

    def restore_or_initialize(self):
        """Restores the latest checkpoint of model_dir; returns the step."""
        self.checkpoints.restore_latest()
        return int(self.step.numpy())

    def train(self):
        """Runs (or resumes) training to the last step; returns the last eval.

        The TensorBoard writers are flushed and closed when it returns or
        raises. A SIGTERM or SIGINT finishes the step in flight, saves it and
        raises `stop_signals.StopRequested` (during an evaluation, whose
        epoch is already saved, at once).
        """
        with self.signals:
            try:
                return self._train_epochs()
            finally:
                self.summaries.close()

    def _train_epochs(self):
        """The body of `train`."""
        c = self.config
        start = self.restore_or_initialize()
        if self.is_chief:  # only once the checkpoint loaded: a refused resume changes nothing
            self._write_run_file()
        progress = step_progress.StepProgress(self.total_steps, c.batch_size)
        progress.start(start)
        progress.message(distribute.describe(self.strategy))
        if start:
            progress.message(f"Resuming at step {start}/{self.total_steps} "
                             f"(epoch {start // self.steps_per_epoch + 1}).")
        with self.signals.immediate(self._stopped_in_evaluation(self.checkpoints.latest)):
            last_eval = self.evaluation.missed(start, progress)
        progress.resume()
        for epoch in range(start // self.steps_per_epoch, c.epochs):
            self._train_epoch(epoch, progress)
            path = self.save()
            progress.message(f"Epoch {epoch + 1}/{c.epochs} done at step "
                             f"{int(self.step.numpy())}; checkpoint {path}")
            with self.signals.immediate(self._stopped_in_evaluation(path)):
                last_eval = self.evaluation.after_epoch(epoch, progress) or last_eval
            progress.resume()  # the next speed is of training steps only
        return last_eval

    def _write_run_file(self):
        try:
            run_files.write_run(self.config.model_dir, self.config, self.class_names)
        except run_files.RunDirError as e:
            raise checkpoints.CheckpointError(
                f"{e}; training stopped before its first step. The last good checkpoint "
                f"is {self.checkpoints.latest or '(none yet)'}: free space (or fix the "
                "directory) and rerun the same command to resume from it.") from None

    def _stopped_in_evaluation(self, checkpoint):
        return (f"stopped by {{signal}} during the evaluation of the checkpoint "
                f"{checkpoint}, which is saved: rerun the same command to resume (the "
                "evaluation runs again first).")

    def _stop_if_asked(self, step):
        """Saves and raises StopRequested once a stop signal arrived (on any
        worker: the workers agree, so that all of them save the same step)."""
        number = self.signals.received
        if self._agree_on_stop is not None:
            if not self._agree_on_stop(tf.constant(int(number or 0))):
                return
            number = number or signal.SIGTERM
        elif number is None:
            return
        path = self.save()
        raise stop_signals.StopRequested(
            number, f"stopped by {signal.Signals(number).name} at step {step}/"
            f"{self.total_steps}: saved {path}; rerun the same command to resume from it.")

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
            self._stop_if_asked(step)

    def _loss_scale(self):
        if self.policy != "mixed_float16":
            return None
        return float(self.optimizer.dynamic_scale.numpy())

    def weights_fingerprint(self):
        """A short digest of the weights (replicas/workers must agree)."""
        total = sum(float(np.abs(v.numpy().astype(np.float64)).sum())
                    for v in self.model.variables)
        return f"{total:.10e}"

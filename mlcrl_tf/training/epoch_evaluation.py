"""The evaluation after each training epoch: metrics on every replica,
best/, TensorBoard (docs/design.md, Training: which checkpoint is "best").
"""

from mlcrl_tf.evaluation import evaluate_lib
from mlcrl_tf.evaluation import evaluator
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.training import distribute
from pipelines.tfdata import input_pipeline
from pipelines.tfdata import tfds_source


class EpochEvaluation:
    """Evaluates a training run's (EMA) weights and keeps its best checkpoint.

    Args:
        trainer: the `trainer.Trainer` whose model, strategy, checkpoints and
            summaries it uses.
    """

    def __init__(self, trainer):
        self._trainer = trainer
        self.config = trainer.config

    def eval_dataset(self, source):
        """The evaluation data of `source` for one device."""
        c = self.config
        return input_pipeline.make_dataset(source, c.batch_size, c.image_size,
                                           c.num_classes, training=False,
                                           data_dir=c.data_dir, antialias=c.antialias,
                                           max_pixels=c.max_image_pixels)

    def evaluate(self, source, num_samples=0):
        """Evaluates the (EMA) weights on `source`; returns the EvalResult.

        With several replicas (or workers) every replica scores its share
        (`evaluator.evaluate_distributed`); a TFDS source, whose shares are
        not known in advance, is scored on one device per worker.
        """
        trainer = self._trainer
        if trainer.ema is not None:
            trainer.ema.swap()
        try:
            if (trainer.strategy.num_replicas_in_sync > 1
                    and not tfds_source.is_tfds(source)):
                return self._evaluate_distributed(source, num_samples)
            return evaluator.evaluate_model(
                trainer.model, self.eval_dataset(source), self.config.num_classes,
                threshold=self.config.threshold, max_steps=self.config.eval_steps,
                num_samples=num_samples)
        finally:
            if trainer.ema is not None:
                trainer.ema.swap()

    def _evaluate_distributed(self, source, num_samples):
        c, strategy = self.config, self._trainer.strategy
        replicas = strategy.num_replicas_in_sync
        pipelines = distribute.num_workers(strategy)
        batches, steps = input_pipeline.eval_batches_per_pipeline(
            source, c.batch_size, replicas, pipelines)
        if c.eval_steps:
            steps = min(steps, c.eval_steps)
            batches = steps * max(1, replicas // pipelines)

        def dataset_fn(input_context):
            return input_pipeline.padded_eval_dataset(
                source, c.batch_size, c.image_size, c.num_classes, input_context, batches,
                data_dir=c.data_dir, antialias=c.antialias, max_pixels=c.max_image_pixels)

        return evaluator.evaluate_distributed(
            self._trainer.model, strategy, dataset_fn, steps, c.num_classes,
            threshold=c.threshold, num_samples=num_samples)

    def after_epoch(self, epoch, progress):
        """Evaluates after an epoch, keeps best/; returns the --eval_files result."""
        c, trainer = self.config, self._trainer
        step = int(trainer.step.numpy())
        trainer.summaries.write_label_embeddings(step, trainer.model, trainer.class_names,
                                                 c.train_files, c.data_dir)
        reported = selection = None
        if c.eval_files:
            reported = self.evaluate(c.eval_files, c.num_summary_images)
            trainer.summaries.write_eval(step, reported, trainer.model, trainer.class_names,
                                         c.num_summary_images)
        if c.selection_files:
            selection = self.evaluate(c.selection_files)
            trainer.summaries.write_eval(step, selection, trainer.model,
                                         trainer.class_names, prefix="selection_metrics")
        chosen = selection or reported
        improved = chosen is not None and self._keep_if_best(
            "selection_files" if selection else "eval_files", chosen, reported)
        trainer.checkpoints.mark_evaluated(step)
        if reported:
            progress.message(evaluate_lib.format_result_line(
                reported.metrics, epoch + 1, improved and not selection))
        if selection:
            progress.message(f"Selection mAP after epoch {epoch + 1}: "
                             f"{100 * selection.metrics['mAP']:.1f}"
                             + (" (best so far: kept in best/)" if improved else ""))
        return reported

    def missed(self, start, progress):
        """Runs the evaluation of the epoch that ended at step `start` if the
        run stopped after its checkpoint but before the evaluation finished."""
        c, steps_per_epoch = self.config, self._trainer.steps_per_epoch
        if (not start or start % steps_per_epoch or not (c.eval_files or c.selection_files)
                or self._trainer.checkpoints.evaluated_step() >= start):
            return None
        epoch = start // steps_per_epoch - 1
        progress.message(f"Evaluating epoch {epoch + 1}: the run stopped before its "
                         "evaluation finished.")
        return self.after_epoch(epoch, progress)

    def _keep_if_best(self, selected_on, selection, reported):
        """Keeps best/ if `selection` (an EvalResult) has the highest mAP so far.

        Args:
            selected_on: "selection_files" or "eval_files".
            selection: the EvalResult the choice is made on.
            reported: the --eval_files EvalResult (or None), stored with it.
        """
        trainer = self._trainer
        best = trainer.checkpoints.best_metrics()
        score = selection.metrics["mAP"]
        if best is not None and run_files.best_selection_score(best) >= score:
            return False
        shown = reported or selection
        payload = {"step": int(trainer.step.numpy()), "selected_on": selected_on,
                   "selection_files": getattr(self.config, selected_on),
                   "selection_mAP": score, "metrics": shown.metrics,
                   "per_class_ap": dict(zip(trainer.class_names, shown.per_class_ap))}
        if reported is None:
            payload["note"] = "metrics are those of the selection files"
        trainer.checkpoints.save_best(payload["step"], payload)
        return True

"""Running a model (one device, or every replica) or an export over
evaluation data and computing the metrics; scores are ranked as logits.
"""

import dataclasses
import weakref

from absl import logging
import numpy as np
import tensorflow as tf

from mlcrl_tf.evaluation import metrics
from mlcrl_tf.serving import export_client
from pipelines.tfdata import input_pipeline
from pipelines.tfdata import record_stream
from pipelines.tfdata import skip_counts


@dataclasses.dataclass
class EvalResult:
    """What an evaluation pass returns.

    Attributes:
        metrics: the 13 Table-1 numbers (fractions).
        per_class_ap: list of C floats (NaN for classes without positives).
        num_examples: images evaluated.
        num_skipped: undecodable records skipped by the input pipeline.
        samples: the first few images for TensorBoard (dict of arrays) or None.
        scores: with keep_scores, every image's `filenames` (N,), `logits`
            (N, C) float32, `labels` (N, C) float32 and `difficult` (N, C)
            bool; else None.
    """

    metrics: dict
    per_class_ap: list
    num_examples: int
    num_skipped: int = 0
    samples: dict | None = None
    scores: dict | None = None


class _ScoreKeeper:
    """Collects per-image filenames, logits, labels and difficult masks."""

    def __init__(self):
        self.parts = {"filenames": [], "logits": [], "labels": [], "difficult": []}

    def add(self, filenames, logits, labels, difficult):
        for key, value in zip(self.parts, (filenames, logits, labels, difficult)):
            self.parts[key].append(np.asarray(value))

    def arrays(self):
        arrays = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in self.parts.items()}
        arrays["filenames"] = np.array([f.decode("utf-8", "replace") if isinstance(f, bytes)
                                        else str(f) for f in arrays["filenames"]])
        arrays["logits"] = arrays["logits"].astype(np.float32)
        arrays["labels"] = arrays["labels"].astype(np.float32)
        arrays["difficult"] = arrays["difficult"].astype(bool)
        return arrays


def _take_samples(samples, batch, logits, count):
    """Keeps the first `count` images with their predictions."""
    have = 0 if samples is None else len(samples["logits"])
    if have >= count:
        return samples
    n = count - have
    new = {"images": batch["images"][:n].numpy(), "labels": batch["labels"][:n].numpy(),
           "logits": logits[:n], "filename": batch["filename"][:n].numpy()}
    if samples is None:
        return new
    return {k: np.concatenate([samples[k], new[k]]) for k in samples}


# One traced function per model (and strategy): evaluating after every epoch
# must not trace the network again each time. Weakly keyed, and the functions
# hold the model weakly, so that a model's entry goes with it.
_PREDICT_FUNCTIONS = weakref.WeakKeyDictionary()
_GATHER_FUNCTIONS = weakref.WeakKeyDictionary()


def _predict_function(model):
    """images -> float32 logits of `model.inference_model`, one tf.function per model."""
    predict = _PREDICT_FUNCTIONS.get(model)
    if predict is None:
        ref = weakref.ref(model)
        predict = tf.function(
            lambda images: tf.cast(ref().inference_model(images, training=False),
                                   tf.float32),
            reduce_retracing=True)
        _PREDICT_FUNCTIONS[model] = predict
    return predict


def evaluate_model(model, dataset, num_classes, threshold=0.5, max_steps=0,
                   num_samples=0, skip_counter=None, keep_scores=False, progress=None):
    """Runs the inference branch over `dataset` and computes every metric.

    Args:
        model: an `MLCRLModel` (its `inference_model` is used).
        dataset: batches from `input_pipeline.make_dataset(training=False)`.
        num_classes: C.
        threshold: probability threshold of the P/R/F1 metrics.
        max_steps: evaluate at most this many batches (0 = all).
        num_samples: keep this many images with predictions for summaries.
        skip_counter: the dataset's `SkipCounter`, to report skipped records.
        keep_scores: also return every image's logits (`EvalResult.scores`).
        progress: optional; its `update(n)` is called with the number of
            images of each batch (e.g. a `pipelines.utils.progress.Progress`).

    Returns:
        An `EvalResult`.
    """
    predict = _predict_function(model)
    accumulator = metrics.MetricAccumulator(num_classes, from_logits=True)
    keeper = _ScoreKeeper() if keep_scores else None
    samples = None
    with record_stream.readable_errors("evaluation data"):
        for batch in _batches(dataset, max_steps):
            logits = predict(batch["images"]).numpy()
            labels, difficult = batch["labels"].numpy(), batch["difficult"].numpy()
            accumulator.update(logits, labels, ignore=difficult)
            if keeper:
                keeper.add(batch["filename"].numpy(), logits, labels, difficult)
            if num_samples:
                samples = _take_samples(samples, batch, logits, num_samples)
            if progress is not None:
                progress.update(len(labels))
    result = _result(accumulator, threshold, samples, skip_counter)
    result.scores = keeper.arrays() if keeper else None
    return result


def evaluate_distributed(model, strategy, dataset_fn, steps, num_classes, threshold=0.5,
                         num_samples=0, progress=None):
    """Evaluation on every replica of `strategy` (and every worker).

    Each replica scores its share of the data (`dataset_fn` gives each input
    pipeline its files, padded with empty batches so that every replica runs
    `steps` steps; see `input_pipeline.eval_batches_per_pipeline`); the
    logits, labels and difficult masks are gathered with `strategy.gather`,
    so every worker accumulates every image exactly once and all compute the
    same metrics.

    Args:
        model: an `MLCRLModel` built in `strategy`'s scope.
        strategy: a `tf.distribute.Strategy`.
        dataset_fn: input_context -> dataset (`input_pipeline.padded_eval_dataset`).
        steps: steps per replica.
        num_classes, threshold: as `evaluate_model`.
        num_samples: keep this many images (of the first local replica) for
            TensorBoard.
        progress: optional `pipelines.utils.progress.Progress`.

    Returns:
        An `EvalResult`.
    """
    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    gathered = _gather_function(model, strategy)
    accumulator = metrics.MetricAccumulator(num_classes, from_logits=True)
    samples = None
    iterator = iter(dataset)
    with record_stream.readable_errors("evaluation data"):
        for _ in range(steps):
            batch = next(iterator)
            out = {key: value.numpy() for key, value in gathered(batch).items()}
            accumulator.update(out["logits"], out["labels"], ignore=out["difficult"] > 0)
            if num_samples:
                samples = _local_samples(samples, model, batch, strategy, num_samples)
            if progress is not None:
                progress.update(len(out["labels"]))
    return _result(accumulator, threshold, samples, None)


def _gather_function(model, strategy):
    """batch -> every replica's logits, labels and difficult masks, gathered;
    one tf.function per (model, strategy)."""
    cached = _GATHER_FUNCTIONS.get(model)
    if cached is not None and cached[0] is strategy:
        return cached[1]
    ref = weakref.ref(model)

    def replica(batch):
        # A padding batch has a static batch size of 0 on some replicas; keep
        # the traced shapes general (Keras folds some ops on static shapes).
        images = tf.compat.v1.placeholder_with_default(
            batch["images"], [None, *batch["images"].shape[1:]])
        return {"logits": tf.cast(ref().inference_model(images, training=False),
                                  tf.float32),
                "labels": batch["labels"], "difficult": tf.cast(batch["difficult"], tf.float32)}

    @tf.function
    def gathered(batch):
        out = strategy.run(replica, args=(batch,))
        return {key: strategy.gather(value, axis=0) for key, value in out.items()}

    _GATHER_FUNCTIONS[model] = (strategy, gathered)
    return gathered


def _local_samples(samples, model, batch, strategy, count):
    """A few images of this worker's first replica, with their logits."""
    if samples is not None and len(samples["logits"]) >= count:
        return samples
    local = {key: strategy.experimental_local_results(value)[0]
             for key, value in batch.items()}
    if len(local["images"]) == 0:
        return samples
    logits = model.inference_model(local["images"][:count], training=False).numpy()
    return _take_samples(samples, local, logits, count)


def evaluate_saved_model(saved_model, file_pattern, num_classes, threshold=None,
                         batch_size=32, max_steps=0, keep_scores=False, progress=None,
                         data_dir=None):
    """Evaluates an export's `serving_default` on the records' image bytes.

    Ranks its `logits` output (not the saturating float32 `probabilities`).
    Undecodable images and records that are not a tf.Example are skipped and
    counted, as in a checkpoint's evaluation (`EvalResult.num_skipped` holds
    both). `progress` (optional) is told the records of each batch that
    parsed, undecodable images included (see `evaluate_model`).

    Args:
        saved_model: an export directory, or its loaded `export_client.ExportClient`.
        file_pattern: glob of shards, or `tfds:NAME:SPLIT`.
        num_classes: C.
        threshold: probability threshold; default the export's own.
        batch_size, max_steps, keep_scores, progress: as `evaluate_model`.
        data_dir: TensorFlow Datasets' data directory for a `tfds:` source.

    Returns:
        An `EvalResult` (without samples).
    """
    client = (saved_model if isinstance(saved_model, export_client.ExportClient)
              else export_client.ExportClient(saved_model))
    threshold = client.threshold if threshold is None else threshold
    counter = skip_counts.SkipCounter()
    dataset = input_pipeline.make_record_dataset(file_pattern, batch_size, num_classes,
                                                 data_dir=data_dir, skip_counter=counter)
    accumulator = metrics.MetricAccumulator(num_classes, from_logits=True)
    keeper = _ScoreKeeper() if keep_scores else None
    skipped = 0
    with record_stream.readable_errors("evaluation data"):
        for batch in _batches(dataset, max_steps):
            # Undecodable images are skipped and counted, the rest scored.
            keep, logits, problems = client.score(batch["image_bytes"].numpy())
            skipped += len(problems)
            if progress is not None:
                progress.update(len(batch["labels"]))
            if not keep:
                continue
            labels = batch["labels"].numpy()[keep]
            ignore = batch["difficult"].numpy()[keep]
            accumulator.update(logits, labels, ignore=ignore)
            if keeper:
                keeper.add(batch["filename"].numpy()[keep], logits, labels, ignore)
    result = _result(accumulator, threshold, None, None)
    result.num_skipped = skipped + counter.skipped
    result.scores = keeper.arrays() if keeper else None
    if result.num_skipped:
        logging.warning("%d undecodable records skipped.", result.num_skipped)
    return result


def _batches(dataset, max_steps):
    """The dataset's batches (at most max_steps, 0 = all)."""
    for step, batch in enumerate(dataset):
        if max_steps and step >= max_steps:
            return
        yield batch


def _result(accumulator, threshold, samples, skip_counter):
    if accumulator.num_examples == 0:
        raise ValueError("the evaluation data yielded no decodable image.")
    values = accumulator.result(threshold=threshold)
    per_class_ap = values.pop("AP")
    skipped = skip_counter.skipped if skip_counter is not None else 0
    return EvalResult(metrics=values, per_class_ap=list(per_class_ap),
                      num_examples=accumulator.num_examples, num_skipped=skipped,
                      samples=samples)

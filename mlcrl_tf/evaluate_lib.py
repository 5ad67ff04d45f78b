"""Evaluation of a model, a training run's checkpoint or an export.

`evaluate_model` (a live model on a `make_dataset` pipeline; the training
loop's per-epoch evaluation), `evaluate_saved_model` (an export's
`serving_default` on the records' original image bytes, i.e. exactly what a
TF Serving client gets) and `evaluate_target` (what the `mlcrl_tf.evaluate`
command line asks for) return an `EvalResult`; `format_report` renders the
paper's Table 1 row (mAP, CF1, CP, CR, OF1, OP, OR and their top-3 versions)
and Table 2 per-class AP. Metrics are `mlcrl_tf.metrics` with the
conventions of SPEC §6; VOC "difficult" labels are ignored.

Scores are ranked and thresholded as LOGITS (`metrics.*(from_logits=True)`):
float32 probabilities saturate at 1.0 for logits >= 16.6 and would flatten
the ranking. `write_json` writes the metrics (a NaN, e.g. the AP of a class
without positives, as null: strict JSON); `write_scores` saves every image's
filename, logits, labels and difficult mask to a NumPy .npz file for further
analysis.
"""

import dataclasses
import io
import json
import math
import weakref

from absl import logging
import numpy as np
import tensorflow as tf

from mlcrl_tf import checkpoints
from mlcrl_tf import data as data_lib
from mlcrl_tf import metrics as metrics_lib
from mlcrl_tf import serving
from pipelines.tfdata import skip_counts
from pipelines.tfdata import record_stream
from pipelines.tfdata import tfds_source
from pipelines.records import label_maps
from pipelines.records import shard_sets
from pipelines.tfdata import input_pipeline


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
            images of each batch (e.g. a `pipelines.progress.Progress`).

    Returns:
        An `EvalResult`.
    """
    predict = _predict_function(model)
    accumulator = metrics_lib.MetricAccumulator(num_classes, from_logits=True)
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
        progress: optional `pipelines.progress.Progress`.

    Returns:
        An `EvalResult`.
    """
    dataset = strategy.distribute_datasets_from_function(dataset_fn)
    gathered = _gather_function(model, strategy)
    accumulator = metrics_lib.MetricAccumulator(num_classes, from_logits=True)
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
        saved_model: an export directory, or its loaded `serving.ExportClient`.
        file_pattern: glob of shards, or `tfds:NAME:SPLIT`.
        num_classes: C.
        threshold: probability threshold; default the export's own.
        batch_size, max_steps, keep_scores, progress: as `evaluate_model`.
        data_dir: TensorFlow Datasets' data directory for a `tfds:` source.

    Returns:
        An `EvalResult` (without samples).
    """
    client = (saved_model if isinstance(saved_model, serving.ExportClient)
              else serving.ExportClient(saved_model))
    threshold = client.threshold if threshold is None else threshold
    counter = skip_counts.SkipCounter()
    dataset = input_pipeline.make_record_dataset(file_pattern, batch_size, num_classes,
                                                 data_dir=data_dir, skip_counter=counter)
    accumulator = metrics_lib.MetricAccumulator(num_classes, from_logits=True)
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


def format_result_line(metrics, epoch=None, improved=False):
    """One log line with the headline numbers (percent)."""
    head = f"Eval after epoch {epoch}: " if epoch is not None else "Eval: "
    line = head + " ".join(f"{k} {100 * metrics[k]:.1f}"
                           for k in ("mAP", "CF1", "OF1", "CF1_top3", "OF1_top3"))
    return line + (" (best so far)" if improved else "")


def format_report(result, class_names, name, per_class=False):
    """The Table 1 row (and Table 2 per-class AP row) as Markdown."""
    text = metrics_lib.format_table({name: result.metrics})
    if per_class:
        text += "\n\n" + metrics_lib.format_per_class_ap(
            result.per_class_ap, class_names, method=name)
    return text


def class_names_for(eval_files, labels_file=None):
    """Class names from `labels_file`, else labels.txt beside the shards (or None)."""
    if labels_file:
        return label_maps.read_class_names(labels_file)
    if tfds_source.is_tfds(eval_files):
        return None  # checked against the run's by data.resolve_data at training
    return label_maps.class_names_for_shards(shard_sets.find_shards(eval_files))


def evaluate_target(model_dir=None, saved_model=None, eval_files=None, checkpoint=None,
                    best=False, use_ema=True, labels_file=None, batch_size=32,
                    max_steps=0, threshold=None, keep_scores=False, progress=None,
                    data_dir=None):
    """Evaluates a training run (a checkpoint of it) or an export.

    Args:
        model_dir: a training run's directory (its run.json gives the model,
            the default eval files, threshold and data_dir).
        saved_model: an export version directory, evaluated instead of a
            checkpoint (model_dir then optional).
        eval_files: glob of evaluation shards (or `tfds:NAME:SPLIT`); default
            the run's.
        checkpoint, best, use_ema: which weights of the run (see
            `checkpoints.restore_model`).
        labels_file: class names for an export without model_dir.
        batch_size, max_steps: evaluation batches.
        threshold: probability threshold in (0, 1); default the export's
            own for an export, else the run's.
        keep_scores: keep every image's logits (`EvalResult.scores`).
        progress: optional `pipelines.progress.Progress`: started with the
            number of records to evaluate, then told each batch's images.
        data_dir: TensorFlow Datasets' data directory for a `tfds:` source;
            default the run's.

    Returns:
        (EvalResult, class_names, a name for the report).

    Raises:
        ValueError: nothing to evaluate, no eval files, a threshold outside
            (0, 1), or bad data.
    """
    if not model_dir and not saved_model:
        raise ValueError("give --model_dir (a training run) or --saved_model (an export).")
    if threshold is not None and (isinstance(threshold, bool)
                                  or not 0.0 < threshold < 1.0):
        raise ValueError(f"--threshold: threshold must be in (0, 1), got {threshold!r}.")
    config = class_names = None
    if model_dir:
        config, class_names = checkpoints.read_run(model_dir)
    eval_files = eval_files or (config.eval_files if config else None)
    if not eval_files:
        raise ValueError("--eval_files is empty and the run has no --eval_files.")
    data_names = class_names_for(eval_files, labels_file)
    options = {"batch_size": batch_size, "max_steps": max_steps, "threshold": threshold,
               "keep_scores": keep_scores, "progress": progress,
               "data_dir": data_dir or (config.data_dir if config else None)}
    if saved_model:
        client = serving.ExportClient(saved_model)
        data_lib.check_same_classes(data_names, client.class_names,
                                    f"--eval_files={eval_files!r}", f"the export {saved_model}")
        data_lib.check_same_classes(class_names, client.class_names,
                                    f"--model_dir={model_dir!r}", f"the export {saved_model}")
        _start(progress, eval_files, batch_size, max_steps)
        result = evaluate_saved_model(client, eval_files, len(client.class_names),
                                      **options)
        return result, client.class_names, saved_model
    data_lib.check_same_classes(data_names, class_names, f"--eval_files={eval_files!r}",
                                f"{model_dir}/run.json")
    return _evaluate_checkpoint(model_dir, (checkpoint, best, use_ema), eval_files,
                                options)


def _evaluate_checkpoint(model_dir, weights, eval_files, options):
    """`evaluate_target` on a run's checkpoint; `weights` is (checkpoint,
    best, use_ema), `options` evaluate_saved_model's keyword arguments."""
    model, config, class_names, path = checkpoints.restore_model(model_dir, *weights)
    counter = skip_counts.SkipCounter()
    dataset = input_pipeline.make_dataset(
        eval_files, options["batch_size"], config.image_size, config.num_classes,
        training=False, skip_counter=counter, data_dir=options["data_dir"],
        antialias=config.antialias, max_pixels=config.max_image_pixels)
    _start(options["progress"], eval_files, options["batch_size"], options["max_steps"])
    threshold = config.threshold if options["threshold"] is None else options["threshold"]
    result = evaluate_model(model, dataset, config.num_classes, threshold,
                            options["max_steps"], skip_counter=counter,
                            keep_scores=options["keep_scores"], progress=options["progress"])
    return result, class_names, f"{config.variant} ({path})"


def _start(progress, eval_files, batch_size, max_steps):
    """Starts `progress` with the number of records the evaluation reads."""
    if progress is None:
        return
    if tfds_source.is_tfds(eval_files):
        progress.start()  # TFDS split sizes are not counted here
        return
    total = shard_sets.count_records(shard_sets.find_shards(eval_files))
    progress.start(total=min(total, max_steps * batch_size) if max_steps else total)


def _json_number(value):
    """A float, or None for NaN and the infinities (which JSON cannot hold)."""
    value = float(value)
    return value if math.isfinite(value) else None


def write_json(result, class_names, name, path):
    """Writes the metrics and per-class AP as strict JSON (NaN as null)."""
    payload = {"name": name, "num_examples": result.num_examples,
               "num_skipped": result.num_skipped,
               "metrics": {k: _json_number(v) for k, v in result.metrics.items()},
               "per_class_ap": {c: _json_number(v)
                                for c, v in zip(class_names, result.per_class_ap)}}
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(payload, indent=2, allow_nan=False))


def write_scores(result, class_names, path):
    """Writes every image's filename, logits, labels and difficult mask (.npz)."""
    buffer = io.BytesIO()
    np.savez(buffer, class_names=np.array(class_names), **result.scores)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())

"""Evaluates a checkpoint or an export and prints the paper's tables.

    python -m mlcrl_tf.evaluate --model_dir=runs/demo \
        --eval_files='data/demo/tfrecords/test-*.tfrecord' [--best | --checkpoint=PREFIX] \
        [--saved_model=saved_models/demo/1] [--per_class] [--output_json=eval.json] \
        [--output_scores=scores.npz]

Prints the Table 1 row (mAP, CF1, CP, CR, OF1, OP, OR and their top-3
versions) and, with --per_class, the Table 2 row of per-class AP. Metrics
are `mlcrl_tf.metrics` with the conventions of SPEC §6; VOC "difficult"
labels are ignored. With --saved_model the export's `serving_default`
signature is evaluated on the records' original image bytes, i.e. exactly
what a TF Serving client would get.

Scores are ranked and thresholded as LOGITS (`metrics.*(from_logits=True)`):
float32 probabilities saturate at 1.0 for logits >= 16.6 and would flatten
the ranking. `--output_scores` writes every image's filename, logits, labels
and difficult mask to a NumPy .npz file for further analysis.
"""

import dataclasses
import io
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

from mlcrl_tf import checkpoints
from mlcrl_tf import metrics as metrics_lib
from pipelines import input_pipeline
from pipelines import tfrecord_lib


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


def evaluate_model(model, dataset, num_classes, threshold=0.5, max_steps=0,
                   num_samples=0, skip_counter=None, keep_scores=False):
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

    Returns:
        An `EvalResult`.
    """
    predict = tf.function(
        lambda images: tf.cast(model.inference_model(images, training=False), tf.float32),
        reduce_retracing=True)
    accumulator = metrics_lib.MetricAccumulator(num_classes, from_logits=True)
    keeper = _ScoreKeeper() if keep_scores else None
    samples = None
    for step, batch in enumerate(dataset):
        if max_steps and step >= max_steps:
            break
        logits = predict(batch["images"]).numpy()
        labels, difficult = batch["labels"].numpy(), batch["difficult"].numpy()
        accumulator.update(logits, labels, ignore=difficult)
        if keeper:
            keeper.add(batch["filename"].numpy(), logits, labels, difficult)
        if num_samples:
            samples = _take_samples(samples, batch, logits, num_samples)
    result = _result(accumulator, threshold, samples, skip_counter)
    result.scores = keeper.arrays() if keeper else None
    return result


def evaluate_saved_model(saved_model_dir, file_pattern, num_classes, threshold=0.5,
                         batch_size=32, max_steps=0, keep_scores=False):
    """Evaluates an export's `serving_default` on the records' image bytes.

    Ranks its `logits` output (not the saturating float32 `probabilities`).

    Returns:
        An `EvalResult` (without samples).
    """
    loaded = tf.saved_model.load(saved_model_dir)
    serve = loaded.signatures["serving_default"]
    files = tfrecord_lib.find_shards(file_pattern)
    dataset = tf.data.TFRecordDataset(files).map(
        lambda record: input_pipeline.decode_example(record, num_classes),
        num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    accumulator = metrics_lib.MetricAccumulator(num_classes, from_logits=True)
    keeper = _ScoreKeeper() if keep_scores else None
    skipped = 0
    for step, batch in enumerate(dataset):
        if max_steps and step >= max_steps:
            break
        labels, ignore = batch["labels"].numpy(), batch["difficult"].numpy()
        filenames = batch["filename"].numpy()
        try:
            logits = serve(image_bytes=batch["image_bytes"])["logits"].numpy()
        except tf.errors.InvalidArgumentError:
            # The export refuses a whole request with an undecodable image:
            # score this batch image by image and skip (and count) the bad ones.
            keep, rows = [], []
            for i, image_bytes in enumerate(batch["image_bytes"]):
                try:
                    rows.append(serve(image_bytes=image_bytes[None])["logits"][0])
                    keep.append(i)
                except tf.errors.InvalidArgumentError:
                    skipped += 1
            if not keep:
                continue
            logits = np.stack([r.numpy() for r in rows])
            labels, ignore, filenames = labels[keep], ignore[keep], filenames[keep]
        accumulator.update(logits, labels, ignore=ignore)
        if keeper:
            keeper.add(filenames, logits, labels, ignore)
    result = _result(accumulator, threshold, None, None)
    result.num_skipped = skipped
    result.scores = keeper.arrays() if keeper else None
    if skipped:
        logging.warning("%d undecodable records skipped.", skipped)
    return result


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


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------

def define_flags():
    """The CLI's flags (defined only when run as a program, so that the
    training loop can import this module next to its own flags)."""
    flags.DEFINE_string("model_dir", None, "A training run's directory.")
    flags.DEFINE_string("eval_files", None, "Glob of evaluation TFRecord shards; default "
                        "the run's --eval_files.")
    flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default the latest.")
    flags.DEFINE_bool("best", False, "Evaluate the best-by-mAP checkpoint.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
    flags.DEFINE_string("saved_model", None, "Evaluate this export (a version dir) instead "
                        "of a checkpoint; --model_dir is then optional.")
    flags.DEFINE_string("labels_file", None, "Class names for --saved_model without "
                        "--model_dir; default labels.txt beside the shards.")
    flags.DEFINE_integer("batch_size", 32, "Evaluation batch size.")
    flags.DEFINE_integer("max_steps", 0, "Evaluate at most this many batches (0 = all).")
    flags.DEFINE_float("threshold", None, "Probability threshold; default the run's (0.5).")
    flags.DEFINE_bool("per_class", False, "Also print per-class AP (Table 2 layout).")
    flags.DEFINE_string("output_json", None, "Write metrics and per-class AP here.")
    flags.DEFINE_string("output_scores", None, "Write every image's filename, logits, "
                        "labels and difficult mask here (NumPy .npz).")


FLAGS = flags.FLAGS


def _class_names_for(eval_files):
    path = FLAGS.labels_file or os.path.join(
        os.path.dirname(tfrecord_lib.find_shards(eval_files)[0]),
        tfrecord_lib.LABELS_FILENAME)
    return tfrecord_lib.read_class_names(path)


def run(argv):
    """Evaluates what the flags name; returns (EvalResult, class names, name)."""
    del argv
    if not FLAGS.model_dir and not FLAGS.saved_model:
        raise ValueError("give --model_dir (a training run) or --saved_model (an export).")
    config = class_names = None
    if FLAGS.model_dir:
        config, class_names = checkpoints.read_run(FLAGS.model_dir)
    eval_files = FLAGS.eval_files or (config.eval_files if config else None)
    if not eval_files:
        raise ValueError("--eval_files is empty and the run has no --eval_files.")
    threshold = FLAGS.threshold or (config.threshold if config else 0.5)
    if FLAGS.saved_model:
        class_names = class_names or _class_names_for(eval_files)
        result = evaluate_saved_model(FLAGS.saved_model, eval_files, len(class_names),
                                      threshold, FLAGS.batch_size, FLAGS.max_steps,
                                      keep_scores=bool(FLAGS.output_scores))
        return result, class_names, FLAGS.saved_model
    model, config, class_names, path = checkpoints.restore_model(
        FLAGS.model_dir, FLAGS.checkpoint, FLAGS.best, FLAGS.use_ema)
    counter = input_pipeline.SkipCounter()
    dataset = input_pipeline.make_dataset(
        eval_files, FLAGS.batch_size, config.image_size, config.num_classes,
        config.backbone, training=False, skip_counter=counter)
    result = evaluate_model(model, dataset, config.num_classes, threshold,
                            FLAGS.max_steps, skip_counter=counter,
                            keep_scores=bool(FLAGS.output_scores))
    return result, class_names, f"{config.variant} ({path})"


def main(argv):
    try:
        result, class_names, name = run(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"{name}: {result.num_examples} images"
          + (f", {result.num_skipped} undecodable skipped" if result.num_skipped else ""))
    print(format_report(result, class_names, name, FLAGS.per_class))
    if FLAGS.output_json:
        payload = {"name": name, "num_examples": result.num_examples,
                   "num_skipped": result.num_skipped, "metrics": result.metrics,
                   "per_class_ap": dict(zip(class_names, result.per_class_ap))}
        with tf.io.gfile.GFile(FLAGS.output_json, "w") as f:
            f.write(json.dumps(payload, indent=2))
        logging.info("Wrote %s", FLAGS.output_json)
    if FLAGS.output_scores:
        buffer = io.BytesIO()
        np.savez(buffer, class_names=np.array(class_names), **result.scores)
        with tf.io.gfile.GFile(FLAGS.output_scores, "wb") as f:
            f.write(buffer.getvalue())
        logging.info("Wrote %s", FLAGS.output_scores)


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""What `mlcrl_tf.evaluate` asks for: a run's checkpoint or an export, its
reports, and its JSON and .npz outputs (written whole or not at all).
"""

import io

import numpy as np

from mlcrl_tf.evaluation import evaluator
from mlcrl_tf.evaluation import tables
from mlcrl_tf.run_dir import restore
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.serving import export_client
from pipelines.records import label_maps
from pipelines.records import shard_sets
from pipelines.tfdata import input_pipeline
from pipelines.tfdata import skip_counts
from pipelines.tfdata import tfds_source
from pipelines.utils import files


def format_result_line(metrics, epoch=None, improved=False):
    """One log line with the headline numbers (percent)."""
    head = f"Eval after epoch {epoch}: " if epoch is not None else "Eval: "
    line = head + " ".join(f"{k} {100 * metrics[k]:.1f}"
                           for k in ("mAP", "CF1", "OF1", "CF1_top3", "OF1_top3"))
    return line + (" (best so far)" if improved else "")


def format_report(result, class_names, name, per_class=False):
    """The Table 1 row (and Table 2 per-class AP row) as Markdown."""
    text = tables.format_table({name: result.metrics})
    if per_class:
        text += "\n\n" + tables.format_per_class_ap(
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
            `restore.restore_model`).
        labels_file: class names for an export without model_dir.
        batch_size, max_steps: evaluation batches.
        threshold: probability threshold in (0, 1); default the export's
            own for an export, else the run's.
        keep_scores: keep every image's logits (`EvalResult.scores`).
        progress: optional `pipelines.utils.progress.Progress`: started with the
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
        config, class_names = run_files.read_run(model_dir)
    eval_files = eval_files or (config.eval_files if config else None)
    if not eval_files:
        raise ValueError("--eval_files is empty and the run has no --eval_files.")
    data_names = class_names_for(eval_files, labels_file)
    options = {"batch_size": batch_size, "max_steps": max_steps, "threshold": threshold,
               "keep_scores": keep_scores, "progress": progress,
               "data_dir": data_dir or (config.data_dir if config else None)}
    if saved_model:
        client = export_client.ExportClient(saved_model)
        label_maps.check_same_classes(data_names, client.class_names,
                                    f"--eval_files={eval_files!r}", f"the export {saved_model}")
        label_maps.check_same_classes(class_names, client.class_names,
                                    f"--model_dir={model_dir!r}", f"the export {saved_model}")
        _start(progress, eval_files, batch_size, max_steps)
        result = evaluator.evaluate_saved_model(client, eval_files, len(client.class_names),
                                      **options)
        return result, client.class_names, saved_model
    label_maps.check_same_classes(data_names, class_names, f"--eval_files={eval_files!r}",
                                f"{model_dir}/run.json")
    return _evaluate_checkpoint(model_dir, (checkpoint, best, use_ema), eval_files,
                                options)


def _evaluate_checkpoint(model_dir, weights, eval_files, options):
    """`evaluate_target` on a run's checkpoint; `weights` is (checkpoint,
    best, use_ema), `options` evaluate_saved_model's keyword arguments."""
    model, config, class_names, path = restore.restore_model(model_dir, *weights)
    counter = skip_counts.SkipCounter()
    dataset = input_pipeline.make_dataset(
        eval_files, options["batch_size"], config.image_size, config.num_classes,
        training=False, skip_counter=counter, data_dir=options["data_dir"],
        antialias=config.antialias, max_pixels=config.max_image_pixels)
    _start(options["progress"], eval_files, options["batch_size"], options["max_steps"])
    threshold = config.threshold if options["threshold"] is None else options["threshold"]
    result = evaluator.evaluate_model(model, dataset, config.num_classes, threshold,
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


def write_json(result, class_names, name, path):
    """Writes the metrics and per-class AP as strict JSON (NaN as null),
    whole or not at all."""
    payload = {"name": name, "num_examples": result.num_examples,
               "num_skipped": result.num_skipped, "metrics": result.metrics,
               "per_class_ap": dict(zip(class_names, result.per_class_ap))}
    files.write_atomically(path, files.strict_json(payload, indent=2))


def write_scores(result, class_names, path):
    """Writes every image's filename, logits, labels and difficult mask (.npz),
    whole or not at all."""
    buffer = io.BytesIO()
    np.savez(buffer, class_names=np.array(class_names), **result.scores)
    files.write_atomically(path, buffer.getvalue())

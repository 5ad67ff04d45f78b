"""Evaluates a checkpoint or an export and prints the paper's tables.

    python -m mlcrl_tf.evaluate --model_dir=runs/demo \
        --eval_files='data/demo/tfrecords/test-*.tfrecord' [--best | --checkpoint=PREFIX] \
        [--saved_model=saved_models/demo/1] [--per_class] [--output_json=eval.json] \
        [--output_scores=scores.npz] [--threshold=0.5] [--data_dir=TFDS_DATA_DIR]

The Table 1 row and, with --per_class, the Table 2 row (docs/design.md,
Metrics) on stdout; progress on stderr. The work is
`mlcrl_tf.evaluation.evaluate_lib`.
"""

import sys

from absl import app
from absl import flags
from absl import logging

from mlcrl_tf.evaluation import evaluate_lib
from pipelines.utils import console
from pipelines.utils import files
from pipelines.utils import output_checks
from pipelines.utils import progress


def define_flags():
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("model_dir", None, "A training run's directory.")
    flags.DEFINE_string("eval_files", None, "Glob of evaluation TFRecord shards; default "
                        "the run's --eval_files.")
    flags.DEFINE_string("checkpoint", None, "A checkpoint prefix; default the latest.")
    flags.DEFINE_bool("best", False, "Evaluate best/: the checkpoint with the highest mAP "
                      "on the run's --selection_files if it had them, else on its "
                      "--eval_files -- for COCO/VOC the test split, so its metrics "
                      "there are selected on the test set.")
    flags.DEFINE_bool("use_ema", True, "Use the EMA weights when the run kept them.")
    flags.DEFINE_string("saved_model", None, "Evaluate this export (a version dir) instead "
                        "of a checkpoint; --model_dir is then optional.")
    flags.DEFINE_string("labels_file", None, "Class names for --saved_model without "
                        "--model_dir; default labels.txt beside the shards.")
    flags.DEFINE_integer("batch_size", 32, "Evaluation batch size.")
    flags.DEFINE_integer("max_steps", 0, "Evaluate at most this many batches (0 = all).")
    flags.DEFINE_float("threshold", None, "Probability threshold in (0, 1); default the "
                       "export's own with --saved_model, else the run's.")
    flags.DEFINE_string("data_dir", None, "TensorFlow Datasets' data directory for a "
                        "tfds:NAME:SPLIT --eval_files; default the run's.")
    flags.DEFINE_bool("per_class", False, "Also print per-class AP (Table 2 layout).")
    flags.DEFINE_string("output_json", None, "Write metrics and per-class AP here.")
    flags.DEFINE_string("output_scores", None, "Write every image's filename, logits, "
                        "labels and difficult mask here (NumPy .npz).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    with progress.Progress(unit="images", description="eval") as bar:
        try:
            for flag in ("output_json", "output_scores"):
                if f[flag].value:
                    output_checks.ensure_output_file(f[flag].value, flag)
            result, class_names, name = evaluate_lib.evaluate_target(
                f.model_dir, f.saved_model, f.eval_files, f.checkpoint, f.best, f.use_ema,
                f.labels_file, f.batch_size, f.max_steps, f.threshold,
                keep_scores=bool(f.output_scores), progress=bar, data_dir=f.data_dir)
        except ValueError as e:
            sys.exit(f"error: {e}")
        except files.IO_ERRORS as e:
            sys.exit(f"error: {type(e).__name__}: {files.error_text(e)}")
    print(f"{name}: {result.num_examples} images"
          + (f", {result.num_skipped} undecodable skipped" if result.num_skipped else ""))
    print(evaluate_lib.format_report(result, class_names, name, f.per_class))
    try:
        if f.output_json:
            evaluate_lib.write_json(result, class_names, name, f.output_json)
            logging.info("Wrote %s", f.output_json)
        if f.output_scores:
            evaluate_lib.write_scores(result, class_names, f.output_scores)
            logging.info("Wrote %s", f.output_scores)
    except files.IO_ERRORS as e:
        sys.exit(f"error: cannot write the output (disk full?): {files.error_text(e)}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=console.parse_flags)

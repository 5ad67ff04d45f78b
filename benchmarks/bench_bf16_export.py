r"""python benchmarks/bench_bf16_export.py --model_dir=runs/demo \
    --eval_files='data/demo/tfrecords/test-*.tfrecord'

A bfloat16 serving model against the float32 one, from the same checkpoint
(`python -m mlcrl_tf.export --precision=mixed_bfloat16`): both exports score
the evaluation records through `serving_default` (encoded bytes in, as TF
Serving clients send them); prints the Table 1 mAP of each, the largest and
mean absolute logit difference, and the median latency of both
`serving_default` calls on one batch (interleaved, --runs calls each).
Run after `bash scripts/demo.sh` (which trains runs/demo).
"""

import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

from mlcrl_tf.evaluation import evaluator
from mlcrl_tf.serving import export_client
from mlcrl_tf.serving import export_lib  # noqa: E402  pylint: disable=wrong-import-position
from pipelines.tfdata import input_pipeline

flags.DEFINE_string("model_dir", "runs/demo", "A training run.")
flags.DEFINE_string("eval_files", "data/demo/tfrecords/test-*.tfrecord", "Evaluation shards.")
flags.DEFINE_integer("batch_size", 32, "Images per serving call.")
flags.DEFINE_integer("runs", 20, "Timed calls per export.")
FLAGS = flags.FLAGS
PRECISIONS = ("float32", "mixed_bfloat16")


def latency(clients, image_bytes):
    """Median seconds of one serving_default call per export, interleaved."""
    times = {p: [] for p in clients}
    for client in clients.values():
        client.outputs(image_bytes)  # warm-up
    for _ in range(FLAGS.runs):
        for precision, client in clients.items():
            start = time.perf_counter()
            client.outputs(image_bytes)
            times[precision].append(time.perf_counter() - start)
    return {p: statistics.median(t) for p, t in times.items()}


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as root:
        paths = {p: export_lib.export_from_model_dir(FLAGS.model_dir, os.path.join(root, p),
                                                     precision=p) for p in PRECISIONS}
        num_classes = len(export_client.ExportClient(paths["float32"]).class_names)
        results = {p: evaluator.evaluate_saved_model(path, FLAGS.eval_files, num_classes,
                                                        batch_size=FLAGS.batch_size,
                                                        keep_scores=True)
                   for p, path in paths.items()}
        batch = next(iter(input_pipeline.make_record_dataset(
            FLAGS.eval_files, FLAGS.batch_size, num_classes)))["image_bytes"].numpy()
        seconds = latency({p: export_client.ExportClient(path) for p, path in paths.items()},
                          list(batch))
    difference = np.abs(results["mixed_bfloat16"].scores["logits"]
                        - results["float32"].scores["logits"])
    print(f"Command: python benchmarks/bench_bf16_export.py --model_dir={FLAGS.model_dir} "
          f"--eval_files='{FLAGS.eval_files}' --batch_size={FLAGS.batch_size} "
          f"--runs={FLAGS.runs}\n")
    print("| export | images | mAP | serving_default ms (batch "
          f"{FLAGS.batch_size}) | time / float32 |\n|---|---:|---:|---:|---:|")
    for p in PRECISIONS:
        print(f"| {p} | {results[p].num_examples} | {100 * results[p].metrics['mAP']:.2f} | "
              f"{1000 * seconds[p]:.1f} | {seconds[p] / seconds['float32']:.3f} |")
    print(f"\n|logit difference|: max {difference.max():.4f}, mean {difference.mean():.4f}; "
          f"mAP difference {100 * (results['mixed_bfloat16'].metrics['mAP'] - results['float32'].metrics['mAP']):+.2f} points")  # noqa: E501


if __name__ == "__main__":
    app.run(main)

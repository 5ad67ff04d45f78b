r"""python benchmarks/bench_onnx.py --compare=onnx --backbone=small_cnn --image_size=96 \
    --num_classes=10 --runs=100 --warmup=10

The export's forward pass in three pairs (docs/serving.md §8 and §9), on
float images already at the model size, at each of `--batch_sizes`:

- `--compare=onnx`: the SavedModel's `serve_tensor` (TensorFlow) against the
  same model as ONNX (`mlcrl_tf.serving.onnx_export.convert`) in onnxruntime
  (CPU provider, default threads); also prints the largest logit difference.
- `--compare=bfloat16`: `serve_tensor` of a float32 export against a
  mixed_bfloat16 export of the same weights.
- `--compare=onednn`: one float32 export's `serve_tensor` in worker
  subprocesses with `TF_ENABLE_ONEDNN_OPTS=0` and `=1` (TensorFlow reads it
  when it loads), `--rounds` of each, alternating which goes first.

Random-init crl models: only the cost matters. In-process pairs are timed
call by call, alternating which goes first, so drift hits both alike; the
ratio is second / first of the medians, "paired" the median of per-call
ratios. Needs `pip install -e '.[onnx]'` for `--compare=onnx`.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mlcrl_tf.modeling import precision as precision_lib  # noqa: E402
from mlcrl_tf.modeling.model import build_model  # noqa: E402
from mlcrl_tf.serving import contract  # noqa: E402
from mlcrl_tf.serving import export_lib  # noqa: E402
from mlcrl_tf.serving import onnx_export  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("compare", "onnx", ["onnx", "bfloat16", "onednn"], "The pair to time.")
flags.DEFINE_string("backbone", "small_cnn", "Backbone.")
flags.DEFINE_integer("image_size", 96, "Square input side S.")
flags.DEFINE_integer("num_classes", 10, "Classes C.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("runs", 50, "Timed calls per runtime and batch size (per round).")
flags.DEFINE_integer("warmup", 5, "Untimed calls before timing.")
flags.DEFINE_integer("rounds", 4, "--compare=onednn: worker runs of each setting.")
flags.DEFINE_string("worker", None, "Internal: time this export's serve_tensor and exit.")


def _export(root, name, policy="float32", weights=None):
    """A random-init crl model (or one with `weights`) and its export's path."""
    keras.utils.set_random_seed(0)
    with precision_lib.dtype_policy(policy):
        model = build_model(FLAGS.num_classes, FLAGS.backbone, FLAGS.image_size, "crl",
                            backbone_weights=None)
    if weights is not None:
        model.set_weights(weights)
    names = [f"c{i}" for i in range(FLAGS.num_classes)]
    return model, export_lib.export_model(model, os.path.join(root, name), names)


def _serve_tensor(path):
    serve = tf.saved_model.load(path).signatures[contract.SERVE_TENSOR]
    return lambda x: serve(images=tf.constant(x))["logits"].numpy()


def _images(batch):
    rng = np.random.default_rng(batch)
    size = FLAGS.image_size
    return rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)


def _time_pair(first, second, x):
    """Medians (ms) of both, ratio second/first, paired ratio, max |difference|."""
    difference = float(np.max(np.abs(first(x) - second(x))))
    for _ in range(FLAGS.warmup):
        first(x), second(x)
    times = ([], [])
    for i in range(FLAGS.runs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for k in order:
            start = time.perf_counter()
            (first, second)[k](x)
            times[k].append(time.perf_counter() - start)
    a, b = (np.array(t) * 1e3 for t in times)
    return np.median(a), np.median(b), np.median(b) / np.median(a), np.median(b / a), difference


def _in_process_pair(root):
    if FLAGS.compare == "onnx":
        model, path = _export(root, "float32")
        session = onnx_export.session(onnx_export.convert(
            model.inference_model, contract.ServingInfo(
                tuple(f"c{i}" for i in range(FLAGS.num_classes)), FLAGS.backbone,
                FLAGS.image_size, 0.5, 1, "crl")))
        return ("savedmodel", "onnx"), _serve_tensor(path), (
            lambda x: onnx_export.run_logits(session, x, len(x)))
    model, path = _export(root, "float32")
    _, bf16_path = _export(root, "bfloat16", "mixed_bfloat16", model.get_weights())
    return ("float32", "bfloat16"), _serve_tensor(path), _serve_tensor(bf16_path)


def _worker(path):
    """Prints the serve_tensor call times (s) of each batch size as JSON."""
    run = _serve_tensor(path)
    out = {}
    for batch in map(int, FLAGS.batch_sizes):
        x = _images(batch)
        for _ in range(FLAGS.warmup):
            run(x)
        out[batch] = []
        for _ in range(FLAGS.runs):
            start = time.perf_counter()
            run(x)
            out[batch].append(time.perf_counter() - start)
    print(json.dumps(out))


def _onednn_rows(root):
    _, path = _export(root, "float32")
    times = {"0": {}, "1": {}}
    for r in range(FLAGS.rounds):
        for value in ("0", "1") if r % 2 == 0 else ("1", "0"):
            env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=value)
            args = [a for a in sys.argv[1:] if not a.startswith("--worker")]
            proc = subprocess.run([sys.executable, __file__, *args, f"--worker={path}"],
                                  env=env, capture_output=True, text=True, check=True)
            for batch, t in json.loads(proc.stdout.strip().splitlines()[-1]).items():
                times[value].setdefault(batch, []).extend(t)
    print("| batch | oneDNN off ms | oneDNN on ms | on/off |\n|---:|---:|---:|---:|")
    for batch in FLAGS.batch_sizes:
        off, on = (np.median(times[v][batch]) * 1e3 for v in ("0", "1"))
        print(f"| {batch} | {off:.1f} | {on:.1f} | {on / off:.3f} |")


def main(argv):
    del argv
    if FLAGS.worker:
        _worker(FLAGS.worker)
        return
    root = tempfile.mkdtemp()
    if FLAGS.compare == "onednn":
        _onednn_rows(root)
        return
    names, first, second = _in_process_pair(root)
    print(f"| batch | {names[0]} ms | {names[1]} ms | {names[1]}/{names[0]} | paired | "
          "max abs logit diff |\n|---:|---:|---:|---:|---:|---:|")
    for batch in map(int, FLAGS.batch_sizes):
        a, b, ratio, paired, difference = _time_pair(first, second, _images(batch))
        print(f"| {batch} | {a:.1f} | {b:.1f} | {ratio:.3f} | {paired:.3f} | "
              f"{difference:.2g} |")


if __name__ == "__main__":
    app.run(main)

r"""python benchmarks/bench_serving.py --backbone=resnet101 --image_size=448 --num_classes=80 \
    --runs=15

Serving cost of the paper's model against its baseline (the claim of SPEC §1:
at test time crl = baseline + one 1x1 conv `f_conv` of D x C weights), or
with `--compare=jit_compile` of an XLA-compiled export (`--jit_compile`)
against the plain one (the same crl model exported twice).

In one run it builds a `crl` and a `baseline` model (same backbone, size and
class count, random init: only the cost matters), exports both with
`mlcrl_tf.export_lib.export_model`, reloads them with `tf.saved_model.load` and
times their signatures:

- `serve_tensor` on float images already at model size (the model alone,
  plus the in-graph normalisation), at each of `--batch_sizes`;
- with `--jpeg`, `serving_default` on JPEG bytes of scikit-learn's two real
  427x640 sample photos (decode + resize + model), at each batch size.

Latency is the median over `--runs` timed calls after `--warmup` calls per
model; each round calls both models back to back, alternating which goes
first, so drift (other processes, CPU clocks) hits both alike. The ratio
column is crl / baseline of the medians; "paired" is the median of the
per-round ratios (first / second of the pair: crl / baseline, or xla /
no_xla). Throughput is images / median latency. The exported parameter
counts come from each SavedModel's checkpoint.
Ends with a Markdown summary to paste into docs/serving.md.
"""

import io
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import tensorflow as tf  # noqa: E402

from mlcrl_tf.modeling.model import build_model  # noqa: E402
from mlcrl_tf.serving import export_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("backbone", "resnet101", "Backbone of both models.")
flags.DEFINE_integer("image_size", 448, "Square input side S.")
flags.DEFINE_integer("num_classes", 80, "Classes C (COCO: 80).")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("runs", 15, "Timed calls per model, batch size and signature.")
flags.DEFINE_integer("warmup", 3, "Untimed calls per model before timing.")
flags.DEFINE_bool("jpeg", True, "Also time serving_default on JPEG bytes.")
flags.DEFINE_string("export_dir", None, "Where to export; default a temporary directory.")
flags.DEFINE_enum("compare", "variant", ["variant", "jit_compile"],
                  "variant: crl vs baseline; jit_compile: the crl model exported with "
                  "jit_compile=True (xla) vs False (no_xla).")

# The pair timed, by --compare: name -> (variant, jit_compile).
PAIRS = {"variant": {"crl": ("crl", False), "baseline": ("baseline", False)},
         "jit_compile": {"xla": ("crl", True), "no_xla": ("crl", False)}}


def sample_photos():
    """scikit-learn's two real 427x640 photos as uint8 RGB arrays."""
    from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
    return [np.asarray(image, np.uint8) for image in load_sample_images().images]


def make_inputs(batch_size, image_size, photos):
    """serve_tensor's float batch and serving_default's JPEG batch."""
    resized = [np.asarray(Image.fromarray(p).resize((image_size, image_size),
                                                    Image.BILINEAR), np.float32)
               for p in photos]
    jpegs = []
    for photo in photos:
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    pick = [i % len(photos) for i in range(batch_size)]
    return (tf.constant(np.stack([resized[i] for i in pick])),
            tf.constant([jpegs[i] for i in pick]))


def exported_parameters(path):
    prefix = os.path.join(path, "variables", "variables")
    return sum(int(np.prod(shape)) for name, shape in tf.train.list_variables(prefix)
               if not name.startswith("_CHECKPOINTABLE_OBJECT_GRAPH"))


def time_pair(functions, inputs, runs, warmup):
    """Interleaved timing of {variant: fn}; returns {variant: [seconds]}."""
    def call(fn):
        start = time.perf_counter()
        fn(**inputs)["probabilities"].numpy()
        return time.perf_counter() - start

    for fn in functions.values():
        for _ in range(warmup):
            call(fn)
    times = {name: [] for name in functions}
    names = list(functions)
    for r in range(runs):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(call(functions[name]))
    return times


def export_pair(pair, root, names):
    """Exports each configuration of `pair`; returns ({name: loaded}, {name: params})."""
    loaded, params, models = {}, {}, {}
    for name, (variant, jit) in pair.items():
        if variant not in models:
            models = {variant: build_model(FLAGS.num_classes, FLAGS.backbone,
                                           FLAGS.image_size, variant)}
        start = time.perf_counter()
        path = export_lib.export_model(models[variant], os.path.join(root, name), names,
                                       jit_compile=jit)
        print(f"exported {name} to {path} in {time.perf_counter() - start:.1f} s")
        loaded[name] = tf.saved_model.load(path)
        params[name] = exported_parameters(path)
    return loaded, params


def main(argv):
    del argv
    batch_sizes = [int(b) for b in FLAGS.batch_sizes]
    root = FLAGS.export_dir or tempfile.mkdtemp(prefix="bench_serving_")
    names = [f"class_{i}" for i in range(FLAGS.num_classes)]
    pair = PAIRS[FLAGS.compare]
    first, second = pair
    loaded, params = export_pair(pair, root, names)
    photos = sample_photos()
    signatures = [("serve_tensor", "images")]
    if FLAGS.jpeg:
        signatures.append(("serving_default", "image_bytes"))
    rows = []
    for batch_size in batch_sizes:
        tensors, jpegs = make_inputs(batch_size, FLAGS.image_size, photos)
        for signature, key in signatures:
            inputs = {key: tensors if key == "images" else jpegs}
            times = time_pair({v: loaded[v].signatures[signature] for v in pair},
                              inputs, FLAGS.runs, FLAGS.warmup)
            median = {v: statistics.median(times[v]) for v in pair}
            paired = statistics.median(a / b for a, b in zip(times[first], times[second]))
            row = {"signature": signature, "batch": batch_size,
                   "first_ms": 1e3 * median[first], "second_ms": 1e3 * median[second],
                   "ratio": median[first] / median[second], "paired": paired,
                   "first_ips": batch_size / median[first],
                   "second_ips": batch_size / median[second]}
            rows.append(row)
            print(f"{signature:16s} B={batch_size:<3d} {first} {row['first_ms']:9.2f} ms  "
                  f"{second} {row['second_ms']:9.2f} ms  ratio {row['ratio']:.3f}  "
                  f"paired {paired:.3f}", flush=True)
    print()
    print(f"### Serving cost, {first} vs {second} ({FLAGS.backbone}, {FLAGS.image_size}x"
          f"{FLAGS.image_size}, C={FLAGS.num_classes}, {FLAGS.runs} runs, "
          f"{os.cpu_count()} CPU threads visible, TF {tf.__version__})")
    print()
    if FLAGS.compare == "variant":
        d_times_c = params["crl"] - params["baseline"]
        print(f"Exported parameters: crl {params['crl']:,}, baseline "
              f"{params['baseline']:,} (+{d_times_c:,} = f_conv's D x C + C; "
              f"+{100 * d_times_c / params['baseline']:.2f}%).")
        print()
    print(f"| signature | batch | {first} ms | {second} ms | {first}/{second} | paired ratio "
          f"| {first} img/s | {second} img/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['signature']} | {r['batch']} | {r['first_ms']:.1f} | "
              f"{r['second_ms']:.1f} | {r['ratio']:.3f} | {r['paired']:.3f} | "
              f"{r['first_ips']:.1f} | {r['second_ips']:.1f} |")


if __name__ == "__main__":
    app.run(main)

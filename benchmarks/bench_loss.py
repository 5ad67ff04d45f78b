"""python benchmarks/bench_loss.py --batch=32 --classes=80 --dim=80 --repeats=20

Measures the constrained ranking loss (CRL), forward + backward (gradients
with respect to both embeddings), at COCO scale:

(a) the vectorised `mlcrl_tf.losses.constrained_ranking_loss`, eagerly and
    inside `tf.function`;
(b) a naive port that loops in Python over (b, j, k) and (b, p, q, k) and
    builds the loss from TF ops under a `GradientTape`. It is slow, so it runs
    on the first `--naive_images` images only and its time is extrapolated
    linearly in the number of valid triplets (its cost per triplet is
    constant: every triplet builds the same handful of ops). The output says
    so. `--naive_images=0` runs it on the whole batch instead.

Peak memory of the vectorised forward + backward is measured in a fresh
subprocess started with `TF_CPU_ALLOCATOR_USE_BFC=true`: with TensorFlow's
default CPU allocator `tf.config.experimental.get_memory_info('CPU:0')`
reports zeros, with the BFC allocator it reports the peak bytes of tensors
TensorFlow allocated (after `reset_memory_stats`, minus the inputs). If it
still reports zeros the script falls back to the growth of peak RSS
(`resource.getrusage`) and says so.

Labels are COCO-like: each image has 1 + Poisson(`--positives` − 1)
distinct positive classes (COCO averages 2.9 per image).
Ends with a Markdown summary to paste into the docs.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from mlcrl_tf.modeling import losses

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "Images per batch B.")
flags.DEFINE_integer("classes", 80, "Classes C.")
flags.DEFINE_integer("dim", 80, "Embedding dimension E.")
flags.DEFINE_float("positives", 2.9, "Mean positive labels per image (COCO: 2.9).")
flags.DEFINE_integer("repeats", 20, "Timed repeats of the vectorised loss.")
flags.DEFINE_integer("naive_images", 8,
                     "Images the naive loop runs on (0 = the whole batch).")
flags.DEFINE_integer("naive_repeats", 1, "Timed repeats of the naive loop.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_enum("mode", "all", ["all", "memory"],
                  "`memory` is the internal subprocess mode.")


def make_inputs(batch, classes, dim, positives, seed):
    """Random COCO-like labels and embeddings; every image has a positive."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((batch, classes), np.float32)
    counts = 1 + rng.poisson(max(positives - 1.0, 0.0), batch)
    for row, count in zip(labels, np.minimum(counts, classes)):
        row[rng.choice(classes, count, replace=False)] = 1.0
    fe = rng.normal(size=(batch, dim)).astype(np.float32)
    emb = rng.normal(size=(classes, dim)).astype(np.float32)
    return labels, tf.constant(fe), tf.constant(emb)


def vectorised_step(labels, fe, emb):
    """Forward + backward of the vectorised loss."""
    with tf.GradientTape() as tape:
        tape.watch([fe, emb])
        value = losses.constrained_ranking_loss(labels, fe, emb)
    return value, tape.gradient(value, [fe, emb])


def naive_step(labels, fe, emb, margin=0.5, image_weight=0.5, label_weight=0.5):
    """Forward + backward of a naive per-triplet port (mean reduction)."""
    labels = np.asarray(labels)
    with tf.GradientTape() as tape:
        tape.watch([fe, emb])
        image_terms, label_terms = [], []
        for b in range(labels.shape[0]):
            pos = np.flatnonzero(labels[b] == 1)
            neg = np.flatnonzero(labels[b] == 0)
            for j in pos:
                for k in neg:
                    d_pos = tf.norm(fe[b] - emb[j])
                    d_neg = tf.norm(fe[b] - emb[k])
                    image_terms.append(tf.nn.relu(margin + d_pos - d_neg))
            for p in pos:
                for q in pos:
                    if q == p:
                        continue
                    for k in neg:
                        d_pos = tf.norm(emb[p] - emb[q])
                        d_neg = tf.norm(emb[p] - emb[k])
                        label_terms.append(tf.nn.relu(margin + d_pos - d_neg))
        image_term = tf.add_n(image_terms) / len(image_terms) if image_terms else 0.0
        label_term = tf.add_n(label_terms) / len(label_terms) if label_terms else 0.0
        value = image_weight * image_term + label_weight * label_term
    return value, tape.gradient(value, [fe, emb])


def num_triplets(labels):
    pos = labels.sum(axis=1)
    neg = labels.shape[1] - pos
    return int((pos * neg).sum() + (pos * (pos - 1) * neg).sum())


def time_it(fn, repeats, warmup=2):
    """Median wall time (s) of `fn()` over `repeats` runs after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value, grads = fn()
        _ = value.numpy(), [g.numpy() for g in grads]  # force execution
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_bytes(fn):
    """Peak TF-allocator bytes of `fn()` above what was allocated before."""
    tf.config.experimental.reset_memory_stats("CPU:0")
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    value, grads = fn()
    _ = value.numpy(), [g.numpy() for g in grads]
    return tf.config.experimental.get_memory_info("CPU:0")["peak"] - before


def measure_memory():
    """Subprocess body: prints the peak memory of one forward+backward."""
    tiny = make_inputs(2, 3, 2, 1.0, 1)
    vectorised_step(*tiny)  # one-time initialisation, not counted
    inputs = make_inputs(FLAGS.batch, FLAGS.classes, FLAGS.dim, FLAGS.positives,
                         FLAGS.seed)
    compiled = tf.function(vectorised_step)
    compiled(*tiny)
    if tf.config.experimental.get_memory_info("CPU:0")["peak"] > 0:
        result = {
            "method": "TF BFC allocator peak (get_memory_info('CPU:0'))",
            "eager_bytes": _peak_bytes(lambda: vectorised_step(*inputs)),
            "graph_bytes": _peak_bytes(lambda: compiled(*inputs)),
        }
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        value, grads = vectorised_step(*inputs)
        _ = value.numpy(), [g.numpy() for g in grads]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = {"method": "peak-RSS growth (resource.getrusage), a lower bound",
                  "eager_bytes": (after - before) * 1024, "graph_bytes": None}
    print(json.dumps(result))


def run_memory_subprocess():
    cmd = [sys.executable, os.path.abspath(__file__), "--mode=memory",
           f"--batch={FLAGS.batch}", f"--classes={FLAGS.classes}",
           f"--dim={FLAGS.dim}", f"--positives={FLAGS.positives}",
           f"--seed={FLAGS.seed}"]
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.mode == "memory":
        measure_memory()
        return
    b, c, e = FLAGS.batch, FLAGS.classes, FLAGS.dim
    labels, fe, emb = make_inputs(b, c, e, FLAGS.positives, FLAGS.seed)
    total_triplets = num_triplets(labels)
    print(f"CRL forward+backward, B={b} C={c} E={e}, "
          f"{labels.sum(axis=1).mean():.2f} positives/image, "
          f"{total_triplets} valid triplets; {len(os.sched_getaffinity(0))} CPU cores "
          f"usable, TensorFlow {tf.__version__}")

    eager_s = time_it(lambda: vectorised_step(labels, fe, emb), FLAGS.repeats)
    compiled = tf.function(vectorised_step)
    graph_s = time_it(lambda: compiled(labels, fe, emb), FLAGS.repeats)
    print(f"vectorised, eager:       {eager_s * 1e3:9.2f} ms (median of {FLAGS.repeats})")
    print(f"vectorised, tf.function: {graph_s * 1e3:9.2f} ms (median of {FLAGS.repeats})")

    sub = b if FLAGS.naive_images <= 0 else min(FLAGS.naive_images, b)
    sub_labels, sub_fe = labels[:sub], fe[:sub]
    sub_triplets = num_triplets(sub_labels)
    naive_value, _ = naive_step(sub_labels, sub_fe, emb)
    check = losses.constrained_ranking_loss(sub_labels, sub_fe, emb)
    agree = abs(float(naive_value) - float(check)) <= 1e-5 * max(1.0, abs(float(check)))
    naive_sub_s = time_it(lambda: naive_step(sub_labels, sub_fe, emb),
                          FLAGS.naive_repeats, warmup=0)
    naive_s = naive_sub_s * total_triplets / sub_triplets
    how = ("measured" if sub == b else
           f"EXTRAPOLATED from {sub} images ({sub_triplets} triplets, "
           f"{naive_sub_s:.2f} s) by triplet count x{total_triplets / sub_triplets:.2f}")
    print(f"naive Python loop:       {naive_s * 1e3:9.0f} ms ({how})")
    print(f"naive and vectorised values agree on those {sub} images: {agree} "
          f"({float(naive_value):.6f} vs {float(check):.6f})")
    print(f"speed-up: {naive_s / eager_s:,.0f}x eager, "
          f"{naive_s / graph_s:,.0f}x tf.function (goal >= 100x)")

    mem = run_memory_subprocess()
    mib = mem["eager_bytes"] / 2 ** 20
    graph_mib = (f"{mem['graph_bytes'] / 2 ** 20:.1f} MiB"
                 if mem["graph_bytes"] is not None else "n/a")
    c3_mib = c ** 3 * 4 / 2 ** 20
    print(f"peak memory of vectorised forward+backward: eager {mib:.1f} MiB, "
          f"tf.function {graph_mib} ({mem['method']}, fresh subprocess). "
          f"Largest tensor, the (C,C,C) hinge: {c3_mib:.1f} MiB.")
    print("\n### CRL benchmark (`python benchmarks/bench_loss.py`)\n")
    print(f"B={b}, C={c}, E={e}, {labels.sum(axis=1).mean():.2f} positives/image "
          f"({total_triplets} valid triplets), forward + backward, "
          f"{len(os.sched_getaffinity(0))} CPU cores, median of {FLAGS.repeats}.\n")
    print("| implementation | time per step | speed-up vs naive |")
    print("|---|---|---|")
    naive_note = "" if sub == b else f" (extrapolated from {sub} images)"
    print(f"| naive Python loop over triplets (TF ops, GradientTape) | "
          f"{naive_s:.2f} s{naive_note} | 1x |")
    print(f"| vectorised, eager | {eager_s * 1e3:.1f} ms | {naive_s / eager_s:,.0f}x |")
    print(f"| vectorised, tf.function | {graph_s * 1e3:.1f} ms | {naive_s / graph_s:,.0f}x |")
    print(f"\nPeak memory of the vectorised forward + backward: {mib:.1f} MiB "
          f"eager, {graph_mib} in tf.function ({mem['method']}).")


if __name__ == "__main__":
    app.run(main)

"""python benchmarks/bench_request_memory.py --batch_sizes=1,64,256,1000,10000

What one `serving_default` request of B small JPEGs costs a serving process
(issue 13, item 12): peak resident memory (RSS) and time, and whether the
request was scored, refused (INVALID_ARGUMENT) or killed the process.

It exports a random-init model (`--backbone`, `--image_size`; small_cnn at
96 px is the demo model), then for each batch size starts a fresh Python
process that loads the export and sends ONE request of B 64x64 JPEGs (about
1.7 KB each), under an address-space limit (`--memory_limit_gb`, like a
container's memory limit), and reports the process's peak RSS from
`/usr/bin/time`-style `ru_maxrss`.

With `--max_batch_size=0` the export is made without that option (it runs
against code that has none, e.g. to measure the code before the limit).
Ends with a Markdown table for docs/reliability.md.
"""

import io
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("backbone", "small_cnn", "Backbone of the exported model.")
flags.DEFINE_integer("image_size", 96, "Square input side S.")
flags.DEFINE_list("batch_sizes", ["1", "64", "256", "1000", "10000"], "Requests to send.")
flags.DEFINE_integer("max_batch_size", 256, "Export option; 0 = do not pass it.")
flags.DEFINE_float("memory_limit_gb", 8.0, "Address-space limit of each request "
                   "process (RLIMIT_AS), GB.")
flags.DEFINE_string("child", None, "Internal: the export to load (child mode).")
flags.DEFINE_integer("child_batch", 0, "Internal: the batch size (child mode).")


def small_jpegs(count, seed=0):
    """`count` distinct 64x64 JPEGs (smooth random colours, ~1.7 KB)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (count, 8, 8, 3), dtype=np.uint8)
    jpegs = []
    for tile in base:
        buffer = io.BytesIO()
        Image.fromarray(tile).resize((64, 64), Image.BILINEAR).save(
            buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def export(directory):
    """Exports a random-init crl model; returns the version directory."""
    from mlcrl_tf.modeling.model import build_model  # pylint: disable=import-outside-toplevel
    from mlcrl_tf.serving import export_lib  # pylint: disable=import-outside-toplevel
    model = build_model(10, FLAGS.backbone, FLAGS.image_size, "crl")
    names = [f"class{i}" for i in range(10)]
    options = {"max_batch_size": FLAGS.max_batch_size} if FLAGS.max_batch_size else {}
    return export_lib.export_model(model, directory, names, **options)


def child(saved_model, batch):
    """Loads the export, sends one request; prints outcome, seconds, peak MB."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    loaded = tf.saved_model.load(saved_model)
    serve = loaded.signatures["serving_default"]
    serve(image_bytes=tf.constant(small_jpegs(1)))  # Warm-up: trace, load.
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data = tf.constant(small_jpegs(batch))
    start = time.perf_counter()
    try:
        serve(image_bytes=data)["probabilities"].numpy()
        outcome = "scored"
    except tf.errors.InvalidArgumentError as e:
        outcome = "refused: " + e.message.split("]")[0].split("[")[-1][:60]
    except tf.errors.ResourceExhaustedError:
        outcome = "ResourceExhaustedError"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT|{outcome}|{seconds:.2f}|{base:.0f}|{peak:.0f}", flush=True)


def run_child(saved_model, batch):
    limit = int(FLAGS.memory_limit_gb * 2 ** 30)

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    proc = subprocess.run(
        [sys.executable, __file__, f"--child={saved_model}", f"--child_batch={batch}",
         f"--backbone={FLAGS.backbone}", f"--image_size={FLAGS.image_size}"],
        capture_output=True, text=True, preexec_fn=limit_memory, timeout=3600,
        check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT|"):
            return line.split("|")[1:]
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
    return [f"process died (exit {proc.returncode}): {tail}", "-", "-", "-"]


def main(argv):
    del argv
    if FLAGS.child:
        child(FLAGS.child, FLAGS.child_batch)
        return
    with tempfile.TemporaryDirectory() as directory:
        path = export(os.path.join(directory, "model"))
        print("| B | outcome | seconds | RSS after warm-up (MB) | peak RSS (MB) |\n"
              "|---:|---|---:|---:|---:|")
        for batch in map(int, FLAGS.batch_sizes):
            outcome, seconds, base, peak = run_child(path, batch)
            print(f"| {batch} | {outcome} | {seconds} | {base} | {peak} |", flush=True)


if __name__ == "__main__":
    app.run(main)

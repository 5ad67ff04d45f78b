r"""python benchmarks/bench_train.py --cases=small_cnn:96:32,resnet50:448:2,resnet101:448:2

Training-step cost of `crl` against `baseline` (same backbone, batch, image
size, C = --num_classes), measured in one run on the production step: the
`tf.function` of `mlcrl_tf.train_lib.Trainer` (forward, soft margin + CRL,
backward, the two learning rates, SGD) on a fixed synthetic batch. The two
variants' steps are interleaved so that machine drift hits both alike; each
number is the median step time over --steps steps after --warmup steps.
Goal (issue 4): crl ≤ 1.05 × baseline step time at ResNet-101.
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
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.training import trainer as trainer_lib

flags.DEFINE_list("cases", ["small_cnn:96:32", "resnet50:448:2", "resnet101:448:2"],
                  "backbone:image_size:batch_size cases.")
flags.DEFINE_integer("num_classes", 80, "C (COCO: 80).")
flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per variant (tracing).")
FLAGS = flags.FLAGS


def make_trainer(variant, backbone, image_size, batch_size, model_dir):
    config = config_lib.Config(
        model_dir=model_dir, train_files="unused", variant=variant, backbone=backbone,
        image_size=image_size, batch_size=batch_size, num_classes=FLAGS.num_classes,
        steps_per_epoch=1, backbone_weights=None, lr_decay_epochs=())
    class_names = [f"c{i}" for i in range(FLAGS.num_classes)]
    return trainer_lib.Trainer(config, class_names, tf.distribute.get_strategy(), batch_size)


def synthetic_batch(image_size, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((batch_size, FLAGS.num_classes)) < 3.0 / FLAGS.num_classes)
    labels[:, 0] = True  # at least one positive per image
    return {"images": tf.constant(rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)),
                                  tf.float32),
            "labels": tf.constant(labels, tf.float32)}


def time_step(trainer, batch):
    start = time.perf_counter()
    terms = trainer.train_step(batch)
    float(terms["loss"])  # wait for the result
    return time.perf_counter() - start


def bench_case(backbone, image_size, batch_size):
    batch = synthetic_batch(image_size, batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {v: make_trainer(v, backbone, image_size, batch_size,
                                    os.path.join(tmp, v)) for v in ("baseline", "crl")}
        for _ in range(FLAGS.warmup):
            for trainer in trainers.values():
                time_step(trainer, batch)
        times = {v: [] for v in trainers}
        for _ in range(FLAGS.steps):
            for variant, trainer in trainers.items():
                times[variant].append(time_step(trainer, batch))
    medians = {v: statistics.median(t) for v, t in times.items()}
    return {"backbone": backbone, "image_size": image_size, "batch_size": batch_size,
            "baseline_s": medians["baseline"], "crl_s": medians["crl"],
            "baseline_ips": batch_size / medians["baseline"],
            "crl_ips": batch_size / medians["crl"],
            "ratio": medians["crl"] / medians["baseline"]}


def main(argv):
    del argv
    rows = []
    for case in FLAGS.cases:
        backbone, image_size, batch_size = case.split(":")
        row = bench_case(backbone, int(image_size), int(batch_size))
        rows.append(row)
        print(f"{backbone} {image_size}px batch {batch_size}: baseline "
              f"{row['baseline_s'] * 1000:.1f} ms/step ({row['baseline_ips']:.1f} img/s), crl "
              f"{row['crl_s'] * 1000:.1f} ms/step ({row['crl_ips']:.1f} img/s), ratio "
              f"{row['ratio']:.3f}", flush=True)
    print()
    print(f"Command: python benchmarks/bench_train.py --cases={','.join(FLAGS.cases)} "
          f"--num_classes={FLAGS.num_classes} --steps={FLAGS.steps} --warmup={FLAGS.warmup}")
    print(f"Machine: {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}")
    print()
    print("| backbone | image | batch | baseline ms/step | crl ms/step | baseline img/s "
          "| crl img/s | crl / baseline time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backbone']} | {r['image_size']} | {r['batch_size']} | "
              f"{r['baseline_s'] * 1000:.1f} | {r['crl_s'] * 1000:.1f} | "
              f"{r['baseline_ips']:.2f} | {r['crl_ips']:.2f} | {r['ratio']:.3f} |")


if __name__ == "__main__":
    app.run(main)

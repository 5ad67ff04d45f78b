r"""python benchmarks/bench_step.py --cases=small_cnn:96:32,resnet50:224:8 --steps=10

One training step of the paper's objective (crl, C = --num_classes), four
ways, interleaved in one process (so machine drift hits all alike), median
over --steps steps after --warmup:

- `cli`: the step of `python -m mlcrl_tf.train` (`Trainer.train_step`:
  `strategy.run` of the model's `train_step`, plus EMA bookkeeping), float32;
- `cli xla`: the same with `--jit_compile`;
- `fit`: Keras' own compiled train function (`model.make_train_function()`,
  what `model.fit()` calls per step), with Keras' default jit_compile="auto"
  (XLA on this CPU);
- `cli bf16` / `cli bf16 xla`: `--precision=mixed_bfloat16`.

And the forward pass of the inference model (what an export serves), float32
against mixed_bfloat16 (`serve f32`, `serve bf16`).

Prints milliseconds per step, images/s and every mode's time relative to
`cli` (float32, no XLA).
"""

import os
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
import tensorflow as tf  # noqa: E402  pylint: disable=wrong-import-position

from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.training import trainer as trainer_lib

flags.DEFINE_list("cases", ["small_cnn:96:32", "resnet50:224:8"],
                  "backbone:image_size:batch_size cases.")
flags.DEFINE_integer("num_classes", 80, "C (COCO: 80).")
flags.DEFINE_integer("steps", 10, "Timed steps per mode.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per mode (tracing, XLA compilation).")
FLAGS = flags.FLAGS

MODES = {"cli": ("float32", False), "cli xla": ("float32", True),
         "cli bf16": ("mixed_bfloat16", False), "cli bf16 xla": ("mixed_bfloat16", True)}


def make_trainer(backbone, image_size, batch_size, model_dir, precision, jit):
    config = config_lib.Config(
        model_dir=model_dir, train_files="unused", backbone=backbone,
        image_size=image_size, batch_size=batch_size, num_classes=FLAGS.num_classes,
        steps_per_epoch=1, backbone_weights=None, lr_decay_epochs=(),
        precision=precision, jit_compile=jit)
    class_names = [f"c{i}" for i in range(FLAGS.num_classes)]
    return trainer_lib.Trainer(config, class_names, tf.distribute.get_strategy(), batch_size)


def synthetic_batch(image_size, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.random((batch_size, FLAGS.num_classes)) < 3.0 / FLAGS.num_classes
    labels[:, 0] = True  # at least one positive per image
    return {"images": tf.constant(rng.uniform(0, 255, (batch_size, image_size, image_size, 3)),
                                  tf.float32),
            "labels": tf.constant(labels, tf.float32)}


def steps(trainers, batch, tmp):
    """mode -> a function running one synchronous step."""
    calls = {name: (lambda t=trainer: float(t.train_step(batch)["loss"]))
             for name, trainer in trainers.items()}
    fit_model = trainers["cli"].model  # compiled with the same optimizer setup
    fit_model.compile(optimizer=fit_model.optimizer, objective=fit_model.objective,
                      jit_compile="auto")
    fit_model.make_train_function()
    train_function = fit_model.train_function
    data = tf.data.Dataset.from_tensors((batch["images"], batch["labels"])).repeat()
    iterator = iter(data)
    calls["fit"] = lambda: float(train_function(iterator)["loss"])
    for name in ("cli", "cli bf16"):
        inference = tf.function(trainers[name].model.inference_model)
        calls[f"serve {'bf16' if 'bf16' in name else 'f32'}"] = (
            lambda f=inference: float(tf.reduce_sum(tf.cast(f(batch["images"]), tf.float32))))
    del tmp
    return calls


def bench_case(backbone, image_size, batch_size):
    batch = synthetic_batch(image_size, batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for name, (precision, jit) in MODES.items():
            trainers[name] = make_trainer(backbone, image_size, batch_size,
                                          os.path.join(tmp, name.replace(" ", "_")),
                                          precision, jit)
        keras.mixed_precision.set_global_policy("float32")
        calls = steps(trainers, batch, tmp)
        for _ in range(FLAGS.warmup):
            for call in calls.values():
                call()
        times = {name: [] for name in calls}
        for _ in range(FLAGS.steps):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv):
    del argv
    print(f"Command: python benchmarks/bench_step.py --cases={','.join(FLAGS.cases)} "
          f"--num_classes={FLAGS.num_classes} --steps={FLAGS.steps} --warmup={FLAGS.warmup}")
    print(f"Machine: {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, load "
          f"average {', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| case | mode | ms/step | img/s | time / cli |\n|---|---|---:|---:|---:|")
    for case in FLAGS.cases:
        backbone, image_size, batch_size = case.split(":")
        medians = bench_case(backbone, int(image_size), int(batch_size))
        for name, seconds in medians.items():
            reference = medians["serve f32"] if name.startswith("serve") else medians["cli"]
            print(f"| {backbone} {image_size}px b{batch_size} | {name} | "
                  f"{seconds * 1000:.1f} | {int(batch_size) / seconds:.1f} | "
                  f"{seconds / reference:.3f} |", flush=True)


if __name__ == "__main__":
    app.run(main)

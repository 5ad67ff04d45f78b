r"""python benchmarks/bench_input.py --num_images=512 --batches=12

Measures the input side against what training consumes:

1. Writes `--num_images` COCO-like JPEGs (640x480, quality 90) made from real
   photos (scikit-learn's `china.jpg` and `flower.jpg`, randomly rescaled,
   cropped, flipped and colour-jittered) plus a COCO instances file with 80
   categories and 1-4 random labels per image, in a temporary directory.
2. Times the real COCO converter (`pipelines.coco_lib.convert`,
   8 shards) with 1 and 2 worker processes: images/s, process start-up
   included.
3. Times `pipelines.input_pipeline.make_dataset` over those shards at
   `--image_size` (448) with ResNet-101 normalisation and batch
   `--batch_size` (32), training=True and False: images/s over `--batches`
   batches after `--warmup` batches.
4. Times one training-like step of `keras.applications.ResNet101`
   (weights=None, include_top=False) + global average pooling + Dense(80),
   forward + backward + SGD update, at 448 with batch `--step_batch` (2),
   and prints the ratio pipeline images/s / step images/s (goal: >= 5).
5. The same for the CPU demo: the "outfits" demo set (96 px JPEGs, 400
   canvases generated in the temp dir) through `make_dataset` with
   `small_cnn` normalisation vs a `small_cnn` + Dense(10) step at batch 64.

The machine is shared and timings are wall-clock: the load average is
printed with the results. Ends with a Markdown summary.
"""

import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from PIL import ImageEnhance  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402

flags.DEFINE_integer("num_images", 512, "COCO-like images to generate.")
flags.DEFINE_integer("image_size", 448, "make_dataset image size.")
flags.DEFINE_integer("batch_size", 32, "make_dataset batch size.")
flags.DEFINE_integer("warmup", 2, "Batches before timing starts.")
flags.DEFINE_integer("batches", 12, "Timed batches.")
flags.DEFINE_integer("step_batch", 2, "ResNet-101 step batch size.")
flags.DEFINE_integer("steps", 2, "Timed ResNet-101 steps (after one warm-up).")
flags.DEFINE_bool("resnet_step", True, "Time the ResNet-101 step.")
flags.DEFINE_bool("demo", True, "Time the demo set with small_cnn.")
FLAGS = flags.FLAGS

NUM_CLASSES = 80


def make_coco_like(directory, num_images, seed=0):
    """Writes 640x480 JPEGs from real photos and an instances JSON."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    image_dir = os.path.join(directory, "images")
    os.makedirs(image_dir)
    images, annotations = [], []
    for i in range(num_images):
        photo = photos[i % len(photos)]
        scale = max(640 / photo.width, 480 / photo.height) * rng.uniform(1, 1.6)
        photo = photo.resize((int(photo.width * scale) + 1,
                              int(photo.height * scale) + 1), Image.BILINEAR)
        x = rng.integers(photo.width - 640 + 1)
        y = rng.integers(photo.height - 480 + 1)
        photo = photo.crop((x, y, x + 640, y + 480))
        if rng.random() < 0.5:
            photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
        photo = ImageEnhance.Color(photo).enhance(rng.uniform(0.5, 1.5))
        photo = ImageEnhance.Brightness(photo).enhance(rng.uniform(0.7, 1.3))
        name = f"COCO_bench_{i:012d}.jpg"
        photo.save(os.path.join(image_dir, name), "JPEG", quality=90)
        images.append({"id": i + 1, "file_name": name, "width": 640,
                       "height": 480})
        for c in rng.choice(NUM_CLASSES, rng.integers(1, 5), replace=False):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "category_id": int(c) + 1, "iscrowd": 0,
                                "bbox": [0, 0, 10, 10], "area": 100})
    path = os.path.join(directory, "instances_bench.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": c + 1, "name": f"class{c}"}
                                  for c in range(NUM_CLASSES)]}, f)
    return path, image_dir


def time_converter(annotations, image_dir, output_dir, num_workers):
    from pipelines import coco_lib  # pylint: disable=import-outside-toplevel
    start = time.perf_counter()
    report = coco_lib.convert(annotations, image_dir, output_dir,
                              split="bench", num_shards=8,
                              num_workers=num_workers, overwrite=True)
    seconds = time.perf_counter() - start
    return report["num_records"] / seconds


def time_pipeline(pattern, image_size, num_classes, backbone, training,
                  batch_size, warmup, batches):
    """Images/s of make_dataset after `warmup` batches."""
    from pipelines import input_pipeline  # pylint: disable=import-outside-toplevel
    del backbone  # the pipeline no longer depends on it (the model normalises)
    ds = input_pipeline.make_dataset(pattern, batch_size, image_size,
                                     num_classes, training, seed=0)
    if not training:
        ds = ds.repeat()  # enough batches to time, whatever the set size
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        count += int(next(iterator)["images"].shape[0])
    return count / (time.perf_counter() - start)


def time_train_step(model, image_size, num_classes, batch, steps):
    """Images/s of forward + backward + SGD update (after one warm-up)."""
    import keras  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(0, 50, (batch, image_size, image_size, 3)),
                         tf.float32)
    labels = tf.constant(rng.random((batch, num_classes)) < 0.05, tf.float32)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(
                tf.nn.sigmoid_cross_entropy_with_logits(y, logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    step(images, labels).numpy()
    start = time.perf_counter()
    for _ in range(steps):
        step(images, labels).numpy()
    return batch * steps / (time.perf_counter() - start)


def classifier(backbone, image_size, num_classes):
    import keras  # pylint: disable=import-outside-toplevel
    from mlcrl_tf import backbones  # pylint: disable=import-outside-toplevel
    inputs = keras.Input((image_size, image_size, 3))
    features = backbones.build_backbone(backbone, image_size)(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(pooled))


def main(argv):
    del argv
    from pipelines import demo_dataset  # pylint: disable=import-outside-toplevel
    from pipelines import tfrecord_lib  # pylint: disable=import-outside-toplevel
    rows = []
    root = tempfile.mkdtemp(prefix="bench_input_")
    try:
        start = time.perf_counter()
        annotations, image_dir = make_coco_like(root, FLAGS.num_images)
        print(f"generated {FLAGS.num_images} 640x480 JPEGs in "
              f"{time.perf_counter() - start:.1f} s")
        for workers in (1, 2):
            rate = time_converter(annotations, image_dir,
                                  os.path.join(root, f"tfrecords{workers}"),
                                  workers)
            rows.append((f"COCO converter, {workers} worker(s), 640x480 JPEG",
                         rate))
            print(rows[-1])
        pattern = tfrecord_lib.split_file_pattern(
            os.path.join(root, "tfrecords1"), "bench")
        pipeline = {}
        for training in (True, False):
            rate = time_pipeline(pattern, FLAGS.image_size, NUM_CLASSES,
                                 "resnet101", training, FLAGS.batch_size,
                                 FLAGS.warmup, FLAGS.batches)
            pipeline[training] = rate
            rows.append((f"make_dataset {FLAGS.image_size} px, resnet101, "
                         f"batch {FLAGS.batch_size}, training={training}",
                         rate))
            print(rows[-1])
        if FLAGS.resnet_step:
            rate = time_train_step(
                classifier("resnet101", FLAGS.image_size, NUM_CLASSES),
                FLAGS.image_size, NUM_CLASSES, FLAGS.step_batch, FLAGS.steps)
            rows.append((f"ResNet-101 train step {FLAGS.image_size} px, "
                         f"batch {FLAGS.step_batch}", rate))
            rows.append(("ratio pipeline(training) / ResNet-101 step",
                         pipeline[True] / rate))
            print(rows[-2:])
        if FLAGS.demo:
            demo_dir = os.path.join(root, "demo")
            demo_dataset.generate(demo_dir, num_train=400, num_test=10,
                                  num_workers=1)
            demo_pattern = tfrecord_lib.split_file_pattern(
                os.path.join(demo_dir, "tfrecords"), "train")
            demo_rate = time_pipeline(demo_pattern, 96, 10, "small_cnn", True,
                                      64, FLAGS.warmup, 24)
            rows.append(("make_dataset demo 96 px, small_cnn, batch 64, "
                         "training=True", demo_rate))
            step_rate = time_train_step(classifier("small_cnn", 96, 10), 96,
                                        10, 64, 4)
            rows.append(("small_cnn train step 96 px, batch 64", step_rate))
            rows.append(("ratio demo pipeline / small_cnn step",
                         demo_rate / step_rate))
            print(rows[-3:])
    finally:
        shutil.rmtree(root)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n## Input pipeline benchmark ({os.cpu_count()} CPUs, load "
          f"average {load})\n")
    print("| measurement | images/s (or ratio) |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |" if "ratio" in name
              else f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    app.run(main)

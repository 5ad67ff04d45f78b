r"""python benchmarks/bench_input.py --num_images=512 --image_size=448 --repeats=3

The input pipeline against its decode limit, in one process, interleaved.

1. Writes `--num_images` COCO-like JPEGs (640x480, quality 90) made from real
   photos (scikit-learn's `china.jpg` and `flower.jpg`, randomly rescaled,
   cropped and colour-jittered) and converts them with the real CSV
   converter into 8 shards of our schema (80 classes, 1-4 labels each).
2. Times, `--repeats` rounds, each round every pipeline in turn (so load
   changes hit all of them alike; each timed on a fresh iterator that is
   dropped afterwards, so that no pipeline prefetches in the background
   while another is timed), the best round reported:
   - `limit`: TFRecordDataset -> parse -> tf.io.decode_jpeg -> tf.image.resize
     (S, bilinear) -> batch, parallel non-deterministic map: the plain
     decode+resize limit;
   - `decode only`: the same without the resize;
   - `make_dataset train` / `make_dataset eval`: our pipeline
     (`pipelines.input_pipeline.make_dataset`, training=True / False);
   - `make_dataset train, antialias`: with `--antialias` (PIL-like resize).
3. Prints images/s and the ratios make_dataset / limit (the goal is >= 0.9).

Timings are wall-clock on a shared machine: the load average is printed.
"""

import csv
import gc
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
import tensorflow as tf  # noqa: E402

from pipelines.converters import csv_lib  # noqa: E402
from pipelines.records import schema
from pipelines.records import shard_sets
from pipelines.tfdata import input_pipeline

flags.DEFINE_integer("num_images", 512, "COCO-like images to generate.")
flags.DEFINE_integer("image_size", 448, "Model input side S.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("warmup", 3, "Batches before timing starts.")
flags.DEFINE_integer("batches", 16, "Timed batches per round.")
flags.DEFINE_integer("repeats", 3, "Rounds; the best one is reported.")
FLAGS = flags.FLAGS

NUM_CLASSES = 80


def make_shards(directory, num_images, seed=0):
    """640x480 JPEGs from real photos, converted into 8 shards; the glob."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    image_dir = os.path.join(directory, "images")
    os.makedirs(image_dir)
    rows = []
    for i in range(num_images):
        photo = photos[i % len(photos)]
        scale = max(640 / photo.width, 480 / photo.height) * rng.uniform(1, 1.6)
        photo = photo.resize((int(photo.width * scale) + 1,
                              int(photo.height * scale) + 1), Image.BILINEAR)
        x, y = rng.integers(photo.width - 639), rng.integers(photo.height - 479)
        photo = photo.crop((x, y, x + 640, y + 480))
        photo = ImageEnhance.Color(photo).enhance(rng.uniform(0.5, 1.5))
        name = f"photo_{i:05d}.jpg"
        photo.save(os.path.join(image_dir, name), "JPEG", quality=90)
        labels = rng.choice(NUM_CLASSES, rng.integers(1, 5), replace=False)
        rows.append((name, "|".join(f"class{c}" for c in labels)))
    csv_path = os.path.join(directory, "photos.csv")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    output = os.path.join(directory, "shards")
    csv_lib.convert(csv_path, image_dir, output, num_shards=8, num_workers=1,
                    classes=[f"class{c}" for c in range(NUM_CLASSES)])
    return schema.split_file_pattern(output, "train")


def plain_pipeline(pattern, image_size, batch_size, resize=True):
    """The decode(+resize) limit: nothing but what any pipeline must do."""
    files = shard_sets.find_shards(pattern)

    def decode(record):
        data = tf.io.parse_single_example(record, schema.FEATURE_SPEC)
        image = tf.io.decode_jpeg(data[schema.ENCODED_KEY], channels=3)
        if resize:
            image = tf.image.resize(image, (image_size, image_size), method="bilinear")
        return image

    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=len(files),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    ds = ds.repeat().map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=False)
    # (Without the resize every photo is 640x480: they batch all the same.)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def pipelines(pattern):
    """name -> an (infinite) dataset of batches."""
    s, b = FLAGS.image_size, FLAGS.batch_size
    return {
        "limit: decode_jpeg + resize": plain_pipeline(pattern, s, b),
        "decode only": plain_pipeline(pattern, s, b, resize=False),
        "make_dataset train": input_pipeline.make_dataset(
            pattern, b, s, NUM_CLASSES, training=True, seed=0),
        "make_dataset eval": input_pipeline.make_dataset(
            pattern, b, s, NUM_CLASSES, training=False).repeat(),
        "make_dataset train, antialias": input_pipeline.make_dataset(
            pattern, b, s, NUM_CLASSES, training=True, seed=0, antialias=True),
    }


def images_per_second(dataset):
    """Images/s of a fresh iterator after warm-up; the iterator is then
    dropped, so no pipeline prefetches in the background while another is
    timed."""
    iterator = iter(dataset)
    for _ in range(FLAGS.warmup):
        next(iterator)
    start = time.perf_counter()
    count = 0
    for _ in range(FLAGS.batches):
        batch = next(iterator)
        count += int(tf.shape(batch["images"] if isinstance(batch, dict) else batch)[0])
    seconds = time.perf_counter() - start
    del iterator
    gc.collect()
    return count / seconds


def measure(datasets):
    """Best images/s of each dataset over interleaved rounds."""
    best = {name: 0.0 for name in datasets}
    for _ in range(FLAGS.repeats):
        for name, dataset in datasets.items():
            best[name] = max(best[name], images_per_second(dataset))
    return best


def main(argv):
    del argv
    root = tempfile.mkdtemp(prefix="bench_input_")
    try:
        pattern = make_shards(root, FLAGS.num_images)
        best = measure(pipelines(pattern))
    finally:
        shutil.rmtree(root)
    limit = best["limit: decode_jpeg + resize"]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n## Input pipeline, {FLAGS.num_images} photos 640x480 -> {FLAGS.image_size} px, "
          f"batch {FLAGS.batch_size} ({os.cpu_count()} CPUs, load average {load})\n")
    print("| pipeline | images/s | / limit |\n|---|---:|---:|")
    for name, rate in best.items():
        print(f"| {name} | {rate:.0f} | {rate / limit:.2f} |")


if __name__ == "__main__":
    app.run(main)

r"""python benchmarks/ablation/pretrain_backbone.py --output=runs/ablation/small_cnn_64.weights.h5

The "ImageNet stage" of the ablation (issue 14): the paper fine-tunes a
backbone pretrained on single-label ImageNet; here the small CNN is pretrained
once on single-item classification of Fashion-MNIST photos and every
multi-label run starts from the saved weights
(`python -m mlcrl_tf.train --backbone=small_cnn --backbone_weights=<file>`).

Data. Each canvas holds ONE Fashion-MNIST photo rendered by the demo set's own
`pipelines.outfits.make_canvas` (same background, tint, scales and
placement): half the canvases in the default mode (scale 0.9-1.5, wholly
inside), half in the occluded mode (scale 1.1-1.8, may leave the canvas, at
least `OCCLUDED_MIN_VISIBLE` visible). Training canvases use only the official
TRAIN photos (a seeded permutation, so the first 60,000 canvases use every
photo once); the reported accuracy is measured once, after training, on
canvases of the official TEST photos, which nothing before it has seen (no
early stopping, no model selection).

Model: `mlcrl_tf.backbones.build_backbone("small_cnn", size)` -> global
average pooling -> Dense(10), softmax cross-entropy; inputs normalised by
`mlcrl_tf.backbones.normalize_images(images, "small_cnn")`. SGD with momentum
0.9 and a cosine decay of the learning rate to 0 over all steps.

Output: `<output>` (a `.weights.h5` file of the backbone alone, loadable by
`build_backbone(..., weights=<output>)`, at any input size since the small
CNN has no size-dependent weights) and `<output>.json` (settings, test
accuracy, wall time). Cached: if both exist with the same settings, nothing is
recomputed.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import keras
import numpy as np
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# pylint: disable=wrong-import-position
from mlcrl_tf.modeling import backbones  # noqa: E402
from pipelines.demo import fashion_mnist  # noqa: E402
from pipelines.demo import outfits  # noqa: E402

# pylint: enable=wrong-import-position

NUM_CLASSES = 10
BACKBONE = "small_cnn"
_SPLIT_IDS = {"train": 0, "test": 1}
STREAM = 14  # keeps these canvases' random streams apart from the demo set's


def single_item_canvas(rng, photo, label, canvas_size):
    """One photo on a demo canvas: default or occluded mode, 50/50.

    Args:
        rng: `np.random.Generator` of this canvas.
        photo: 28x28 uint8 Fashion-MNIST photo.
        label: its class id.
        canvas_size: side in pixels.

    Returns:
        uint8 (canvas_size, canvas_size, 3).
    """
    occlusion = bool(rng.random() < 0.5)
    image, pasted = outfits.make_canvas(rng, [(label, 0, photo)], canvas_size,
                                             occlusion)
    if not pasted:  # no placement kept enough visible: the default mode always fits
        image, pasted = outfits.make_canvas(rng, [(label, 0, photo)], canvas_size,
                                                 False)
    return image


def make_canvases(split, count, canvas_size, seed, fashion_mnist_dir=None):
    """`count` single-item canvases of one official Fashion-MNIST split.

    Canvas i shows photo `perm[i % n]` of a seeded permutation of the split, so
    the photos are used evenly; it depends only on (seed, split, i).

    Returns:
        (images uint8 (count, S, S, 3), labels int64 (count,)).
    """
    photos, labels = fashion_mnist.load_fashion_mnist(split, fashion_mnist_dir)
    split_id = _SPLIT_IDS[split]
    order = np.random.default_rng([STREAM, seed, split_id]).permutation(len(photos))
    images = np.empty((count, canvas_size, canvas_size, 3), np.uint8)
    chosen = order[np.arange(count) % len(photos)]
    for i, index in enumerate(chosen):
        rng = np.random.default_rng([STREAM, seed, split_id, i])
        images[i] = single_item_canvas(rng, photos[index], int(labels[index]), canvas_size)
    return images, labels[chosen].astype(np.int64)


def build_classifier(canvas_size):
    """(classifier, backbone): small CNN -> global average pool -> 10 logits."""
    backbone = backbones.build_backbone(BACKBONE, canvas_size)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(backbone.outputs[0])
    logits = keras.layers.Dense(NUM_CLASSES, name="logits")(pooled)
    return keras.Model(backbone.inputs[0], logits, name="pretrain_classifier"), backbone


def _dataset(images, labels, batch_size, seed=None):
    """Batches of (normalised images, labels); shuffled when a seed is given."""
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if seed is not None:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(
        lambda x, y: (backbones.normalize_images(x, BACKBONE), y),
        num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def train_classifier(classifier, images, labels, epochs, batch_size, learning_rate, seed):
    """SGD (momentum 0.9), cosine decay to 0; returns per-epoch train accuracy."""
    steps = epochs * -(-len(images) // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(learning_rate, max(steps, 1))
    classifier.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    history = classifier.fit(_dataset(images, labels, batch_size, seed), epochs=epochs,
                             shuffle=False, verbose=2)  # the dataset shuffles
    return [float(a) for a in history.history["accuracy"]]


def accuracy(classifier, images, labels, batch_size=128):
    """Top-1 accuracy (a fraction) of the classifier on uint8 canvases."""
    correct = 0
    for x, y in _dataset(images, labels, batch_size):
        predicted = np.argmax(classifier(x, training=False).numpy(), axis=1)
        correct += int((predicted == y.numpy()).sum())
    return correct / len(labels)


def save_backbone(backbone, output):
    """Writes the backbone's weights (a `.weights.h5` file) for
    `build_backbone(BACKBONE, size, weights=output)`."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    backbone.save_weights(output)


def report_path(output):
    """The JSON report written next to the weights file."""
    return output + ".json"


def read_cached(output, settings):
    """The report of an earlier run with the same settings, else None."""
    path = report_path(output)
    if not (os.path.exists(output) and os.path.exists(path)):
        return None
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    return report if report.get("settings") == settings else None


def pretrain(output, canvas_size=64, num_train=30000, num_test=10000, epochs=6,
             batch_size=64, learning_rate=0.05, seed=0):
    """Pretrains the small CNN, saves its backbone weights; cached.

    Args:
        output: the `.weights.h5` file to write (the backbone's weights only).
        canvas_size: canvas side (the input size of the pretraining).
        num_train: training canvases (train photos only).
        num_test: test canvases (test photos only), scored once at the end.
        epochs, batch_size, learning_rate: the SGD schedule.
        seed: canvases, initialisation and data order.

    Returns:
        The report dict (also written to `<output>.json`).

    Raises:
        ValueError: `output` does not end with `.weights.h5` (Keras needs it).
    """
    if not output.endswith(".weights.h5"):
        raise ValueError(f"output={output!r}: the file name must end with .weights.h5.")
    settings = {"canvas_size": canvas_size, "num_train": num_train, "num_test": num_test,
                "epochs": epochs, "batch_size": batch_size,
                "learning_rate": learning_rate, "seed": seed}
    cached = read_cached(output, settings)
    if cached:
        return cached
    start = time.time()
    keras.utils.set_random_seed(seed)
    images, labels = make_canvases("train", num_train, canvas_size, seed)
    render_seconds = time.time() - start
    classifier, backbone = build_classifier(canvas_size)
    train_accuracy = train_classifier(classifier, images, labels, epochs, batch_size,
                                      learning_rate, seed)
    del images, labels
    test_images, test_labels = make_canvases("test", num_test, canvas_size, seed)
    report = {"settings": settings, "backbone": BACKBONE,
              "test_accuracy": accuracy(classifier, test_images, test_labels),
              "train_accuracy_per_epoch": train_accuracy,
              "render_seconds": round(render_seconds, 1),
              "seconds": round(time.time() - start, 1)}
    save_backbone(backbone, output)
    with open(report_path(output), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


def define_flags():
    """This script's flags (only when run as a program)."""
    flags.DEFINE_string("output", None, "Backbone weights file (.weights.h5).",
                        required=True)
    flags.DEFINE_integer("canvas_size", 64, "Canvas side = pretraining input size.")
    flags.DEFINE_integer("num_train", 30000, "Training canvases (train photos).")
    flags.DEFINE_integer("num_test", 10000, "Test canvases (test photos).")
    flags.DEFINE_integer("epochs", 6, "Pretraining epochs.")
    flags.DEFINE_integer("batch_size", 64, "Batch size.")
    flags.DEFINE_float("learning_rate", 0.05, "Initial SGD learning rate (cosine decay).")
    flags.DEFINE_integer("seed", 0, "Canvases, initialisation and data order.")


def main(argv):
    del argv
    f = flags.FLAGS
    try:
        report = pretrain(f.output, f.canvas_size, f.num_train, f.num_test, f.epochs,
                          f.batch_size, f.learning_rate, f.seed)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"Single-item test accuracy {100 * report['test_accuracy']:.1f} % on "
          f"{report['settings']['num_test']} test canvases; {report['seconds'] / 60:.1f} "
          f"min; weights {f.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

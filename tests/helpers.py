"""Helpers several test files share: NumPy references of the losses, crafted
image files, real Fashion-MNIST canvases with a briefly trained model, and
real photos (scikit-learn's samples) for the converters."""

import io
import math
import os
import signal
import struct
import zlib

import numpy as np
from PIL import Image
import tensorflow as tf

from mlcrl_tf.modeling import optim
from pipelines.demo import fashion_mnist
from pipelines.records import schema
from pipelines.records import shard_sets


def _distance(a, b):
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def reference_crl_terms(labels, fe, emb, margin=0.5):
    """Returns (image_sum, image_count, label_sum, label_count) by loops."""
    labels = np.asarray(labels)
    num_images, num_classes = labels.shape
    image_sum = image_count = label_sum = label_count = 0.0
    d_lab = [[_distance(emb[p], emb[q]) for q in range(num_classes)]
             for p in range(num_classes)]
    for b in range(num_images):
        positives = [c for c in range(num_classes) if labels[b, c] == 1]
        negatives = [c for c in range(num_classes) if labels[b, c] == 0]
        for j in positives:
            for k in negatives:
                value = margin + _distance(fe[b], emb[j]) - _distance(fe[b], emb[k])
                image_sum += max(value, 0.0)
                image_count += 1
        for p in positives:
            for q in positives:
                if q == p:
                    continue
                for k in negatives:
                    value = margin + d_lab[p][q] - d_lab[p][k]
                    label_sum += max(value, 0.0)
                    label_count += 1
    return image_sum, image_count, label_sum, label_count


def reference_crl(labels, fe, emb, margin=0.5, image_weight=0.5,
                  label_weight=0.5, reduction="mean"):
    image_sum, image_count, label_sum, label_count = reference_crl_terms(
        labels, fe, emb, margin)
    if reduction == "mean":
        image_term = image_sum / image_count if image_count else 0.0
        label_term = label_sum / label_count if label_count else 0.0
    else:
        image_term, label_term = image_sum, label_sum
    return image_weight * image_term + label_weight * label_term


def reference_soft_margin_per_example(labels, logits):
    out = []
    for y_row, x_row in zip(labels, logits):
        total = 0.0
        for y, x in zip(y_row, x_row):
            # -[y log σ(x) + (1 − y) log(1 − σ(x))], written stably.
            if x >= 0:
                log_sig = -math.log1p(math.exp(-x))
            else:
                log_sig = x - math.log1p(math.exp(x))
            log_one_minus = -x + log_sig
            total += -(y * log_sig + (1 - y) * log_one_minus)
        out.append(total / len(y_row))
    return np.array(out)


def reference_mse_per_example(fe, fl):
    return np.array([sum((float(a) - float(b)) ** 2 for a, b in zip(r, s)) / len(r)
                     for r, s in zip(fe, fl)])


def png_bomb(width, height):
    """A valid 1-bit grayscale PNG of zeros: 20000 x 20000 is ~48 KB."""
    def chunk(kind, data):
        body = kind + data
        return (struct.pack(">I", len(data)) + body
                + struct.pack(">I", zlib.crc32(body) & 0xffffffff))

    compressor = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def gif_of_frames(width, height, frames, seed=0):
    """A valid GIF whose one image block (random pixels) is repeated."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("P").save(buffer, "GIF")
    data = buffer.getvalue()
    packed = data[10]
    start = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)
    assert data[start] == 0x2C and data[-1] == 0x3B
    return data[:start] + data[start:-1] * frames + b";"


FASHION_CLASSES = 10
CANVAS_SIZE = 64
SMALL_BACKBONE = "small_cnn"
FASHION_CLASS_NAMES = list(fashion_mnist.CLASS_NAMES)


def fashion_canvases(count, height, width, seed, gray=False):
    """Real Fashion-MNIST items (2-3 per canvas) pasted on dark canvases.

    Returns uint8 (count, height, width, 3) (or (count, height, width) when
    gray) and float32 (count, C) multi-hot labels.
    """
    items, item_labels = fashion_mnist.load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    canvases = np.zeros((count, height, width), np.uint8)
    multi_hot = np.zeros((count, FASHION_CLASSES), np.float32)
    for b in range(count):
        for idx in rng.choice(len(items), rng.integers(2, 4), replace=False):
            y, x = rng.integers(0, height - 27), rng.integers(0, width - 27)
            patch = canvases[b, y:y + 28, x:x + 28]
            np.maximum(patch, items[idx], out=patch)
            multi_hot[b, item_labels[idx]] = 1.0
    if gray:
        return canvases, multi_hot
    tint = rng.uniform(0.5, 1.0, size=(count, 1, 1, 3))
    return (canvases[..., None] * tint).astype(np.uint8), multi_hot


def train_on_canvases(model, steps=4):
    """A few real steps of the model's objective on real canvases."""
    images, labels = fashion_canvases(16, CANVAS_SIZE, CANVAS_SIZE, seed=1)
    return train_briefly(model, images.astype(np.float32), labels, steps)


def encode_image(array, fmt, **kwargs):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def train_briefly(model, images, labels, steps=4, learning_rate=0.05):
    """A few real steps of the model's own objective (its Keras train_step)
    with the paper's optimizer, on RGB images in [0, 255]."""
    model.compile(optimizer=optim.make_optimizer(model, learning_rate, learning_rate,
                                                 momentum=0.9, weight_decay=1e-4))
    for _ in range(steps):
        model.train_step((images, labels))
    return model


# --- Real photos (scikit-learn's samples) for the converters' tests. ---

W, H = 96, 64  # Fixture size (width, height): small but real content.
CLASSES = ["cat", "dog", "person"]




def save(directory, name, image, fmt, **kwargs):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    image.save(path, fmt, **kwargs)
    return path


def write_bytes(directory, name, data):
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def decode(data):
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


def mean_abs_diff(a, b):
    return np.abs(a.astype(np.float64) - np.asarray(b, np.float64)).mean()


def read_split(output_dir, split):
    """filename -> dict(labels, difficult, encoded, image) via FEATURE_SPEC."""
    files = shard_sets.find_shards(schema.split_file_pattern(output_dir, split))
    out = {}
    for raw in tf.data.TFRecordDataset(files):
        example = tf.io.parse_single_example(raw, schema.FEATURE_SPEC)
        name = example[schema.FILENAME_KEY].numpy().decode()
        assert name not in out
        encoded = example[schema.ENCODED_KEY].numpy()
        out[name] = {
            "labels": tf.sparse.to_dense(
                example[schema.LABEL_KEY]).numpy().tolist(),
            "difficult": tf.sparse.to_dense(
                example[schema.DIFFICULT_KEY]).numpy().tolist(),
            "encoded": encoded,
            "image": decode(encoded),
        }
    return out


def shard_files(directory, split):
    return sorted(n for n in os.listdir(directory)
                  if n.startswith(split + "-") and n.endswith(".tfrecord"))


def default_sigint():
    """`preexec_fn` giving a child a terminal's SIGINT: pytest-xdist workers
    ignore SIGINT and children inherit that, so Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

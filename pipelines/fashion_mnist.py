"""Finds and reads the real Fashion-MNIST files (the demo set's source).

    images, labels = load_fashion_mnist("train")   # (60000, 28, 28) uint8, (60000,) int64

Fashion-MNIST (Zalando, MIT licence): 70,000 real 28x28 grayscale product
photos in 10 classes, 60,000 train / 10,000 test, as four gzipped IDX files.
They are looked for, in this order:

1. `data_dir` (flag `--fashion_mnist_dir` of `pipelines.demo_dataset`), if
   given;
2. `/usr/share/datasets/fashion-mnist` (Debian/Ubuntu:
   `apt-get install dataset-fashion-mnist`);
3. Keras's cache `~/.keras/datasets/fashion-mnist`;
4. a download of the same four files from the address Keras uses
   (`DOWNLOAD_URL`, needs a network) into Keras's cache directory. The data
   layer does not import Keras for that.

A place that lacks the files is skipped (a given `data_dir` with a warning);
if none works, one ValueError names all of them and the apt command.
"""

import gzip
import os
import shutil
import tempfile
import urllib.request

from absl import logging
import numpy as np

# The official class names, in label order.
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
KERAS_CACHE_DIR = os.path.join("~", ".keras", "datasets", "fashion-mnist")
APT_COMMAND = "apt-get install dataset-fashion-mnist"
# Where keras.datasets.fashion_mnist.load_data() downloads from.
DOWNLOAD_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
_DOWNLOAD_TIMEOUT_S = 60

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_SIZES = {"train": 60000, "test": 10000}
_IMAGES_MAGIC = 2051  # IDX: unsigned byte, 3 dimensions.
_LABELS_MAGIC = 2049  # IDX: unsigned byte, 1 dimension.


def _read_idx(path, magic, ndim):
    """Reads one gzipped IDX file of unsigned bytes into a NumPy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data, ">i4", count=1 + ndim)
    if header[0] != magic:
        raise ValueError(f"{path}: not an IDX file of {ndim}-d unsigned bytes "
                         f"(magic {header[0]}, expected {magic}).")
    shape = tuple(int(d) for d in header[1:])
    return np.frombuffer(data, np.uint8, offset=4 * (1 + ndim)).reshape(shape)


def _read_dir(directory, split):
    """(images, labels) of `split` from `directory`, or None if files lack."""
    image_file, label_file = (os.path.join(directory, f) for f in _FILES[split])
    if not (os.path.isfile(image_file) and os.path.isfile(label_file)):
        return None
    images = _read_idx(image_file, _IMAGES_MAGIC, 3)
    labels = _read_idx(label_file, _LABELS_MAGIC, 1).astype(np.int64)
    if images.shape != (_SIZES[split], 28, 28) or labels.shape != (_SIZES[split],):
        raise ValueError(f"{directory}: Fashion-MNIST {split} should be "
                         f"{_SIZES[split]} 28x28 images, found images "
                         f"{images.shape}, labels {labels.shape}.")
    return images, labels


def _download(split):
    """Downloads the split's two files into Keras's cache; None on failure.

    Each file goes to a temporary name first and is renamed when complete,
    so an interrupted download never leaves a truncated file behind.
    """
    directory = os.path.expanduser(KERAS_CACHE_DIR)
    try:
        os.makedirs(directory, exist_ok=True)
        for name in _FILES[split]:
            target = os.path.join(directory, name)
            if os.path.isfile(target):
                continue
            with urllib.request.urlopen(DOWNLOAD_URL + name,
                                        timeout=_DOWNLOAD_TIMEOUT_S) as response, \
                    tempfile.NamedTemporaryFile(dir=directory, delete=False) as tmp:
                shutil.copyfileobj(response, tmp)
            os.replace(tmp.name, target)
        return _read_dir(directory, split)
    except (OSError, ValueError) as e:
        logging.warning("Downloading Fashion-MNIST from %s failed: %s", DOWNLOAD_URL, e)
        return None


def load_fashion_mnist(split, data_dir=None):
    """Loads one official split of Fashion-MNIST.

    Args:
        split: "train" (60,000 images) or "test" (10,000 images).
        data_dir: optional directory with the four `*-ubyte.gz` files; looked
            at first.

    Returns:
        (images, labels): uint8 (N, 28, 28) and int64 (N,) with ids in
        0..9 (names in `CLASS_NAMES`).

    Raises:
        ValueError: unknown split, malformed files, or the files are in none
            of the places (the message lists them and the apt command).
    """
    if split not in _FILES:
        raise ValueError(f"split={split!r}: choose 'train' or 'test'.")
    places = []
    if data_dir:
        places.append(data_dir)
    places += [DEBIAN_DIR, os.path.expanduser(KERAS_CACHE_DIR)]
    for directory in places:
        found = _read_dir(directory, split)
        if found is not None:
            logging.info("Fashion-MNIST %s from %s", split, directory)
            return found
        if directory == data_dir:
            logging.warning("--fashion_mnist_dir=%s has no Fashion-MNIST %s "
                            "files; trying the default places.", data_dir, split)
    found = _download(split)
    if found is not None:
        return found
    raise ValueError(
        f"Fashion-MNIST {split} files ({', '.join(_FILES[split])}) were not "
        f"found in {' nor '.join(places)}, and could not be downloaded from "
        f"{DOWNLOAD_URL}. Install them with `{APT_COMMAND}` (Debian/"
        "Ubuntu) or pass --fashion_mnist_dir=DIR.")

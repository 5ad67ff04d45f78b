"""Finds and reads the real Fashion-MNIST files, the demo set's source.

    images, labels = load_fashion_mnist("train")   # (60000, 28, 28) uint8, (60000,) int64

`load_fashion_mnist` looks in `data_dir`, Debian's package folder and Keras's
cache, else downloads; every file is checked against the SHA-256 of its
content. The places and the checks: docs/data.md, Fashion-MNIST files.
"""

import gzip
import hashlib
import http.client
import os
import shutil
import urllib.request
import zlib

from absl import logging
import numpy as np

from pipelines.utils import files

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
# SHA-256 of each file's DECOMPRESSED content (the IDX data; Debian's files
# are recompressed, so the .gz bytes differ between mirrors).
_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte.gz":
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte.gz":
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte.gz":
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


def _verified_content(path, name, shown=None):
    """The decompressed bytes of Fashion-MNIST file `name`, read from `path`.

    Raises:
        ValueError: naming the file (`shown`, default `path`): truncated or
            corrupt gzip data, or not the official content.
    """
    shown = shown or path
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{shown}: truncated or corrupt gzip file ({e}); delete it "
                         "and copy or download it again.") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != _SHA256[name]:
        raise ValueError(f"{shown}: not the official Fashion-MNIST {name} (SHA-256 of "
                         f"its content {digest}, expected {_SHA256[name]}); delete it "
                         "and copy or download it again.")
    return data


def _read_idx(path):
    """Reads one verified gzipped IDX file of unsigned bytes into a NumPy array."""
    data = _verified_content(path, os.path.basename(path))
    ndim = data[3]  # IDX magic: 0, 0, 8 (unsigned byte), number of dimensions.
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    return np.frombuffer(data, np.uint8, offset=4 * (1 + ndim)).reshape(shape)


def _read_dir(directory, split):
    """(images, labels) of `split` from `directory`, or None if files lack."""
    image_file, label_file = (os.path.join(directory, f) for f in _FILES[split])
    if not (os.path.isfile(image_file) and os.path.isfile(label_file)):
        return None
    return _read_idx(image_file), _read_idx(label_file).astype(np.int64)


def _fetch(name, directory):
    """Downloads file `name` into `directory`: checked, then renamed into place
    (`files.atomic_output`: nothing is left behind on a failure).

    Raises:
        ValueError: the transfer failed or the file is bad (naming its URL).
        OSError: the directory is not writable.
    """
    url = DOWNLOAD_URL + name
    with files.atomic_output(os.path.join(directory, name), binary=True) as out:
        try:
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                shutil.copyfileobj(response, out)
        except (OSError, http.client.HTTPException) as e:
            raise ValueError(f"download of {url} failed: {type(e).__name__}: {e}") from None
        out.flush()
        _verified_content(out.name, name, shown=f"download of {url}")


def _download(split):
    """Downloads the split's two files into Keras's cache and reads them.

    Raises:
        ValueError: why the download failed (naming the file).
    """
    directory = os.path.expanduser(KERAS_CACHE_DIR)
    try:
        os.makedirs(directory, exist_ok=True)
        for name in _FILES[split]:
            if not os.path.isfile(os.path.join(directory, name)):
                _fetch(name, directory)
    except OSError as e:
        raise ValueError(f"cannot write into {directory}: {e}") from None
    return _read_dir(directory, split)


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
        ValueError: unknown split, a truncated, corrupt or unofficial file
            (named), or the files are in none of the places and the download
            failed (the message lists the places, the reason and the apt
            command).
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
    try:
        return _download(split)
    except ValueError as e:
        reason = str(e)
    raise ValueError(
        f"Fashion-MNIST {split} files ({', '.join(_FILES[split])}) were not "
        f"found in {' nor '.join(places)}, and could not be downloaded from "
        f"{DOWNLOAD_URL} ({reason}). Install them with `{APT_COMMAND}` (Debian/"
        "Ubuntu) or pass --fashion_mnist_dir=DIR.")

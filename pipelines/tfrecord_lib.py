"""The one TFRecord schema of mlcrl_tf, and the atomic sharded writer.

Schema (every dataset, every split):

    image/encoded          bytes       original image file bytes
    image/filename         bytes       path relative to the image directory
    image/class/label      int64 list  positive class ids (difficult included)
    image/class/difficult  int64 list  class ids difficult for this image

Beside the shards: `labels.txt` (line i = class name of id i; only "\\n"
separates lines, so a class name may not hold any character
`str.splitlines` breaks on) and `<split>_report.json` (counts, the number of
records of every shard, every skipped and re-encoded image with the reason).

Every converter library (`pipelines/{coco,voc,csv}_lib.py`, behind the
`*_to_tfrecord.py` scripts; the demo generator goes through `coco_lib`)
resolves its image names with `ImagePaths` and hands a list of `ImageRecord`s
to `write_split`.

Image names (`ImagePaths`): every name is resolved to its real path (`..`
folded, symlinks followed). It must stay inside the real path of the image
folder, and two names may not resolve to the same file (`a.jpg`, `./a.jpg`);
either is one `ValueError` naming the entry. `allow_outside=True`
(`--allow_paths_outside_image_dir`) lifts the first rule only.

One image (`prepare_image`), bounded by `ImageLimits`:

* Only a regular file is read (a FIFO, device, directory or socket, also
  behind a symlink, is skipped with the reason: never a hang, never an
  endless read), at most `max_bytes` (`--max_image_bytes`, 256 MiB) of it;
  a larger file is skipped.
* The width and height come from the header (PIL's lazy open); an image of
  more than `max_pixels` pixels (`--max_image_pixels`, 100 million) is
  skipped before anything is decoded. PIL's own decompression-bomb limit is
  replaced by this budget while the header is read.
* The file must then fully decode with PIL *and* with `tf.io.decode_image(
  channels=3, expand_animations=False)` to the same height and width. A
  missing, empty, truncated or otherwise undecodable file is skipped and
  listed in the report with the reason; it never stops the conversion. An
  out-of-memory while decoding (`MemoryError`, TensorFlow's
  `ResourceExhaustedError`) is skipped with "out of memory" as the reason.
* The original file bytes are stored, except in three cases where the image
  is re-encoded (and listed under `reencoded` in the report with the reason):
  1. The EXIF orientation tag is 2..8 (phone/camera photos, some of COCO):
     TensorFlow ignores EXIF, so the pixels would be stored sideways. The
     image is rotated upright with `PIL.ImageOps.exif_transpose` and saved
     as JPEG quality 95 (PNG if it has alpha or a palette).
  2. An animated GIF: only its first frame is stored, as PNG (TensorFlow
     would decode every frame of the original on every read).
  3. The format is not JPEG/PNG/GIF/BMP (TIFF, WebP, ...), or TensorFlow
     cannot decode it although PIL can: converted to RGB and saved as JPEG
     quality 95, or PNG if it had alpha, a palette or transparency.
  Measured with TF 2.21: grayscale and CMYK (Adobe) JPEGs, grayscale,
  palette, RGBA and 16-bit PNGs (scaled correctly to 8 bit), still GIFs and
  BMP all decode to RGB, so they are kept as they are. TF's `decode_image`
  also reads WebP, but the schema promises JPEG/PNG/GIF/BMP. A PNG named
  `.jpg` is kept: `tf.io.decode_image` sniffs the content, not the name.

A split (`write_split`):

* Shuffles the records with a fixed seed (so a CSV sorted by class does not
  give shards of one class) and deals them round-robin into
  `<split>-00000-of-00008.tfrecord` ... Output is identical for any
  `num_workers`.
* Worker processes (`num_workers`, 'spawn' context, a
  `concurrent.futures.ProcessPoolExecutor`) read and check the images in
  chunks of `CHUNK_SIZE`; this process writes every shard, in order, and
  reports progress (`pipelines.progress`). A worker that dies (killed, out of
  memory) fails the conversion with one `ConversionError` instead of a hang.
* Writes every file under a hidden temporary name
  (`.<split>-00000-of-00008.tfrecord.tmp-<pid>`, likewise `labels.txt` and
  the report) and fsyncs it. An interrupted run leaves only hidden
  temporaries, removed by the next run of the same split (two runs writing
  the same split into the same directory at the same time are not
  supported).
* Switches generations in ONE atomic step: the journal
  `.<split>.switch.json` (the renames to do and the old shards to delete) is
  written atomically; then the renames run and the journal is deleted. While
  a journal exists, `find_shards` (and `read_class_names`,
  `expected_records`, `class_names_for_shards`) refuse that directory's
  split, so a kill at any moment never leaves a mixed old/new set that a
  reader accepts: before the journal the old set is intact, after it the
  next `write_split` of the split (`finish_interrupted_switch`) completes the
  renames, then converts as asked.
* Refuses to replace an existing split unless `overwrite=True`.
* `labels.txt` is shared by the splits of a directory: a different existing
  one is an error, except with `overwrite=True` when no other split uses it.
* Output problems (an output path under a file, an unwritable or full disk)
  are one `ConversionError` (a ValueError) naming the path.

Output directories are local paths (atomic rename is a local-filesystem
guarantee). The reading side (`find_shards`, `expected_records`,
`count_records`, `class_names_for_shards`) also reads GCS-style paths through
`tf.io.gfile`. Every guarantee and limit is listed in docs/reliability.md.
"""

import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import dataclasses
import io
import itertools
import json
import multiprocessing
import os
import random
import re
import stat
import tempfile

from absl import flags
from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow as tf

from pipelines import image_header

ENCODED_KEY = "image/encoded"
FILENAME_KEY = "image/filename"
LABEL_KEY = "image/class/label"
DIFFICULT_KEY = "image/class/difficult"

LABELS_FILENAME = "labels.txt"

# tf.io.parse_single_example / parse_example spec for the schema above.
FEATURE_SPEC = {
    ENCODED_KEY: tf.io.FixedLenFeature([], tf.string),
    FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    LABEL_KEY: tf.io.VarLenFeature(tf.int64),
    DIFFICULT_KEY: tf.io.VarLenFeature(tf.int64),
}

# Formats stored as they are (when TensorFlow decodes them). MPO is how PIL
# names a JPEG carrying extra preview images (some camera photos).
KEPT_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "BMP")
JPEG_QUALITY = 95
REPORT_SUFFIX = "_report.json"
SWITCH_SUFFIX = ".switch.json"

# The reading side's pixel budget too (100 megapixels).
DEFAULT_MAX_IMAGE_PIXELS = image_header.DEFAULT_MAX_PIXELS
# 256 MiB: far above any JPEG/PNG photo within the pixel budget.
DEFAULT_MAX_IMAGE_BYTES = 256 * 1024 * 1024
# Images per task sent to a worker process (progress granularity).
CHUNK_SIZE = 16

_EXIF_ORIENTATION = 0x0112
_SHARD_RE = re.compile(
    r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.tfrecord$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SWITCH_RE = re.compile(r"^\.(?P<split>.+)" + re.escape(SWITCH_SUFFIX) + "$")
_RESERVED_REPORT_KEYS = (
    "split", "num_shards", "shards", "num_input_records", "num_records",
    "num_skipped", "skipped", "num_reencoded", "reencoded", "num_zero_label",
    "zero_label", "class_counts", "labels_file", "max_image_pixels",
    "max_image_bytes")


def make_example(encoded, filename, labels, difficult=()):
    """Builds one tf.train.Example of the schema.

    Args:
        encoded: the image file's bytes.
        filename: str, path relative to the image directory.
        labels: iterable of int class ids (positives, difficult included).
        difficult: iterable of int class ids difficult for this image.

    Returns:
        A `tf.train.Example`.
    """
    def int64s(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))

    def bytes_(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    return tf.train.Example(features=tf.train.Features(feature={
        ENCODED_KEY: bytes_(encoded),
        FILENAME_KEY: bytes_(filename.encode("utf-8")),
        LABEL_KEY: int64s(sorted(set(int(c) for c in labels))),
        DIFFICULT_KEY: int64s(sorted(set(int(c) for c in difficult))),
    }))


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image to convert.

    Attributes:
        path: where to read the image file.
        filename: the name stored in `image/filename` (relative to the
            dataset's image directory).
        labels: positive class ids, difficult ones included.
        difficult: class ids difficult for this image (subset of `labels`).
    """
    path: str
    filename: str
    labels: tuple = ()
    difficult: tuple = ()


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Resource limits of one image (see the module doc).

    Attributes:
        max_pixels: width x height above which an image is skipped before
            decoding (`--max_image_pixels`).
        max_bytes: file size above which an image is skipped before reading
            (`--max_image_bytes`).
    """
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __post_init__(self):
        for name in ("max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (
                    value < 1):
                raise ValueError(f"ImageLimits.{name} must be a positive "
                                 f"int, got {value!r}")


class ImageError(ValueError):
    """An image file that cannot be stored; `reason` says why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ConversionError(ValueError):
    """A conversion that cannot finish: the output cannot be written, or a
    worker process died. The message names the path or the cause."""


# ----------------------------------------------------------------------------
# Names and small files.
# ----------------------------------------------------------------------------

def shard_filename(split, index, num_shards):
    """Returns `<split>-%05d-of-%05d.tfrecord`."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def split_file_pattern(data_dir, split):
    """Returns the glob pattern of a split's shards in `data_dir`."""
    return os.path.join(data_dir, f"{split}-?????-of-?????.tfrecord")


def report_path(data_dir, split):
    """Returns the path of `<split>_report.json` in `data_dir`."""
    return os.path.join(data_dir, split + REPORT_SUFFIX)


def switch_journal_path(data_dir, split):
    """Returns the path of the hidden `.<split>.switch.json` journal."""
    return os.path.join(data_dir, f".{split}{SWITCH_SUFFIX}")


def check_input_file(path, what):
    """Raises ValueError unless `path` is an existing regular file.

    Args:
        path: the file (symlinks are followed).
        what: how to name it, e.g. "CSV file".
    """
    if not os.path.exists(path):
        raise ValueError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} is not a regular file")


def class_name_problem(name):
    """Returns why `name` cannot be a class name, or None if it can.

    A class name is a non-empty str without surrounding white space and
    without any character `str.splitlines` breaks on (\\n \\r \\x0b \\x0c
    \\x1c \\x1d \\x1e \\x85 \\u2028 \\u2029): labels.txt holds one per line.
    """
    if not isinstance(name, str):
        return f"is not a string ({type(name).__name__})"
    if not name.strip():
        return "is empty"
    if name != name.strip():
        return "has leading or trailing white space"
    if len(f"x{name}x".splitlines()) != 1:
        return ("contains a line break (one of \\n \\r \\x0b \\x0c \\x1c-\\x1e "
                "\\x85 \\u2028 \\u2029), which would split labels.txt")
    return None


def check_class_names(class_names, what="class_names"):
    """Returns `class_names` as a list of str.

    Raises:
        ValueError: naming `what`, if it is empty, repeats a name or has a
            name that `class_name_problem` refuses.
    """
    names = list(class_names)
    if not names:
        raise ValueError(f"{what} is empty")
    seen = set()
    for i, name in enumerate(names):
        problem = class_name_problem(name)
        if problem:
            raise ValueError(f"{what}: class name {name!r} (id {i}) {problem}")
        if name in seen:
            raise ValueError(f"{what}: class name {name!r} appears twice")
        seen.add(name)
    return names


def read_class_names(path):
    """Reads a labels file (line i = name of class id i).

    Only "\\n" separates lines (a "\\r\\n" file is fine: names are stripped);
    any other line-break character inside a name is an error.

    Args:
        path: a labels.txt-style file, or a directory holding `labels.txt`.

    Returns:
        The list of class names.

    Raises:
        ValueError: the file is missing, empty, not UTF-8, has blank lines
            between names, a bad or repeated name, or a conversion into its
            directory was interrupted while switching files.
    """
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, LABELS_FILENAME)
    if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
        raise ValueError(f"labels file {path} does not exist")
    _check_no_switch(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"labels file {path} is not UTF-8: {e}") from None
    names = [line.strip() for line in text.rstrip("\r\n").split("\n")]
    if names == [""]:
        raise ValueError(f"labels file {path} is empty")
    if "" in names:
        raise ValueError(f"labels file {path}: line {names.index('') + 1} is "
                         "blank (line i must be the name of class id i)")
    return check_class_names(names, f"labels file {path}")


def _temporary_path(path):
    return os.path.join(os.path.dirname(path),
                        f".{os.path.basename(path)}.tmp-{os.getpid()}")


def _fsync_path(path):
    """fsyncs a file or directory (a no-op where the OS refuses)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # Some filesystems refuse fsync on a directory.
        pass
    finally:
        os.close(fd)


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomically(path, text):
    tmp = _temporary_path(path)
    try:
        _write_text(tmp, text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_path(os.path.dirname(path) or ".")


def format_summary(report, output_dir):
    """One line for a converter to print after `write_split`."""
    return (f"{report['split']}: wrote {report['num_records']} images "
            f"({report['num_skipped']} skipped, {report['num_reencoded']} "
            f"re-encoded) to "
            f"{os.path.join(output_dir, report['split'])}-*-of-"
            f"{report['num_shards']:05d}.tfrecord; report "
            f"{report_path(output_dir, report['split'])}")


# ----------------------------------------------------------------------------
# Image names.
# ----------------------------------------------------------------------------

class ImagePaths:
    """Resolves the image names of one annotation list (see module doc).

    Args:
        image_dir: the folder the names are relative to.
        allow_outside: accept absolute names and names resolving outside
            `image_dir` (`--allow_paths_outside_image_dir`).
    """

    def __init__(self, image_dir, allow_outside=False):
        self.image_dir = image_dir
        self.root = os.path.realpath(image_dir)
        self.allow_outside = allow_outside
        self._first_entry = {}  # Real path -> the entry that named it.

    def resolve(self, name, entry):
        """Returns the real path of image `name`.

        Args:
            name: the image's name in the annotations.
            entry: how errors name the annotation entry, e.g.
                "train.csv, line 3".

        Raises:
            ValueError: naming `entry`: an empty name, an absolute name or one
                resolving outside the image folder (unless `allow_outside`),
                or a file another entry already named.
        """
        if not isinstance(name, str) or not name.strip() or "\0" in name:
            raise ValueError(f"{entry}: bad image file name {name!r}")
        if os.path.isabs(name) and not self.allow_outside:
            raise ValueError(
                f"{entry}: file name {name} must be relative to image_dir "
                f"{self.image_dir} (or pass --allow_paths_outside_image_dir)")
        real = os.path.realpath(os.path.join(self.image_dir, name))
        if not self.allow_outside and os.path.commonpath(
                [real, self.root]) != self.root:
            raise ValueError(
                f"{entry}: {name} resolves to {real}, outside image_dir "
                f"{self.root} (pass --allow_paths_outside_image_dir to allow "
                "it)")
        if real in self._first_entry:
            raise ValueError(f"{entry}: {name} is the same file ({real}) as "
                             f"{self._first_entry[real]}")
        self._first_entry[real] = entry
        return real


# ----------------------------------------------------------------------------
# One image.
# ----------------------------------------------------------------------------

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_file_kind(mode):
    """None for a regular file, else what it is ("a FIFO", ...) by `st_mode`."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _FILE_KINDS if test(mode)), "a special file")


def read_image_file(path, max_bytes=DEFAULT_MAX_IMAGE_BYTES):
    """Reads a regular file of at most `max_bytes` bytes.

    Opened without blocking (a FIFO does not hang) and checked with fstat
    on the open file, so a file swapped for a special one is caught too.

    Raises:
        ImageError: missing, not a regular file, larger than `max_bytes`,
            empty or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None
    try:
        info = os.fstat(fd)
        kind = special_file_kind(info.st_mode)
        if kind:
            raise ImageError(path, f"not a regular file ({kind})")
        if info.st_size > max_bytes:
            raise ImageError(path, f"file of {info.st_size} bytes exceeds the "
                             f"size cap --max_image_bytes={max_bytes}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # The file grew while being read.
        raise ImageError(path, f"file exceeds the size cap "
                         f"--max_image_bytes={max_bytes}")
    if not data:
        raise ImageError(path, "empty file")
    return data


@contextlib.contextmanager
def _pil_bomb_check_off():
    """Our pixel budget (checked right after the header) replaces PIL's own
    decompression-bomb limit, so that the budget flag decides alone.
    Not thread-safe (PIL's limit is a module global); restored on exit."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _open_image(data, path, max_pixels):
    """Reads the header, checks the pixel budget, then decodes frame 0.

    Returns:
        `(image, animated, orientation)`: the loaded PIL image (first
        frame), whether it is an animated GIF, and its EXIF orientation.
    """
    with _pil_bomb_check_off():
        try:
            image = Image.open(io.BytesIO(data))
        except MemoryError:
            raise
        except Exception as e:  # PIL raises many types on bad data.
            raise ImageError(path, f"not a readable image (PIL: {e})") from None
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(path, f"{width}x{height} = {width * height} "
                             "pixels exceeds the pixel budget "
                             f"--max_image_pixels={max_pixels}")
        try:
            animated = image.format == "GIF" and bool(image.is_animated)
            image.seek(0)
            image.load()
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except MemoryError:
            raise
        except Exception as e:  # PIL raises many types on bad data.
            raise ImageError(path, f"not a readable image (PIL: {e})") from None
    return image, animated, orientation


def _tf_decode_problem(data, size, path):
    """Returns None if TF decodes `data` to RGB of `size` (w, h), else why."""
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except tf.errors.ResourceExhaustedError:
        raise ImageError(path, "out of memory while TensorFlow decoded it "
                         "(ResourceExhaustedError)") from None
    except tf.errors.OpError as e:
        message = e.message.strip().splitlines()[0]
        return "TensorFlow cannot decode it: " + message.split("}} ")[-1]
    height, width = image.shape[:2]
    if (width, height) != tuple(size):
        return (f"TensorFlow decodes it as {width}x{height}, "
                f"PIL as {size[0]}x{size[1]}")
    return None


def _to_8bit(image):
    """PIL's convert('RGB') clips 16/32-bit integer images; scale instead."""
    if image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.uint32) >> 8
    elif image.mode in ("I", "F"):
        array = np.asarray(image).astype(np.float64)
        if array.max() > 255:
            array = array * (255.0 / 65535.0)
        array = np.clip(np.round(array), 0, 255)
    else:
        return image
    return Image.fromarray(array.astype(np.uint8), mode="L")


def _reencode(image, lossless=False):
    """Encodes a PIL image as RGB JPEG q95, or PNG if lossless is asked or
    the image has alpha, a palette or transparency."""
    lossless = (lossless or image.mode in ("P", "PA", "RGBA", "LA", "La",
                                           "RGBa")
                or "transparency" in image.info)
    image = _to_8bit(image).convert("RGB")
    buffer = io.BytesIO()
    if lossless:
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), image.size


def _prepare_bytes(data, path, max_pixels):
    image, animated, orientation = _open_image(data, path, max_pixels)
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        reason = f"EXIF orientation {orientation}, rotated upright"
    elif animated:
        reason = "animated GIF, first frame stored"
    elif image.format not in KEPT_FORMATS:
        reason = f"{image.format} is not JPEG/PNG/GIF/BMP"
    else:
        reason = _tf_decode_problem(data, image.size, path)
        if reason is None:
            return data, None
    try:
        encoded, size = _reencode(image, lossless=animated)
    except MemoryError:
        raise
    except Exception as e:  # e.g. a PIL mode without an RGB conversion.
        raise ImageError(path, f"{reason}; cannot re-encode: {e}") from None
    problem = _tf_decode_problem(encoded, size, path)
    if problem is not None:
        raise ImageError(path, f"{reason}; re-encoded: {problem}")
    return encoded, reason


def prepare_image(path, limits=None):
    """Reads and checks one image file; returns the bytes to store.

    Args:
        path: the image file.
        limits: `ImageLimits` (default: the defaults).

    Returns:
        `(encoded, reason)`: the bytes for `image/encoded`, and None if they
        are the original file's bytes, else why the image was re-encoded.

    Raises:
        ImageError: (a ValueError) the file cannot be stored; `.reason`.
    """
    limits = limits or ImageLimits()
    try:
        data = read_image_file(path, limits.max_bytes)
        return _prepare_bytes(data, path, limits.max_pixels)
    except MemoryError:
        raise ImageError(path, "out of memory while decoding it "
                         "(MemoryError); lower --max_image_pixels or give "
                         "the converter more memory") from None


# ----------------------------------------------------------------------------
# A split: checking the arguments and the output directory.
# ----------------------------------------------------------------------------

def _check_arguments(records, split, class_names, num_shards, num_workers,
                     extra_report):
    """Checks write_split's arguments.

    Returns:
        `(records, class_names, num_workers)` as lists and a worker count.
    """
    records = list(records)
    class_names = check_class_names(class_names)
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(f"split {split!r}: use letters, digits, '_', '.', "
                         "'-' (not starting with '.' or '-')")
    if not isinstance(num_shards, int) or not 1 <= num_shards <= 99999:
        raise ValueError(f"num_shards must be an int in [1, 99999], got "
                         f"{num_shards!r}")
    if num_workers is None:
        num_workers = _default_num_workers(len(records))
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int, got "
                         f"{num_workers!r}")
    for key in extra_report or {}:
        if key in _RESERVED_REPORT_KEYS:
            raise ValueError(f"extra_report key {key!r} is reserved")
    _check_records(records, len(class_names))
    return records, class_names, num_workers


def _check_records(records, num_classes):
    if not records:
        raise ValueError("records is empty: nothing to convert")
    seen = set()
    for record in records:
        if not isinstance(record, ImageRecord):
            raise ValueError(f"records must be ImageRecords, got {record!r}")
        if record.filename in seen:
            raise ValueError(f"records: filename {record.filename!r} appears "
                             "twice")
        seen.add(record.filename)
        bad = [c for c in record.labels if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"records: {record.filename} has class ids {bad} "
                             f"outside [0, {num_classes})")
        if not set(record.difficult) <= set(record.labels):
            raise ValueError(f"records: {record.filename} has difficult ids "
                             "that are not among its labels")


def _default_num_workers(num_records):
    # A worker process costs a few seconds (it imports TensorFlow) and an
    # image ~6 ms (PIL + TF decode of a COCO-sized JPEG): one per 1000 images.
    return max(1, min(os.cpu_count() or 1, num_records // 1000))


def _make_output_dir(output_dir):
    """Creates `output_dir` and checks that a file can be created in it."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir} is not a directory")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create output_dir {output_dir}: "
                              f"{e.strerror or e}") from None
    try:  # O_TMPFILE where available: nothing is left behind.
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise ConversionError(f"output_dir {output_dir} is not writable: "
                              f"{e.strerror or e}") from None


def _final_shards(output_dir, split):
    """Existing final shard files of `split` (any shard count)."""
    names = []
    for name in os.listdir(output_dir):
        match = _SHARD_RE.match(name)
        if match and match.group("prefix") == split:
            names.append(os.path.join(output_dir, name))
    return sorted(names)


def _remove_stale_temporaries(output_dir, split):
    pattern = re.compile(
        r"^\.(" + re.escape(split) + r"-\d{5}-of-\d{5}\.tfrecord|"
        + re.escape(split + REPORT_SUFFIX) + "|"
        + re.escape(split + SWITCH_SUFFIX) + "|"
        + re.escape(LABELS_FILENAME) + r")\.tmp-\d+$")
    for name in os.listdir(output_dir):
        if pattern.match(name):
            logging.info("Removing %s left by an interrupted run.", name)
            os.remove(os.path.join(output_dir, name))


def _check_labels_file(output_dir, class_names, split, overwrite):
    """Returns True if labels.txt must be (re)written."""
    path = os.path.join(output_dir, LABELS_FILENAME)
    if not os.path.exists(path):
        return True
    if read_class_names(path) == class_names:
        return False
    others = sorted(name[:-len(REPORT_SUFFIX)]
                    for name in os.listdir(output_dir)
                    if name.endswith(REPORT_SUFFIX)
                    and name != split + REPORT_SUFFIX)
    if overwrite and not others:
        return True
    raise ValueError(
        f"{path} exists with different class names than split {split!r} "
        f"has; use another output directory"
        + (f" (splits {others} use the existing labels)" if others else
           " or pass overwrite=True (--overwrite)"))


def _prepare_output_dir(output_dir, split, class_names, overwrite):
    """Makes the directory ready for a new generation of `split`.

    Returns:
        `(old_shards, write_labels)`: the split's existing shard files and
        whether labels.txt is part of the new generation.
    """
    _make_output_dir(output_dir)
    finish_interrupted_switch(output_dir, split)
    old_shards = _final_shards(output_dir, split)
    existing = old_shards + [p for p in [report_path(output_dir, split)]
                             if os.path.exists(p)]
    if existing and not overwrite:
        raise ValueError(f"split {split!r} already exists in {output_dir} "
                         f"({existing[0]}); pass --overwrite (overwrite=True) "
                         "to replace it")
    write_labels = _check_labels_file(output_dir, class_names, split, overwrite)
    _remove_stale_temporaries(output_dir, split)
    return old_shards, write_labels


# ----------------------------------------------------------------------------
# A split: preparing images in worker processes, writing shards here.
# ----------------------------------------------------------------------------

def _prepare_record(record, limits):
    """Returns `(status, reason, serialized example or None)`."""
    try:
        encoded, reason = prepare_image(record.path, limits)
    except ImageError as e:
        return "skipped", e.reason, None
    example = make_example(encoded, record.filename, record.labels,
                           record.difficult)
    # deterministic=True: sorted feature keys, so the bytes do not depend on
    # the process (protobuf map order otherwise may).
    return ("reencoded" if reason else "written", reason,
            example.SerializeToString(deterministic=True))


def _prepare_chunk(task):
    """Runs in a worker process (or here): `(records, limits)` -> results."""
    records, limits = task
    return [_prepare_record(record, limits) for record in records]


def _prepared_chunks(tasks, num_workers):
    """Yields `_prepare_chunk(task)` for every task, in order.

    With more than one worker, at most 2 tasks per worker are in flight (so
    memory stays bounded) and a worker that dies raises ConversionError
    (ProcessPoolExecutor notices a dead process; multiprocessing.Pool would
    wait forever for its task).
    """
    if num_workers == 1:
        yield from map(_prepare_chunk, tasks)
        return
    # 'spawn': TensorFlow is not fork-safe once initialised.
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(num_workers,
                                                  mp_context=context)
    pending = collections.deque()
    try:
        for task in tasks:
            pending.append(pool.submit(_prepare_chunk, task))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except concurrent.futures.process.BrokenProcessPool:
        raise ConversionError(
            "a worker process died (killed by a signal or the out-of-memory "
            "killer) while reading images; nothing was written, rerun the "
            "conversion (with fewer --num_workers if memory is short)"
        ) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _ShardFile:
    """A TFRecord file being written; write errors name the file."""

    def __init__(self, path):
        self.path = path
        self._writer = self._call(tf.io.TFRecordWriter, path)

    def write(self, data):
        self._call(self._writer.write, data)

    def close(self):
        self._call(self._writer.close)
        self._call(_fsync_path, self.path)

    def abandon(self):
        """Closes the file after a failure (which is the error to report)."""
        with contextlib.suppress(OSError, tf.errors.OpError):
            self._writer.close()

    def _call(self, function, *args):
        try:
            return function(*args)
        except (OSError, tf.errors.OpError) as e:
            text = e.message if isinstance(e, tf.errors.OpError) else (
                e.strerror or str(e))
            raise ConversionError(f"cannot write {self.path}: {text}") from None


def _write_shard(path, chunk_results, progress=None):
    """Writes one shard from its chunks' `_prepare_chunk` results.

    Returns:
        One `(status, reason)` per record, in order.
    """
    outcomes = []
    shard = _ShardFile(path)
    try:
        for results in chunk_results:
            for status, reason, serialized in results:
                outcomes.append((status, reason))
                if serialized is not None:
                    shard.write(serialized)
            if progress is not None:
                progress.update(len(results))
    except BaseException:
        shard.abandon()  # The caller removes the temporary file.
        raise
    shard.close()
    return outcomes


def _write_shards(records, members, paths, num_workers, limits, progress):
    """Writes shard i = records[members[i]] to paths[i].

    Returns:
        One `(status, reason)` per record of `records`.
    """
    chunks = [[indices[i:i + CHUNK_SIZE]
               for i in range(0, len(indices), CHUNK_SIZE)]
              for indices in members]
    tasks = (([records[j] for j in chunk], limits)
             for shard_chunks in chunks for chunk in shard_chunks)
    results = _prepared_chunks(tasks, num_workers)
    outcome = [None] * len(records)
    try:
        for path, indices, shard_chunks in zip(paths, members, chunks):
            shard_outcomes = _write_shard(
                path, itertools.islice(results, len(shard_chunks)), progress)
            for index, result in zip(indices, shard_outcomes):
                outcome[index] = result
    finally:
        results.close()  # Stops the worker processes on an error.
    return outcome


# ----------------------------------------------------------------------------
# A split: switching generations in one atomic step.
# ----------------------------------------------------------------------------

def _check_no_switch(directory, split=None, listing=None):
    """Raises ValueError if a generation switch (of `split`, or of any split
    when None) was interrupted in `directory` (`listing`: its file names,
    if already listed)."""
    if listing is None:
        listing = tf.io.gfile.listdir(directory or ".")
    for name in listing:
        match = _SWITCH_RE.match(name)
        if match and split in (None, match.group("split")):
            raise ValueError(
                f"split {match.group('split')!r} in {directory or '.'} is "
                "half-way through a switch to newly converted files (the "
                f"converter was interrupted; journal {name}): rerun the "
                "conversion of that split (with --overwrite) to finish it")


def _read_journal(path):
    try:
        with open(path, encoding="utf-8") as f:
            journal = json.load(f)
        names = [name for pair in journal["rename"] for name in pair]
        names += list(journal["remove"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(
            f"switch journal {path} is unreadable ({e}); delete it and the "
            "split's files, then convert the split again") from None
    for name in names:
        if not isinstance(name, str) or os.path.basename(name) != name or (
                name in ("", ".", "..")):
            raise ConversionError(f"switch journal {path}: bad file name "
                                  f"{name!r}; delete it and convert again")
    return journal


def _apply_switch(output_dir, journal_path):
    """Does (or finishes) the renames and removals of a journal, then
    deletes the journal. Safe to repeat after a kill at any point."""
    journal = _read_journal(journal_path)
    try:
        for tmp_name, final_name in journal["rename"]:
            tmp = os.path.join(output_dir, tmp_name)
            final = os.path.join(output_dir, final_name)
            if os.path.exists(tmp):
                os.replace(tmp, final)
            elif not os.path.exists(final):
                raise ConversionError(
                    f"switch journal {journal_path}: neither {tmp} nor "
                    f"{final} exists; delete the journal and the split's "
                    "files, then convert the split again")
        for name in journal["remove"]:
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        _fsync_path(output_dir)
        os.remove(journal_path)
        _fsync_path(output_dir)
    except OSError as e:
        raise ConversionError(
            f"switching to the new files in {output_dir} failed "
            f"({e.strerror or e}: {e.filename}); the split stays refused "
            "until a rerun of the conversion finishes the switch") from None


def finish_interrupted_switch(output_dir, split):
    """Completes a generation switch of `split` that a kill interrupted.

    Args:
        output_dir: the shards' directory.
        split: the split name.

    Returns:
        True if there was one to finish.

    Raises:
        ConversionError: the journal or its files are unusable.
    """
    journal = switch_journal_path(output_dir, split)
    if not os.path.exists(journal):
        return False
    logging.warning("Finishing the switch of split %r that an interrupted "
                    "run left (%s).", split, journal)
    _apply_switch(output_dir, journal)
    return True


def _write_journal(output_dir, split, renames, removals):
    """Writes the switch journal atomically: THE step that commits a new
    generation (before it the old files stand, after it a rerun rolls
    forward; see `_apply_switch`)."""
    journal = {
        "split": split,
        "rename": [[os.path.basename(a), os.path.basename(b)]
                   for a, b in renames],
        "remove": [os.path.basename(p) for p in removals],
    }
    path = switch_journal_path(output_dir, split)
    try:
        _fsync_path(output_dir)  # The temporaries' names are durable first.
        _write_text_atomically(path, json.dumps(journal, indent=1) + "\n")
    except OSError as e:
        raise ConversionError(f"cannot write {path}: {e.strerror or e}"
                              ) from None


# ----------------------------------------------------------------------------
# A split: the writer.
# ----------------------------------------------------------------------------

def _deal(num_records, num_shards, shuffle_seed):
    """Record indices of each shard: shuffled, then dealt round-robin."""
    order = list(range(num_records))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    return [order[i::num_shards] for i in range(num_shards)]


def _check_some_stored(records, outcome, split):
    if all(status == "skipped" for status, _ in outcome):
        reasons = "; ".join(f"{r.filename}: {why}" for r, (_, why)
                            in list(zip(records, outcome))[:3])
        raise ValueError(f"none of the {len(records)} images of split "
                         f"{split!r} could be read ({reasons} ...)")


def write_split(records, output_dir, split, class_names, num_shards,
                num_workers=None, overwrite=False, extra_report=None,
                shuffle_seed=0, limits=None, progress=None):
    """Writes one split as sharded TFRecords, labels.txt and a report.

    Args:
        records: sequence of `ImageRecord`.
        output_dir: directory for the shards (created if needed).
        split: split name, e.g. "train2014"; letters, digits, `_ . -`.
        class_names: list of class names; class id i = class_names[i].
        num_shards: number of shard files (extra shards are empty files).
        num_workers: processes reading images; 1 = in this process. Default:
            min(CPUs, one per 1000 images), at least 1.
        overwrite: replace an existing split (see the module doc).
        extra_report: dict merged into the report (converter-specific keys).
        shuffle_seed: seed of the record order before the round-robin
            dealing; None keeps the given order.
        limits: `ImageLimits` (default: the defaults).
        progress: a `pipelines.progress.Progress` (started with the number
            of records and the split name), or None (silent).

    Returns:
        The report dict, also written to `<output_dir>/<split>_report.json`.

    Raises:
        ValueError: bad arguments, the split exists and overwrite is False,
            labels.txt differs, or no image at all could be read.
        ConversionError: (a ValueError) the output cannot be written or a
            worker process died.
    """
    records, class_names, num_workers = _check_arguments(
        records, split, class_names, num_shards, num_workers, extra_report)
    limits = limits or ImageLimits()
    old_shards, write_labels = _prepare_output_dir(output_dir, split,
                                                   class_names, overwrite)
    members = _deal(len(records), num_shards, shuffle_seed)
    final = [os.path.join(output_dir, shard_filename(split, i, num_shards))
             for i in range(num_shards)]
    renames = [(_temporary_path(path), path) for path in final]
    logging.info("Writing %d images of split %r into %d shards with %d "
                 "worker(s).", len(records), split, num_shards, num_workers)
    if progress is not None:
        progress.start(total=len(records), description=split)
    committed = False
    try:
        outcome = _write_shards(records, members, [a for a, _ in renames],
                                num_workers, limits, progress)
        _check_some_stored(records, outcome, split)
        report = _make_report(records, outcome, split, class_names, members,
                              final, limits)
        report.update(extra_report or {})
        _stage_texts(renames, output_dir, report,
                     class_names if write_labels else None)
        _write_journal(output_dir, split, renames,
                       [p for p in old_shards if p not in final])
        committed = True  # From the journal on, a rerun rolls forward.
    finally:
        if not committed:
            _remove_existing(tmp for tmp, _ in renames)
    _apply_switch(output_dir, switch_journal_path(output_dir, split))
    return report


def _stage_texts(renames, output_dir, report, class_names):
    """Writes the report (and labels.txt unless `class_names` is None)
    under temporary names, appending each to `renames` first."""
    texts = [(report_path(output_dir, report["split"]),
              json.dumps(report, indent=2) + "\n")]
    if class_names is not None:
        texts.append((os.path.join(output_dir, LABELS_FILENAME),
                      "\n".join(class_names) + "\n"))
    for path, text in texts:
        renames.append((_temporary_path(path), path))
        try:
            _write_text(renames[-1][0], text)
        except OSError as e:
            raise ConversionError(f"cannot write {renames[-1][0]}: "
                                  f"{e.strerror or e}") from None


def _remove_existing(paths):
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _make_report(records, outcome, split, class_names, shard_members, final,
                 limits):
    stored = [r for r, (status, _) in zip(records, outcome)
              if status != "skipped"]
    positives = np.zeros(len(class_names), np.int64)
    difficult = np.zeros(len(class_names), np.int64)
    for record in stored:
        positives[sorted(set(record.labels))] += 1
        difficult[sorted(set(record.difficult))] += 1

    def listed(wanted):
        return [{"filename": r.filename, "reason": why}
                for r, (status, why) in zip(records, outcome)
                if status == wanted]

    skipped, reencoded = listed("skipped"), listed("reencoded")
    zero_label = [r.filename for r in stored if not r.labels]
    return {
        "split": split,
        "num_shards": len(final),
        "shards": [
            {"file": os.path.basename(path),
             "num_records": sum(outcome[i][0] != "skipped" for i in members)}
            for path, members in zip(final, shard_members)],
        "num_input_records": len(records),
        "num_records": len(stored),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "num_reencoded": len(reencoded),
        "reencoded": reencoded,
        "num_zero_label": len(zero_label),
        "zero_label": zero_label,
        "class_counts": [
            {"id": i, "name": name, "positives": int(positives[i]),
             "difficult": int(difficult[i])}
            for i, name in enumerate(class_names)],
        "labels_file": LABELS_FILENAME,
        "max_image_pixels": limits.max_pixels,
        "max_image_bytes": limits.max_bytes,
    }


# ----------------------------------------------------------------------------
# Reading side.
# ----------------------------------------------------------------------------

def _check_shard_set(directory, prefix, listing, file_pattern):
    """Raises ValueError unless `<prefix>-*-of-M` in `directory` is one
    complete shard set with no switch in progress."""
    _check_no_switch(directory, prefix, listing)
    sets = {}
    for name in listing:
        other = _SHARD_RE.match(name)
        if other and other.group("prefix") == prefix:
            sets.setdefault(int(other.group("total")), set()).add(
                int(other.group("index")))
    where = os.path.join(directory, prefix)
    if len(sets) > 1:
        raise ValueError(
            f"{where}-*.tfrecord holds shard sets of different sizes "
            f"{sorted(sets)} (pattern {file_pattern!r}); remove the stale "
            "one or rerun the converter with --overwrite")
    total, indices = next(iter(sets.items()))
    missing = sorted(set(range(total)) - indices)
    if missing or max(indices) >= total:
        raise ValueError(
            f"incomplete shard set {where}-*-of-{total:05d}.tfrecord: "
            f"missing shard(s) {missing[:10]} (pattern {file_pattern!r}); "
            "a conversion was probably interrupted, rerun it with "
            "--overwrite")


def find_shards(file_pattern):
    """Returns the sorted files matching a pattern, checking shard sets.

    Hidden files (temporaries of a running or crashed conversion) are
    ignored. For every matched file named `<prefix>-NNNNN-of-MMMMM.tfrecord`,
    all M shards of that set must exist in its directory (the pattern itself
    may select only some of them), no second shard set with another M may
    share the prefix, and no interrupted generation switch of the prefix
    (`.<prefix>.switch.json`) may be pending. Other file names are returned
    as they are.

    Args:
        file_pattern: a glob pattern (`tf.io.gfile.glob` syntax).

    Returns:
        Sorted list of matching file paths.

    Raises:
        ValueError: nothing matches, a shard set is incomplete or mixed, or
            a conversion was interrupted while switching files.
    """
    files = sorted(path for path in tf.io.gfile.glob(file_pattern)
                   if not os.path.basename(path).startswith("."))
    if not files:
        raise ValueError(f"file pattern {file_pattern!r} matches no file")
    listings = {}
    checked = set()
    for path in files:
        match = _SHARD_RE.match(os.path.basename(path))
        directory = os.path.dirname(path)
        if not match or (directory, match.group("prefix")) in checked:
            continue
        checked.add((directory, match.group("prefix")))
        if directory not in listings:
            listings[directory] = tf.io.gfile.listdir(directory or ".")
        _check_shard_set(directory, match.group("prefix"),
                         listings[directory], file_pattern)
    return files


def _report_shard_counts(directory, split):
    """Shard file name -> record count from `<split>_report.json`, or None
    if there is no report."""
    _check_no_switch(directory, split)
    path = report_path(directory, split)
    if not tf.io.gfile.exists(path):
        return None
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            report = json.loads(f.read().decode("utf-8"))
        return {str(shard["file"]): int(shard["num_records"])
                for shard in report["shards"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"report {path} is unreadable or has no valid "
                         f"'shards' list ({e}); rerun the converter with "
                         "--overwrite") from None


def expected_records(files):
    """How many records each shard file should hold, from the reports.

    Args:
        files: shard paths (e.g. from `find_shards`).

    Returns:
        dict path -> the record count the converter wrote into that file
        (the `shards` list of `<split>_report.json` beside it), or None where
        no report lists the file (not a converter's shard name, no report,
        or a report of another shard set).

    Raises:
        ValueError: a report is unreadable, or a switch is half done.
    """
    reports = {}
    expected = {}
    for path in files:
        name = os.path.basename(path)
        match = _SHARD_RE.match(name)
        if not match:
            expected[path] = None
            continue
        key = (os.path.dirname(path), match.group("prefix"))
        if key not in reports:
            reports[key] = _report_shard_counts(*key)
        expected[path] = (reports[key] or {}).get(name)
    return expected


def _count_file_records(path):
    try:
        return int(tf.data.TFRecordDataset(path).reduce(
            np.int64(0), lambda n, _: n + 1).numpy())
    except tf.errors.OpError as e:
        raise ValueError(f"cannot count the records of {path}: "
                         f"{e.message.strip().splitlines()[0]}") from None


def count_records(files):
    """Records in exactly these shard files.

    Per-shard counts come from the converters' reports
    (`expected_records`); a file no report lists is read and counted.

    Args:
        files: shard paths (e.g. from `find_shards`; a subset of a split
            counts only that subset).

    Returns:
        The total number of records.

    Raises:
        ValueError: a report is unreadable, or a file that had to be read
            is corrupt.
    """
    return sum(count if count is not None else _count_file_records(path)
               for path, count in expected_records(files).items())


def _first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"class id {i} is {x!r} in one and {y!r} in the other"
    return f"{len(a)} vs {len(b)} classes"


def class_names_for_shards(files):
    """The class names of shard files, from the labels.txt beside them.

    Every directory holding one of `files` must agree: all have a
    labels.txt with the same names (returned), or none has one (None is
    returned: the caller must know the names another way).

    Args:
        files: shard paths (e.g. from `find_shards`).

    Returns:
        The list of class names, or None if no directory has a labels.txt.

    Raises:
        ValueError: two labels.txt differ (both named), only some
            directories have one, or a labels.txt is unreadable.
    """
    found = {}
    missing = []
    for directory in dict.fromkeys(os.path.dirname(path) for path in files):
        path = os.path.join(directory, LABELS_FILENAME)
        if tf.io.gfile.exists(path):
            found[path] = read_class_names(path)
        else:
            missing.append(directory or ".")
    if not found:
        return None
    first_path, first = next(iter(found.items()))
    if missing:
        raise ValueError(
            f"the shards in {missing[0]} have no {LABELS_FILENAME} but those "
            f"beside {first_path} do: their class ids cannot be checked to "
            "agree; select shards of one label map")
    for path, names in found.items():
        if names != first:
            raise ValueError(
                f"{first_path} and {path} differ "
                f"({_first_difference(first, names)}): the selected shards "
                "use different class ids; select shards of one label map")
    return first


# ----------------------------------------------------------------------------
# Flags shared by the converters.
# ----------------------------------------------------------------------------

def define_writer_flags(num_shards):
    """The flags every converter shares (defined only when a converter runs
    as a script): output, shards, workers, overwrite, the image limits and
    --allow_paths_outside_image_dir."""
    flags.DEFINE_string("output_dir", None, "Output folder.", required=True)
    flags.DEFINE_integer("num_shards", num_shards, "Number of shard files.")
    flags.DEFINE_integer("num_workers", None, "Processes reading images.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing split.")
    flags.DEFINE_integer(
        "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS,
        "Skip an image with more pixels (width x height, read from its "
        "header before decoding).", lower_bound=1)
    flags.DEFINE_integer(
        "max_image_bytes", DEFAULT_MAX_IMAGE_BYTES,
        "Skip an image file larger than this many bytes.", lower_bound=1)
    flags.DEFINE_bool(
        "allow_paths_outside_image_dir", False,
        "Accept absolute image names and names resolving (symlinks "
        "followed) outside the image folder.")


def writer_options(flag_values):
    """The keyword arguments of a converter's `convert` from the shared
    flags (see `define_writer_flags`)."""
    return {
        "num_shards": flag_values.num_shards,
        "num_workers": flag_values.num_workers,
        "overwrite": flag_values.overwrite,
        "limits": ImageLimits(flag_values.max_image_pixels,
                              flag_values.max_image_bytes),
        "allow_paths_outside_image_dir":
            flag_values.allow_paths_outside_image_dir,
    }

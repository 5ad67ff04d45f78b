"""The one TFRecord schema of mlcrl_tf, and the atomic sharded writer.

Schema (every dataset, every split):

    image/encoded          bytes       original image file bytes
    image/filename         bytes       path relative to the image directory
    image/class/label      int64 list  positive class ids (difficult included)
    image/class/difficult  int64 list  class ids difficult for this image

Beside the shards: `labels.txt` (line i = class name of id i) and
`<split>_report.json`.

Every converter (`pipelines/{coco,voc,csv}_to_tfrecord.py`) builds a list of
`ImageRecord`s and hands it to `write_split`, which:

* Checks every image (`prepare_image`). The file must open and fully decode
  with PIL *and* decode with `tf.io.decode_image(channels=3,
  expand_animations=False)` to the same height and width. A missing, empty,
  truncated or otherwise undecodable file is skipped and listed in the report
  with the reason; it never stops the conversion.
* Stores the original file bytes, except in two cases where the image is
  re-encoded (and listed under `reencoded` in the report with the reason):
  1. The EXIF orientation tag is 2..8 (phone/camera photos, some of COCO):
     TensorFlow ignores EXIF, so the pixels would be stored sideways. The
     image is rotated upright with `PIL.ImageOps.exif_transpose` and saved
     as JPEG quality 95 (PNG if it has alpha or a palette).
  2. The format is not JPEG/PNG/GIF/BMP (TIFF, WebP, ...), or TensorFlow
     cannot decode it although PIL can: converted to RGB and saved as JPEG
     quality 95, or PNG if it had alpha, a palette or transparency.
  Measured with TF 2.21: grayscale and CMYK (Adobe) JPEGs, grayscale,
  palette, RGBA and 16-bit PNGs (scaled correctly to 8 bit), GIF (first
  frame) and BMP all decode to RGB, so they are kept as they are. TF's
  `decode_image` also reads WebP, but the schema promises JPEG/PNG/GIF/BMP.
  A PNG named `.jpg` is kept: `tf.io.decode_image` (and even `decode_jpeg`)
  sniff the content, not the name.
* Shuffles the records with a fixed seed (so a CSV sorted by class does not
  give shards of one class) and deals them round-robin into
  `<split>-00000-of-00008.tfrecord` ... Output is identical for any
  `num_workers`.
* Writes every shard under a hidden temporary name
  (`.<split>-00000-of-00008.tfrecord.tmp-<pid>`) and renames them only when
  all shards of the split are complete, so an interrupted run leaves no file
  matching `<split>-*.tfrecord`. Temporary files left by a crashed run are
  removed by the next run of the same split (two runs writing the same split
  into the same directory at the same time are not supported).
* Refuses to replace an existing split unless `overwrite=True`; with it, the
  old shards are removed only after the new ones are complete.
* Writes `labels.txt` (a different existing one is an error, the same one is
  fine: splits share a directory) and `<split>_report.json`.

Output directories are local paths (atomic rename is a local-filesystem
guarantee). `find_shards` is the reader-side check: it refuses a pattern
matching nothing or an incomplete / mixed shard set.
"""

import dataclasses
import io
import json
import multiprocessing
import os
import random
import re

from absl import flags
from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow as tf

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

_EXIF_ORIENTATION = 0x0112
_SHARD_RE = re.compile(
    r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.tfrecord$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


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


class ImageError(ValueError):
    """An image file that cannot be stored; `reason` says why."""

    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


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


def read_class_names(path):
    """Reads a labels file (line i = name of class id i).

    Args:
        path: a labels.txt-style file, or a directory holding `labels.txt`.

    Returns:
        The list of class names.

    Raises:
        ValueError: the file is missing, empty, has blank lines between names
            or repeats a name.
    """
    if os.path.isdir(path):
        path = os.path.join(path, LABELS_FILENAME)
    if not os.path.isfile(path):
        raise ValueError(f"labels file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f.read().rstrip("\n").split("\n")]
    if names == [""]:
        raise ValueError(f"labels file {path} is empty")
    if "" in names:
        raise ValueError(f"labels file {path}: line {names.index('') + 1} is "
                         "blank (line i must be the name of class id i)")
    return check_class_names(names, f"labels file {path}")


def check_class_names(class_names, what="class_names"):
    """Returns `class_names` as a list of str, or raises ValueError naming
    `what` if it is empty, repeats a name or has a blank/padded name."""
    names = [str(n) for n in class_names]
    if not names:
        raise ValueError(f"{what} is empty")
    for name in names:
        if not name.strip() or name != name.strip() or "\n" in name:
            raise ValueError(f"{what}: invalid class name {name!r}")
    seen = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what}: class name {name!r} appears twice")
        seen.add(name)
    return names


def _write_text_atomically(path, text):
    tmp = os.path.join(os.path.dirname(path),
                       f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def format_summary(report, output_dir):
    """One line for a converter to print after `write_split`."""
    return (f"{report['split']}: wrote {report['num_records']} images "
            f"({report['num_skipped']} skipped, {report['num_reencoded']} "
            f"re-encoded) to "
            f"{os.path.join(output_dir, report['split'])}-*-of-"
            f"{report['num_shards']:05d}.tfrecord; report "
            f"{report_path(output_dir, report['split'])}")


# ----------------------------------------------------------------------------
# One image.
# ----------------------------------------------------------------------------

def _tf_decode_problem(data, size):
    """Returns None if TF decodes `data` to RGB of `size` (w, h), else why."""
    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
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


def _reencode(image):
    """Encodes a PIL image as RGB JPEG q95, or PNG if alpha/palette."""
    lossless = (image.mode in ("P", "PA", "RGBA", "LA", "La", "RGBa")
                or "transparency" in image.info)
    image = _to_8bit(image).convert("RGB")
    buffer = io.BytesIO()
    if lossless:
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), image.size


def prepare_image(path):
    """Reads and checks one image file; returns the bytes to store.

    Args:
        path: the image file.

    Returns:
        `(encoded, reason)`: the bytes for `image/encoded`, and None if they
        are the original file's bytes, else why the image was re-encoded.

    Raises:
        ImageError: (a ValueError) the file cannot be stored; `.reason`.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None
    if not data:
        raise ImageError(path, "empty file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as e:  # PIL raises many types on bad data.
        raise ImageError(path, f"not a readable image (PIL: {e})") from None

    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        reason = f"EXIF orientation {orientation}, rotated upright"
    elif image.format not in KEPT_FORMATS:
        reason = f"{image.format} is not JPEG/PNG/GIF/BMP"
    else:
        reason = _tf_decode_problem(data, image.size)
        if reason is None:
            return data, None
    try:
        encoded, size = _reencode(image)
    except Exception as e:  # e.g. a PIL mode without an RGB conversion.
        raise ImageError(path, f"{reason}; cannot re-encode: {e}") from None
    problem = _tf_decode_problem(encoded, size)
    if problem is not None:
        raise ImageError(path, f"{reason}; re-encoded: {problem}")
    return encoded, reason


# ----------------------------------------------------------------------------
# A split.
# ----------------------------------------------------------------------------

def _write_shard(task):
    """Writes one shard; runs in a worker process or in-process.

    Args:
        task: `(path, records)`.

    Returns:
        One `(status, reason)` per record: status is "written", "reencoded"
        or "skipped".
    """
    path, records = task
    outcomes = []
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            try:
                encoded, reason = prepare_image(record.path)
            except ImageError as e:
                outcomes.append(("skipped", e.reason))
                continue
            example = make_example(encoded, record.filename, record.labels,
                                   record.difficult)
            # deterministic=True: sorted feature keys, so the bytes do not
            # depend on the process (protobuf map order otherwise may).
            writer.write(example.SerializeToString(deterministic=True))
            outcomes.append(("reencoded" if reason else "written", reason))
    return outcomes


def _run_tasks(tasks, num_workers):
    if num_workers == 1:
        return [_write_shard(task) for task in tasks]
    # 'spawn': TensorFlow is not fork-safe once initialised.
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_workers) as pool:
        return list(pool.imap(_write_shard, tasks, chunksize=1))


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
    with open(path, encoding="utf-8") as f:
        existing = f.read()
    if existing == "\n".join(class_names) + "\n":
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


def _default_num_workers(num_shards, num_records):
    # A worker process costs a few seconds (it imports TensorFlow) and an
    # image ~6 ms (PIL + TF decode of a COCO-sized JPEG): one per 1000 images.
    return max(1, min(num_shards, os.cpu_count() or 1, num_records // 1000))


def write_split(records, output_dir, split, class_names, num_shards,
                num_workers=None, overwrite=False, extra_report=None,
                shuffle_seed=0):
    """Writes one split as sharded TFRecords, labels.txt and a report.

    Args:
        records: sequence of `ImageRecord`.
        output_dir: directory for the shards (created if needed).
        split: split name, e.g. "train2014"; letters, digits, `_ . -`.
        class_names: list of class names; class id i = class_names[i].
        num_shards: number of shard files (may exceed the number of images:
            the extra shards are empty files).
        num_workers: processes writing shards; 1 = in this process. Default:
            min(num_shards, CPUs, one per 1000 images).
        overwrite: replace an existing split (old shards are deleted only
            after the new ones are complete).
        extra_report: dict merged into the report (converter-specific keys).
        shuffle_seed: seed of the record order before the round-robin
            dealing; None keeps the given order.

    Returns:
        The report dict, also written to `<output_dir>/<split>_report.json`.

    Raises:
        ValueError: bad arguments, the split exists and overwrite is False,
            labels.txt differs, or no image at all could be read.
    """
    records = list(records)
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(f"split {split!r}: use letters, digits, '_', '.', "
                         "'-' (not starting with '.' or '-')")
    class_names = check_class_names(class_names)
    if not isinstance(num_shards, int) or not 1 <= num_shards <= 99999:
        raise ValueError(f"num_shards must be an int in [1, 99999], got "
                         f"{num_shards!r}")
    if num_workers is None:
        num_workers = _default_num_workers(num_shards, len(records))
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive int, got "
                         f"{num_workers!r}")
    num_workers = min(num_workers, num_shards)
    _check_records(records, len(class_names))
    report = {}
    for key in extra_report or {}:
        if key in ("split", "num_shards", "shards", "num_input_records",
                   "num_records", "num_skipped", "skipped", "num_reencoded",
                   "reencoded", "num_zero_label", "zero_label",
                   "class_counts", "labels_file"):
            raise ValueError(f"extra_report key {key!r} is reserved")

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir} is not a directory")
    os.makedirs(output_dir, exist_ok=True)
    old_shards = _final_shards(output_dir, split)
    existing = old_shards + [p for p in [report_path(output_dir, split)]
                             if os.path.exists(p)]
    if existing and not overwrite:
        raise ValueError(f"split {split!r} already exists in {output_dir} "
                         f"({existing[0]}); pass --overwrite (overwrite=True) "
                         "to replace it")
    write_labels = _check_labels_file(output_dir, class_names, split, overwrite)
    _remove_stale_temporaries(output_dir, split)

    order = list(range(len(records)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    shard_members = [order[i::num_shards] for i in range(num_shards)]
    final = [os.path.join(output_dir, shard_filename(split, i, num_shards))
             for i in range(num_shards)]
    temporary = [os.path.join(os.path.dirname(path),
                              f".{os.path.basename(path)}.tmp-{os.getpid()}")
                 for path in final]
    tasks = [(temporary[i], [records[j] for j in shard_members[i]])
             for i in range(num_shards)]
    logging.info("Writing %d images of split %r into %d shards with %d "
                 "worker(s).", len(records), split, num_shards, num_workers)
    try:
        shard_outcomes = _run_tasks(tasks, num_workers)
        outcome = [None] * len(records)
        for members, outcomes in zip(shard_members, shard_outcomes):
            for index, result in zip(members, outcomes):
                outcome[index] = result
        if all(status == "skipped" for status, _ in outcome):
            reasons = "; ".join(f"{r.filename}: {why}" for r, (_, why)
                                in list(zip(records, outcome))[:3])
            raise ValueError(f"none of the {len(records)} images of split "
                             f"{split!r} could be read ({reasons} ...)")
        if write_labels:
            _write_text_atomically(os.path.join(output_dir, LABELS_FILENAME),
                                   "\n".join(class_names) + "\n")
        for tmp, path in zip(temporary, final):
            os.replace(tmp, path)
    finally:
        for tmp in temporary:
            if os.path.exists(tmp):
                os.remove(tmp)
    for path in old_shards:
        if path not in final:
            os.remove(path)

    report.update(_make_report(records, outcome, split, class_names,
                               shard_members, final))
    report.update(extra_report or {})
    _write_text_atomically(report_path(output_dir, split),
                           json.dumps(report, indent=2) + "\n")
    return report


def _make_report(records, outcome, split, class_names, shard_members, final):
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
    }


# ----------------------------------------------------------------------------
# Reading side.
# ----------------------------------------------------------------------------

def find_shards(file_pattern):
    """Returns the sorted files matching a pattern, checking shard sets.

    Hidden files (temporaries of a running or crashed conversion) are
    ignored. For every matched file named `<prefix>-NNNNN-of-MMMMM.tfrecord`,
    all M shards of that set must exist in its directory (the pattern itself
    may select only some of them), and no second shard set with another M
    may share the prefix. Other file names are returned as they are.

    Args:
        file_pattern: a glob pattern (`tf.io.gfile.glob` syntax).

    Returns:
        Sorted list of matching file paths.

    Raises:
        ValueError: nothing matches, or a shard set is incomplete or mixed.
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
        prefix = match.group("prefix")
        checked.add((directory, prefix))
        if directory not in listings:
            listings[directory] = tf.io.gfile.listdir(directory or ".")
        sets = {}
        for name in listings[directory]:
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
    return files


def define_writer_flags(num_shards):
    """The flags every converter shares: --output_dir, --num_shards,
    --num_workers, --overwrite (defined only when a converter runs as a script)."""
    flags.DEFINE_string("output_dir", None, "Output folder.", required=True)
    flags.DEFINE_integer("num_shards", num_shards, "Number of shard files.")
    flags.DEFINE_integer("num_workers", None, "Writer processes.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing split.")

"""The one TFRecord schema of mlcrl_tf and the file names of a converted split.

`make_example` builds a record and `FEATURE_SPEC` parses one; `shard_filename`,
`split_file_pattern`, `report_path` and `switch_journal_path` name the files of
a split. The keys, the files and the report: docs/data.md, Schema and split
files.
"""

import os
import re

import tensorflow as tf

ENCODED_KEY = "image/encoded"
FILENAME_KEY = "image/filename"
LABEL_KEY = "image/class/label"
DIFFICULT_KEY = "image/class/difficult"
LABELS_FILENAME = "labels.txt"
# The parse spec of the schema (tf.io.parse_single_example, parse_example).
FEATURE_SPEC = {
    ENCODED_KEY: tf.io.FixedLenFeature([], tf.string),
    FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    LABEL_KEY: tf.io.VarLenFeature(tf.int64),
    DIFFICULT_KEY: tf.io.VarLenFeature(tf.int64),
}
REPORT_SUFFIX = "_report.json"
SWITCH_SUFFIX = ".switch.json"
SHARD_RE = re.compile(
    r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.tfrecord$")


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


class ConversionError(ValueError):
    """A conversion that cannot finish: the output cannot be written, or a
    worker process died.

    Its message names the path or the cause. It is a `ValueError`, so the
    command lines print it as their one `error:` line.

    Args:
        message: str, the path or the cause and what to do.

    Example:

    >>> issubclass(ConversionError, ValueError)
    True
    """


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

"""The one TFRecord schema of mlcrl_tf, and the atomic sharded writer.

Schema (every dataset, every split):

    image/encoded          bytes       original image file bytes
    image/filename         bytes       path relative to the image directory
    image/class/label      int64 list  positive class ids (difficult included)
    image/class/difficult  int64 list  class ids difficult for this image

Beside the shards: `labels.txt` (line i = class name of id i) and
`<split>_report.json`.
"""

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

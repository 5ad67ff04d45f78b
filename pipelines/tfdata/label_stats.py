"""Label statistics of a training source, read without decoding an image.

    counts = count_labels("data/coco/train2014-*.tfrecord", num_classes=80)
    pmi(counts)          # (C, C) pointwise mutual information

`count_labels` parses only the label ids of TFRecord shards or of a TFDS split;
`mlcrl_tf`'s TensorBoard summaries compare the label embeddings f_l(I_C) with
the PMI. Decisions: docs/data.md, Label statistics.
"""

import dataclasses
import re

import numpy as np
import tensorflow as tf

from pipelines.records import schema
from pipelines.records import shard_sets
from pipelines.tfdata import tfds_source

BATCH_SIZE = 512  # records parsed per call; batches parse in parallel
_LABEL_SPEC = {schema.LABEL_KEY: tf.io.VarLenFeature(tf.int64)}
# TensorFlow's wrapping of an iterator error: "{{function_node ...}} <message> [Op:...]".
_TF_WRAPPING = re.compile(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:.*$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class LabelCounts:
    """Co-occurrence counts of the classes of a set of images.

    `count_labels` makes them; `classes` is the diagonal.

    Args:
        pairs: int64 (C, C), symmetric: `pairs[i, j]` images hold both
            classes i and j, `pairs[i, i]` images hold class i.
        num_records: int, the images counted (with or without labels).

    Example:

    >>> pairs = np.zeros((3, 3), np.int64)
    >>> add_label_ids(pairs, rows=[0, 0, 1], ids=[0, 2, 2], num_rows=2)
    >>> counts = LabelCounts(pairs=pairs, num_records=2)
    >>> counts.classes
    array([1, 0, 2])
    >>> float(pmi(counts)[0, 2])  # log p(0, 2) - log(p(0) p(2)) = log 0.5 - log 0.5
    0.0
    """

    pairs: np.ndarray
    num_records: int

    @property
    def classes(self):
        """int64 (C,): the images holding each class."""
        return np.diagonal(self.pairs).copy()


def add_label_ids(pairs, rows, ids, num_rows, where="labels"):
    """Adds the images of one batch to `pairs` (in place).

    Args:
        pairs: int64 (C, C) counts to add to.
        rows: int (n,): the image (0..num_rows-1) of each label id.
        ids: int (n,): class ids.
        num_rows: images in the batch.
        where: the source, for the error message.

    Raises:
        ValueError: a class id outside [0, C).
    """
    num_classes = len(pairs)
    ids = np.asarray(ids, np.int64)
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.size:
        raise ValueError(f"{where}: class id {int(bad[0])} is outside "
                         f"[0, num_classes={num_classes}); wrong label map?")
    multi_hot = np.zeros((int(num_rows), num_classes), np.float32)
    multi_hot[np.asarray(rows, np.int64), ids] = 1.0  # a repeated id counts once
    # Exact: per-batch counts stay far below float32's 2**24.
    pairs += np.rint(multi_hot.T @ multi_hot).astype(np.int64)


def _tfrecord_label_batches(source):
    """(rows, ids, num_rows) batches of the shards' label ids."""
    files = shard_sets.find_shards(source)
    # Several files at once with large read buffers: reading is the cost
    # (about 1 GB/s of 160 KB records from the page cache, docs/data.md).
    ds = tf.data.TFRecordDataset(files, buffer_size=8 << 20,
                                 num_parallel_reads=min(len(files), 8))
    ds = ds.batch(BATCH_SIZE).map(
        lambda records: tf.io.parse_example(records, _LABEL_SPEC)[schema.LABEL_KEY],
        num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda ids: (ids.indices[:, 0], ids.values, ids.dense_shape[0]))
    return ds.prefetch(2)


def _tfds_label_batches(source, data_dir):
    """(rows, ids, num_rows) batches of a TFDS split's label ids."""
    split = tfds_source.open_split(source, data_dir=data_dir)
    ds = split.records().map(lambda record: record["label_ids"])
    ds = ds.ragged_batch(BATCH_SIZE)
    return ds.map(lambda ids: (ids.value_rowids(), ids.flat_values, ids.nrows()))


def count_labels(source, num_classes, data_dir=None):
    """Counts how often each pair of classes labels the same image.

    Args:
        source: a glob of TFRecord shards or `tfds:NAME:SPLIT`.
        num_classes: C.
        data_dir: TFDS data directory (TFDS sources only).

    Returns:
        A `LabelCounts`.

    Raises:
        ValueError: no shards, an unreadable or corrupt record, or a class id
            outside [0, C) (the message names the source).
        ImportError: a TFDS source without tensorflow-datasets.
    """
    pairs = np.zeros((int(num_classes), int(num_classes)), np.int64)
    num_records = 0
    try:
        batches = (_tfds_label_batches(source, data_dir) if tfds_source.is_tfds(source)
                   else _tfrecord_label_batches(source))
        for rows, ids, num_rows in batches.as_numpy_iterator():
            add_label_ids(pairs, rows, ids, num_rows, where=source)
            num_records += int(num_rows)
    except tf.errors.OpError as e:
        message = _TF_WRAPPING.sub("", e.message.strip().splitlines()[0])
        raise ValueError(f"{source}: cannot read the labels: {message}") from None
    return LabelCounts(pairs=pairs, num_records=num_records)


def pmi(counts):
    """Pointwise mutual information log p(i, j) / (p(i) p(j)) of class pairs.

    Args:
        counts: a `LabelCounts`.

    Returns:
        float64 (C, C), symmetric; -inf where two classes never label the
        same image (and on the row of a class that never occurs). The
        diagonal is -log p(i).
    """
    n = max(counts.num_records, 1)
    joint = counts.pairs / n
    marginal = counts.classes / n
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log(joint) - np.log(np.outer(marginal, marginal))
    return np.where(joint > 0, values, -np.inf)

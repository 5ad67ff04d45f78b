"""TensorFlow Datasets as a data source: `tfds:voc/2007:trainval`.

    split = open_split("tfds:voc/2007:trainval", data_dir=None)
    ds = split.records()   # image_bytes, filename, label_ids, difficult_ids

The records are the dicts the TFRecord parser gives, so the same decoding and
preprocessing run on both; nothing is downloaded unless asked. The spelling,
labels, difficult rule and downloads: docs/data.md, TensorFlow Datasets.
"""

import re

from absl import logging
import tensorflow as tf

try:
    import tensorflow_datasets as tfds
except ImportError:  # optional dependency: open_split() says how to get it
    tfds = None

PREFIX = "tfds:"
_SPEC = re.compile(r"^tfds:(?P<name>[A-Za-z0-9_]+(?:/[A-Za-z0-9_.\-]+)?"
                   r"(?::\d+\.\d+\.\d+)?):(?P<split>\S+)$")
_INSTALL = ("TensorFlow Datasets is not installed: pip install 'mlcrl_tf[tfds]' "
            "(or pip install tensorflow-datasets)")


def is_tfds(source):
    """True when a --train_files/--eval_files value names a TFDS split."""
    return isinstance(source, str) and source.startswith(PREFIX)


def parse(source):
    """Splits `tfds:NAME:SPLIT` into (NAME, SPLIT).

    Raises:
        ValueError: not of that form.
    """
    match = _SPEC.match(source.strip())
    if not match:
        raise ValueError(
            f"{source!r} is not a TFDS source: write tfds:NAME:SPLIT, e.g. "
            "tfds:voc/2007:trainval or tfds:coco/2014:validation")
    return match.group("name"), match.group("split")


def open_split(source, data_dir=None, download=False):
    """Opens a prepared TFDS split (`tfds:NAME:SPLIT`) as an mlcrl_tf source.

    Args:
        source: `tfds:NAME:SPLIT` (docs/data.md, TensorFlow Datasets).
        data_dir: TFDS data directory; None = TFDS's default.
        download: download and prepare the dataset if it is not prepared yet
            (can be tens of GB); False = error instead.

    Returns:
        A `TfdsSplit`.

    Raises:
        ImportError: tensorflow-datasets is not installed.
        ValueError: bad spelling, unknown dataset or split, a dataset that is
            not prepared (and download=False), or one without an image and a
            class-label feature.
    """
    if tfds is None:
        raise ImportError(_INSTALL)
    name, split = parse(source)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"{source}: TFDS has no dataset {name!r} "
                         f"({str(e).splitlines()[0]})") from None
    if not builder.is_prepared():
        if not download:
            command = prepare_command(name, data_dir)
            raise ValueError(
                f"{source}: TFDS dataset {name!r} is not prepared in "
                f"{builder.data_dir_root}: prepare it once with {command} "
                "(downloads it), or pass download=True (--tfds_download)")
        builder.download_and_prepare()
    return TfdsSplit(source, builder, _resolve_split(source, builder.info, split))


def prepare_command(name, data_dir=None):
    """The shell command that downloads and prepares a TFDS dataset.

    TFDS's own `tfds build` CLI needs apache-beam in tensorflow-datasets
    4.9.x, so this is the plain Python call, which does not.
    """
    where = f", data_dir={data_dir!r}" if data_dir else ""
    return (f"python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder({name!r}{where}).download_and_prepare()\"")


def _resolve_split(source, info, split):
    """Maps `trainval` to `train+validation`; checks the split is known."""
    known = set(info.splits.keys())
    if not known:  # metadata without split sizes (tfds.testing.mock_data)
        return split
    if split == "trainval" and "trainval" not in known and {
            "train", "validation"} <= known:
        split = "train+validation"
    try:
        info.splits[split]  # pylint: disable=pointless-statement
    except (KeyError, ValueError) as e:
        raise ValueError(f"{source}: unknown split {split!r} ({e}); the dataset "
                         f"has {', '.join(sorted(known))}") from None
    return split


class TfdsSplit:
    """One split of a prepared TFDS dataset, read as mlcrl_tf records.

    Build it with `open_split`, which checks the spelling and that the
    dataset is prepared. Its attributes: `source`, `name` (TFDS's full name),
    `split`, `class_names`, `layout` ("labels", "objects" or "label": where
    the labels come from) and `drops_unlabelled` (True for "objects").

    Args:
        source: the `tfds:NAME:SPLIT` string (for messages).
        builder: the dataset's `tfds.core.DatasetBuilder`, prepared.
        split: the TFDS split (after the `trainval` alias).

    Raises:
        ValueError: the dataset has no `image` feature or no class-label
            feature.

    Example (VOC 2007 prepared in TFDS's data directory):

        split = open_split("tfds:voc/2007:trainval")
        split.class_names[:3]  # ['aeroplane', 'bicycle', 'bird']
        split.count()          # {'num_records': 5011, 'num_dropped': 0}
        ds = split.records(shuffle_files=True, seed=0)
    """

    def __init__(self, source, builder, split):
        self.source = source
        self.name = builder.info.full_name
        self.split = split
        self._builder = builder
        features = builder.info.features
        if "image" not in features or not isinstance(features["image"],
                                                     tfds.features.Image):
            raise ValueError(f"{source}: the dataset has no `image` feature")
        self.layout, label_feature = _label_feature(source, features)
        self.class_names = list(label_feature.names)
        self.drops_unlabelled = self.layout == "objects"
        self._has_filename = "image/filename" in features
        self._has_difficult = "labels_no_difficult" in features

    def _label_decoders(self):
        """Features holding the labels (decoded); nothing else."""
        if self.layout == "objects":
            wanted = {"objects": {"label": True}}
        else:
            wanted = {self.layout: True}
        if self._has_difficult:
            wanted["labels_no_difficult"] = True
        return wanted

    def _label_ids(self, example):
        labels = example["objects"]["label"] if self.layout == "objects" else (
            example[self.layout])
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int64)
        return tf.sort(tf.unique(labels).y)

    def _to_record(self, example):
        """A TFDS example -> the dict of `input_pipeline`'s tf.Example parse."""
        label_ids = self._label_ids(example)
        hard = tf.zeros_like(label_ids, tf.bool)  # (n,): none difficult
        if self._has_difficult:
            easy = tf.cast(example["labels_no_difficult"], tf.int64)
            # Difficult: positive, but no non-difficult object of that class.
            hard = tf.reduce_all(
                tf.not_equal(label_ids[:, None], easy[None, :]), axis=1)
        difficult_ids = tf.boolean_mask(label_ids, hard)
        filename = (example["image/filename"] if self._has_filename
                    else example["tfds_id"])
        return {"image_bytes": example["image"], "filename": filename,
                "label_ids": label_ids, "difficult_ids": difficult_ids}

    def _num_files(self):
        try:
            return len(self._builder.info.splits[self.split].file_instructions)
        except (KeyError, ValueError):
            return 0

    def records(self, shuffle_files=False, seed=None, input_context=None):
        """The split as a tf.data.Dataset of mlcrl_tf records.

        Args:
            shuffle_files: read the split's files in a random order (for
                training; records are shuffled by the caller).
            seed: seed of the file order.
            input_context: optional `tf.distribute.InputContext`: each input
                pipeline reads every n-th file, or every n-th record when the
                split has fewer files than pipelines.

        Returns:
            A dataset of dicts `image_bytes` string (), `filename` string (),
            `label_ids` int64 (n,), `difficult_ids` int64 (n,), without the
            unlabelled images when `drops_unlabelled`.
        """
        wanted = dict(self._label_decoders(), image=True)
        if self._has_filename:
            wanted["image/filename"] = True
        decoders = tfds.decode.PartialDecoding(
            wanted, decoders={"image": tfds.decode.SkipDecoding()})
        shard_files = (input_context is not None and
                       self._num_files() >= input_context.num_input_pipelines)
        # No TFDS autocache: caching is the input pipeline's decision.
        read_config = tfds.ReadConfig(
            shuffle_seed=seed, add_tfds_id=not self._has_filename,
            input_context=input_context if shard_files else None,
            try_autocache=False)
        ds = self._builder.as_dataset(split=self.split, decoders=decoders,
                                      read_config=read_config,
                                      shuffle_files=shuffle_files)
        if input_context is not None and not shard_files:
            ds = ds.shard(input_context.num_input_pipelines,
                          input_context.input_pipeline_id)
        ds = ds.map(self._to_record, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
        if self.drops_unlabelled:
            ds = ds.filter(lambda r: tf.size(r["label_ids"]) > 0)
        return ds

    def count(self):
        """Counts the split's records: TFDS's own split size, or, with
        `drops_unlabelled` (COCO), one pass over the labels (not the pixels)
        that also counts and logs the dropped images.

        Returns:
            {"num_records": records delivered, "num_dropped": images dropped}.
        """
        if not self.drops_unlabelled:
            try:
                return {"num_records": self._builder.info.splits[
                    self.split].num_examples, "num_dropped": 0}
            except (KeyError, ValueError):
                pass  # split sizes unknown: count below
        decoders = tfds.decode.PartialDecoding(self._label_decoders())
        ds = self._builder.as_dataset(split=self.split, decoders=decoders)
        labelled = ds.map(lambda ex: tf.size(self._label_ids(ex)) > 0,
                          num_parallel_calls=tf.data.AUTOTUNE)
        kept, total = labelled.reduce(
            (tf.constant(0, tf.int64), tf.constant(0, tf.int64)),
            lambda acc, x: (acc[0] + tf.cast(x, tf.int64), acc[1] + 1))
        kept, total = int(kept), int(total)
        if total > kept:
            logging.info("%s: %d of %d images have no labels and are dropped.",
                         self.source, total - kept, total)
        return {"num_records": kept, "num_dropped": total - kept}


def _label_feature(source, features):
    """(layout, ClassLabel feature) of a dataset's labels; ValueError if none."""
    class_label = tfds.features.ClassLabel
    labels = features["labels"] if "labels" in features else None
    if (isinstance(labels, tfds.features.Sequence)
            and isinstance(labels.feature, class_label)):
        return "labels", labels.feature
    objects = features["objects"] if "objects" in features else None
    if (isinstance(objects, tfds.features.Sequence) and "label" in objects.feature
            and isinstance(objects.feature["label"], class_label)):
        return "objects", objects.feature["label"]
    if isinstance(features["label"] if "label" in features else None, class_label):
        return "label", features["label"]
    raise ValueError(
        f"{source}: no class-label feature: expected `labels` (a sequence of "
        "class labels), `objects/label` or `label`")

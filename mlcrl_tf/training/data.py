"""The data a training run reads: sources, label maps and sizes, checked
before any training work (docs/design.md, Data).
"""

import os

import tensorflow as tf

from pipelines.records import label_maps
from pipelines.records import schema
from pipelines.records import shard_sets
from pipelines.tfdata import tfds_source


def resolve_data(config):
    """Checks the data flags; fills num_classes; finds class names and sizes.

    Returns:
        (config with num_classes set, class_names, number of training records)

    Raises:
        ValueError: missing/empty/incomplete shards, held-out files shared
            with training, a labels file that disagrees with --num_classes,
            or neither of them.
    """
    if tfds_source.is_tfds(config.train_files or ""):
        split = _open_tfds(config.train_files, "train_files", config)
        class_names, labels_file = split.class_names, f"{config.train_files} (TFDS)"
        num_records = split.count()["num_records"]
    else:
        train_files = find_files(config.train_files, "train_files")
        class_names, labels_file = _label_map(train_files)
        num_records = None
    if config.labels_file:
        # It names the classes; the training data must agree with it.
        file_names = _read_labels_file(config.labels_file)
        label_maps.check_same_classes(class_names, file_names,
                                      f"--train_files={config.train_files!r}",
                           config.labels_file)
        class_names, labels_file = file_names, config.labels_file
    for flag in ("eval_files", "selection_files"):
        _check_source(config, flag, class_names, labels_file)
    if (config.selection_files and not tfds_source.is_tfds(config.train_files)
            and not tfds_source.is_tfds(config.selection_files)):
        _check_held_out(config.selection_files, train_files)
    num_classes = _num_classes(config.num_classes, class_names, labels_file)
    if class_names is None:
        class_names = [f"class_{i}" for i in range(num_classes)]
    # The rule of labels.txt, the run files and the export (a TFDS split's names too).
    class_names = label_maps.check_class_names(class_names, f"the classes of {labels_file}")
    if num_records is None:
        num_records = shard_sets.count_records(train_files)
    return config.replace(num_classes=num_classes), class_names, num_records


def find_files(pattern, flag):
    """The shard files of a glob; ValueError naming the flag."""
    if not pattern:
        raise ValueError(f"--{flag} is empty: give a glob of TFRecord shards.")
    try:
        return shard_sets.find_shards(pattern)
    except ValueError as e:
        raise ValueError(f"--{flag}={pattern!r}: {e}") from None


def _open_tfds(source, flag, config):
    try:
        return tfds_source.open_split(source, data_dir=config.data_dir,
                                      download=config.tfds_download)
    except (ValueError, ImportError) as e:
        raise ValueError(f"--{flag}={source!r}: {e}") from None


def _check_source(config, flag, class_names, labels_file):
    source = getattr(config, flag)
    if not source:
        return
    if tfds_source.is_tfds(source):
        names = _open_tfds(source, flag, config).class_names
    else:
        names = _shard_class_names(find_files(source, flag), flag)
    label_maps.check_same_classes(names, class_names, f"--{flag}={source!r}", labels_file)


def _shard_class_names(files, flag):
    try:
        return label_maps.class_names_for_shards(files)
    except ValueError as e:
        raise ValueError(f"--{flag}: {e}") from None


def _check_held_out(selection_files, train_files):
    held_out = find_files(selection_files, "selection_files")
    shared = sorted(set(map(os.path.realpath, held_out))
                    & set(map(os.path.realpath, train_files)))
    if shared:
        raise ValueError(
            f"--selection_files={selection_files!r} shares {len(shared)} file(s) with "
            f"--train_files (e.g. {shared[0]}): selection data must be held out of "
            "training.")


def _label_map(train_files):
    """(class names or None, the labels file looked at) beside the shards.

    Every directory the training glob spans must have the same labels.txt.
    """
    labels_file = os.path.join(os.path.dirname(train_files[0]),
                               schema.LABELS_FILENAME)
    return _shard_class_names(train_files, "train_files"), labels_file


def _read_labels_file(path):
    if not tf.io.gfile.exists(path):
        raise ValueError(f"--labels_file={path!r} does not exist.")
    return label_maps.read_class_names(path)


def _num_classes(num_classes, class_names, labels_file):
    if num_classes == 0:
        if class_names is None:
            raise ValueError(f"--num_classes is 0 and there is no labels file at "
                             f"{labels_file!r}: give --num_classes or --labels_file.")
        return len(class_names)
    if class_names is not None and num_classes != len(class_names):
        raise ValueError(f"--num_classes={num_classes} disagrees with the data's "
                         f"label map {labels_file!r} ({len(class_names)} classes).")
    return num_classes

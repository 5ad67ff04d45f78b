"""mlcrl_tf.data and the label-map checks (issue 13 item 4): a label map that
disagrees anywhere is one clear error before any work, for training, for
evaluation on a checkpoint and on an export; shard subsets count only
themselves; an out-of-range class id stops training with one line."""

import glob
import os
import shutil

import pytest
import tensorflow as tf

from mlcrl_tf.evaluation import evaluate_lib
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import restore
from mlcrl_tf.serving import export_lib
from mlcrl_tf.training import data
from mlcrl_tf.training import train_lib
from pipelines.records import label_maps
from pipelines.records import schema
from pipelines.records import shard_sets

from conftest import run_module


def _config(demo_data, tmp_path, **overrides):
    values = dict(model_dir=str(tmp_path / "run"), train_files=demo_data["train_files"],
                  eval_files=demo_data["test_files"], backbone="small_cnn",
                  backbone_weights=None, lr_decay_epochs=(), image_size=48, batch_size=8,
                  epochs=1, steps_per_epoch=2, num_summary_images=0)
    values.update(overrides)
    return config_lib.Config(**values)


def _copy_split(demo_data, tmp_path, name, split="test", drop=None, rename=None):
    """A copy of a demo split whose labels.txt lacks or renames a class."""
    directory = tmp_path / name
    directory.mkdir()
    source = os.path.dirname(demo_data["test_files"])
    for path in glob.glob(os.path.join(source, f"{split}*")):
        shutil.copy(path, directory)
    names = label_maps.read_class_names(demo_data["labels_file"])
    if drop is not None:
        names = names[:drop] + names[drop + 1:]
    if rename is not None:
        names[rename] = names[rename] + " (other)"
    (directory / "labels.txt").write_text("".join(f"{n}\n" for n in names))
    return str(directory / f"{split}-*.tfrecord")


def test_an_eval_set_missing_a_class_is_refused_before_training(demo_data, tmp_path):
    """Failed before: scored with shifted ids (mAP 95.8, rc 0)."""
    bad = _copy_split(demo_data, tmp_path, "eval", drop=3)
    with pytest.raises(ValueError, match=r"--eval_files=.*label map differs.*class id 3"):
        data.resolve_data(_config(demo_data, tmp_path, eval_files=bad))
    assert not (tmp_path / "run").exists()


def test_a_train_glob_spanning_two_label_maps_is_refused(demo_data, tmp_path):
    other = _copy_split(demo_data, tmp_path, "other", split="train", rename=0)
    pattern = os.path.join(str(tmp_path), "*", "train-*.tfrecord")
    shutil.copytree(os.path.dirname(demo_data["train_files"]), tmp_path / "mine")
    assert other and len(glob.glob(pattern)) == 16
    with pytest.raises(ValueError, match="--train_files"):
        data.resolve_data(_config(demo_data, tmp_path, train_files=pattern))


def test_selection_files_are_checked_too(demo_data, tmp_path):
    bad = _copy_split(demo_data, tmp_path, "sel", rename=9)
    with pytest.raises(ValueError, match=r"--selection_files=.*class id 9"):
        data.resolve_data(_config(demo_data, tmp_path, selection_files=bad))


@pytest.fixture(scope="module")
def small_run(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    config = _config(demo_data, root, eval_files=None)
    train_lib.train_and_evaluate(config)
    model_dir = config.model_dir
    model, _, names, _ = restore.restore_model(model_dir)
    export = export_lib.export_model(model, str(root / "export"), names)
    return model_dir, export


def test_evaluating_a_checkpoint_or_an_export_on_another_label_map(small_run, demo_data,
                                                                   tmp_path):
    model_dir, export = small_run
    bad = _copy_split(demo_data, tmp_path, "bad", drop=0)
    with pytest.raises(ValueError, match="label map differs"):
        evaluate_lib.evaluate_target(model_dir=model_dir, eval_files=bad)
    with pytest.raises(ValueError, match="label map differs"):
        evaluate_lib.evaluate_target(saved_model=export, eval_files=bad)
    proc = run_module("mlcrl_tf.evaluate", [f"--saved_model={export}",
                                            f"--eval_files={bad}"], check=False)
    assert proc.returncode != 0 and "label map differs" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_subset_of_shards_counts_only_itself(demo_data, tmp_path):
    """Failed before: 2 of 8 shards counted as the whole split (64 records)."""
    records = os.path.dirname(demo_data["train_files"])
    subset = os.path.join(records, "train-0000[0-1]-of-00008.tfrecord")
    _, _, count = data.resolve_data(_config(demo_data, tmp_path, train_files=subset))
    assert count == 16 == sum(1 for _ in tf.data.TFRecordDataset(
        shard_sets.find_shards(subset)))


def test_an_out_of_range_class_id_stops_training_with_one_line(demo_data, tmp_path):
    directory = tmp_path / "ids"
    directory.mkdir()
    shutil.copy(demo_data["labels_file"], directory)
    examples = list(tf.data.TFRecordDataset(
        shard_sets.find_shards(demo_data["test_files"])).as_numpy_iterator())
    path = directory / "train-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for i, record in enumerate(examples):
            example = tf.train.Example.FromString(record)
            if i == 5:
                example.features.feature[schema.LABEL_KEY].int64_list.value.append(12)
            writer.write(example.SerializeToString())
    proc = run_module("mlcrl_tf.train", [
        f"--model_dir={tmp_path / 'run'}", f"--train_files={path}", "--backbone=small_cnn",
        "--backbone_weights=", "--lr_decay_epochs=", "--image_size=48", "--batch_size=8",
        "--epochs=1", "--deterministic"], check=False)
    assert proc.returncode != 0
    assert "error: training data:" in proc.stderr and "num_classes=10" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_labels_file_that_disagrees_with_the_shards_is_refused(demo_data, tmp_path):
    names = label_maps.read_class_names(demo_data["labels_file"])
    swapped = tmp_path / "labels.txt"
    swapped.write_text("".join(f"{n}\n" for n in [names[1], names[0], *names[2:]]))
    with pytest.raises(ValueError, match=r"--train_files=.*label map differs.*class id 0"):
        data.resolve_data(_config(demo_data, tmp_path, labels_file=str(swapped)))
    same = tmp_path / "same.txt"
    same.write_text("".join(f"{n}\n" for n in names))
    _, class_names, _ = data.resolve_data(_config(demo_data, tmp_path, labels_file=str(same)))
    assert class_names == names


def test_tfds_selection_files_with_shard_training_files(demo_data, tmp_path, monkeypatch):
    """Failed before: the held-out check globbed 'tfds:...' as a file pattern."""
    names = label_maps.read_class_names(demo_data["labels_file"])

    class Split:  # what data needs of a tfds_source.TfdsSplit
        class_names = names

    opened = []
    monkeypatch.setattr(data.tfds_source, "open_split",
                        lambda source, **kwargs: opened.append(source) or Split())
    config = _config(demo_data, tmp_path, selection_files="tfds:outfits:validation")
    resolved, class_names, _ = data.resolve_data(config)
    assert opened == ["tfds:outfits:validation"]
    assert class_names == names and resolved.num_classes == len(names)

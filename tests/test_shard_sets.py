"""The reading side of converted shards (pipelines.records.shard_sets) and
label maps (pipelines.records.label_maps)."""

import os

import pytest
import tensorflow as tf

from pipelines.records import label_maps
from pipelines.records import schema
from pipelines.records import shard_sets
from pipelines.records import shard_writer

from helpers import CLASSES

# ----------------------------------------------------------------------------
# find_shards.
# ----------------------------------------------------------------------------

def _touch(directory, *names):
    for name in names:
        (directory / name).write_bytes(b"")


def test_find_shards_complete_and_partial_patterns(tmp_path):
    _touch(tmp_path, *[f"train-0000{i}-of-00003.tfrecord" for i in range(3)],
           ".train-00000-of-00003.tfrecord.tmp-1",
           "val-00000-of-00001.tfrecord")
    files = shard_sets.find_shards(str(tmp_path / "train-*"))
    assert [os.path.basename(f) for f in files] == [
        f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    # A pattern may pick part of a complete set on purpose.
    assert len(shard_sets.find_shards(str(tmp_path / "train-00001-*"))) == 1
    assert len(shard_sets.find_shards(str(tmp_path / "*.tfrecord"))) == 4


def test_find_shards_detects_incomplete_and_mixed_sets(tmp_path):
    _touch(tmp_path, "train-00000-of-00003.tfrecord",
           "train-00002-of-00003.tfrecord")
    with pytest.raises(ValueError, match=r"missing shard\(s\) \[1\]"):
        shard_sets.find_shards(str(tmp_path / "train-*.tfrecord"))
    with pytest.raises(ValueError, match="incomplete"):
        shard_sets.find_shards(str(tmp_path / "train-00000-of-00003.tfrecord"))
    _touch(tmp_path, "train-00001-of-00003.tfrecord",
           "train-00000-of-00001.tfrecord")
    with pytest.raises(ValueError, match="different sizes"):
        shard_sets.find_shards(str(tmp_path / "train-*.tfrecord"))
    with pytest.raises(ValueError, match="matches no file"):
        shard_sets.find_shards(str(tmp_path / "test-*.tfrecord"))


def test_read_class_names_rejects_blank_lines(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match="line 2"):
        label_maps.read_class_names(str(tmp_path))


# ----------------------------------------------------------------------------
# Class names: only "\n" separates lines of labels.txt.
# ----------------------------------------------------------------------------

LINE_BREAKS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85",
               "\u2028", "\u2029"]


@pytest.mark.parametrize("char", LINE_BREAKS)
def test_class_names_with_line_breaks_are_rejected(tmp_path, char):
    records = [shard_writer.ImageRecord("x.jpg", "x.jpg", (0,))]
    with pytest.raises(ValueError, match="line break"):
        shard_writer.write_split(records, str(tmp_path / "out"), "train",
                        ["cat", f"do{char}g", "person"], num_shards=1,
                        num_workers=1)
    assert not os.path.exists(tmp_path / "out")
    assert label_maps.class_name_problem(f"do{char}g") is not None
    assert label_maps.class_name_problem("hot dog\twith tab") is None


def test_read_class_names_splits_on_newline_only(tmp_path):
    (tmp_path / "labels.txt").write_bytes(b"cat\rdog\nperson\n")
    with pytest.raises(ValueError, match=r"'cat\\rdog'.*line break"):
        label_maps.read_class_names(str(tmp_path))
    (tmp_path / "labels.txt").write_bytes(b"cat\r\ndog\r\n")  # Windows file.
    assert label_maps.read_class_names(str(tmp_path)) == ["cat", "dog"]
    (tmp_path / "labels.txt").write_bytes("cat\u2028dog\n".encode())
    with pytest.raises(ValueError, match="line break"):
        label_maps.read_class_names(str(tmp_path))


# ----------------------------------------------------------------------------
# Counting and label maps of selected shards.
# ----------------------------------------------------------------------------

def _count_by_reading(files):
    return sum(1 for path in files for _ in tf.data.TFRecordDataset(path))


def test_count_records_counts_only_the_matched_shards(tmp_path,
                                                      mixed_records):
    out = str(tmp_path / "out")
    report = shard_writer.write_split(mixed_records, out, "train", CLASSES,
                             num_shards=3, num_workers=1)
    files = shard_sets.find_shards(os.path.join(out, "train-0000[0-1]-*.tfrecord"))
    assert len(files) == 2
    per_file = {path: _count_by_reading([path]) for path in files}
    assert shard_sets.expected_records(files) == per_file
    assert shard_sets.count_records(files) == sum(per_file.values())
    assert shard_sets.count_records(files) < report["num_records"]
    all_files = shard_sets.find_shards(schema.split_file_pattern(out, "train"))
    assert shard_sets.count_records(all_files) == report["num_records"] == 4

    os.remove(schema.report_path(out, "train"))  # No report: read the files.
    assert shard_sets.expected_records(files) == {path: None for path in files}
    assert shard_sets.count_records(files) == sum(per_file.values())


def test_count_records_names_a_corrupt_unreported_file(tmp_path,
                                                       mixed_records):
    out = str(tmp_path / "out")
    shard_writer.write_split(mixed_records, out, "train", CLASSES, num_shards=1,
                    num_workers=1)
    os.remove(schema.report_path(out, "train"))
    path = os.path.join(out, "train-00000-of-00001.tfrecord")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(ValueError, match="cannot count") as info:
        shard_sets.count_records([path])
    assert path in str(info.value)


def test_class_names_for_shards(tmp_path, mixed_records):
    dirs = {}
    for name, classes in (("a", CLASSES), ("b", CLASSES),
                          ("c", ["cat", "person", "dog"])):
        dirs[name] = str(tmp_path / name)
        shard_writer.write_split(mixed_records[:2], dirs[name], "train", classes,
                        num_shards=1, num_workers=1)
    shard = "train-00000-of-00001.tfrecord"
    files = {name: os.path.join(d, shard) for name, d in dirs.items()}
    assert label_maps.class_names_for_shards([files["a"], files["b"]]) == CLASSES
    with pytest.raises(ValueError, match="differ") as info:
        label_maps.class_names_for_shards([files["a"], files["c"]])
    assert os.path.join(dirs["a"], "labels.txt") in str(info.value)
    assert os.path.join(dirs["c"], "labels.txt") in str(info.value)
    assert "class id 1" in str(info.value)
    os.remove(os.path.join(dirs["b"], "labels.txt"))
    assert label_maps.class_names_for_shards([files["b"]]) is None
    with pytest.raises(ValueError, match="have no labels.txt"):
        label_maps.class_names_for_shards([files["a"], files["b"]])

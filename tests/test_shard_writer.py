"""The sharded writer (pipelines.records.shard_writer) and its generation switch
(pipelines.records.generations), on real photos."""

import errno
import io
import json
import os

import pytest
import tensorflow as tf

from pipelines.records import generations
from pipelines.records import label_maps
from pipelines.records import schema
from pipelines.records import shard_sets
from pipelines.records import shard_writer
from pipelines.utils import progress

from helpers import CLASSES
from helpers import H
from helpers import W
from helpers import read_split
from helpers import shard_files

# ----------------------------------------------------------------------------
# write_split.
# ----------------------------------------------------------------------------


def test_write_split_round_trip(tmp_path, mixed_records):
    out = str(tmp_path / "out")
    report = shard_writer.write_split(mixed_records, out, "train", CLASSES,
                             num_shards=3, num_workers=1,
                             extra_report={"source": "test"})

    assert shard_files(out, "train") == [
        f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    with open(os.path.join(out, "labels.txt")) as f:
        assert f.read() == "cat\ndog\nperson\n"
    with open(os.path.join(out, "train_report.json")) as f:
        assert json.load(f) == report

    records = read_split(out, "train")
    assert records.keys() == {"a.jpg", "gray.jpg", "png.jpg", "rotated.jpg"}
    assert records["a.jpg"]["labels"] == [0, 2]
    assert records["gray.jpg"]["difficult"] == [1]
    assert records["png.jpg"]["labels"] == []
    assert records["rotated.jpg"]["labels"] == [0, 1, 2]
    assert records["rotated.jpg"]["difficult"] == [2]
    assert records["rotated.jpg"]["image"].shape == (W, H, 3)
    for name in ("a.jpg", "gray.jpg", "png.jpg"):
        assert records[name]["image"].shape == (H, W, 3)
    with open(mixed_records[0].path, "rb") as f:
        assert records["a.jpg"]["encoded"] == f.read()

    assert report["split"] == "train"
    assert report["num_shards"] == 3
    assert report["num_input_records"] == 6
    assert report["num_records"] == 4
    assert sum(s["num_records"] for s in report["shards"]) == 4
    assert report["num_skipped"] == 2
    skipped = {s["filename"]: s["reason"] for s in report["skipped"]}
    assert skipped.keys() == {"corrupt.jpg", "missing.jpg"}
    assert "not a readable image" in skipped["corrupt.jpg"]
    assert skipped["missing.jpg"] == "file not found"
    assert report["num_reencoded"] == 1
    assert report["reencoded"][0]["filename"] == "rotated.jpg"
    assert "orientation 8" in report["reencoded"][0]["reason"]
    assert report["num_zero_label"] == 1
    assert report["zero_label"] == ["png.jpg"]
    assert report["class_counts"] == [
        {"id": 0, "name": "cat", "positives": 2, "difficult": 0},
        {"id": 1, "name": "dog", "positives": 2, "difficult": 1},
        {"id": 2, "name": "person", "positives": 2, "difficult": 1}]
    assert report["labels_file"] == "labels.txt"
    assert report["source"] == "test"


def test_existing_split_needs_overwrite(tmp_path, mixed_records):
    out = str(tmp_path / "out")
    shard_writer.write_split(mixed_records, out, "train", CLASSES, num_shards=3,
                    num_workers=1)
    with pytest.raises(ValueError, match="--overwrite") as info:
        shard_writer.write_split(mixed_records, out, "train", CLASSES, num_shards=3,
                        num_workers=1)
    assert os.path.join(out, "train-00000-of-00003.tfrecord") in str(info.value)

    # Overwrite with another shard count: the old set disappears.
    report = shard_writer.write_split(mixed_records[:2], out, "train", CLASSES,
                             num_shards=2, num_workers=1, overwrite=True)
    assert shard_files(out, "train") == [
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    assert report["num_records"] == 2
    assert read_split(out, "train").keys() == {"a.jpg", "gray.jpg"}

    # A report alone also counts as an existing split.
    for name in shard_files(out, "train"):
        os.remove(os.path.join(out, name))
    with pytest.raises(ValueError, match="train_report.json"):
        shard_writer.write_split(mixed_records, out, "train", CLASSES, num_shards=2,
                        num_workers=1)


def test_labels_file_shared_by_splits(tmp_path, mixed_records):
    out = str(tmp_path / "out")
    shard_writer.write_split(mixed_records[:2], out, "train", CLASSES, num_shards=1,
                    num_workers=1)
    shard_writer.write_split(mixed_records[2:4], out, "val", CLASSES, num_shards=1,
                    num_workers=1)
    assert label_maps.read_class_names(out) == CLASSES
    with pytest.raises(ValueError, match="labels.txt") as info:
        shard_writer.write_split(mixed_records[:2], out, "test",
                        ["cat", "dog", "bird"], num_shards=1, num_workers=1,
                        overwrite=True)
    assert "train" in str(info.value) and "val" in str(info.value)
    assert shard_files(out, "test") == []


def _fail_on_third_shard(monkeypatch):
    real = shard_writer._write_shard
    calls = []

    def flaky(path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(path, *args)

    monkeypatch.setattr(shard_writer, "_write_shard", flaky)
    return calls


def test_interrupted_run_leaves_no_shards(tmp_path, mixed_records,
                                          monkeypatch):
    out = str(tmp_path / "out")
    calls = _fail_on_third_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        shard_writer.write_split(mixed_records, out, "train", CLASSES, num_shards=4,
                        num_workers=1)
    assert len(calls) == 3  # Two shards were complete when it failed.
    assert shard_files(out, "train") == []
    assert os.listdir(out) == []  # No temporaries, labels or report either.
    with pytest.raises(ValueError, match="matches no file"):
        shard_sets.find_shards(schema.split_file_pattern(out, "train"))

    monkeypatch.undo()  # Nothing final exists: no overwrite needed.
    report = shard_writer.write_split(mixed_records, out, "train", CLASSES,
                             num_shards=4, num_workers=1)
    assert report["num_records"] == 4
    assert len(shard_sets.find_shards(os.path.join(out, "train-*.tfrecord"))) == 4


def test_interrupted_overwrite_keeps_old_split(tmp_path, mixed_records,
                                               monkeypatch):
    out = str(tmp_path / "out")
    shard_writer.write_split(mixed_records[:2], out, "train", CLASSES, num_shards=2,
                    num_workers=1)
    before = {n: (tmp_path / "out" / n).read_bytes()
              for n in shard_files(out, "train")}
    _fail_on_third_shard(monkeypatch)
    with pytest.raises(RuntimeError):
        shard_writer.write_split(mixed_records, out, "train", CLASSES, num_shards=4,
                        num_workers=1, overwrite=True)
    after = {n: (tmp_path / "out" / n).read_bytes()
             for n in shard_files(out, "train")}
    assert after == before
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    monkeypatch.undo()
    shard_writer.write_split(mixed_records, out, "train", CLASSES, num_shards=4,
                    num_workers=1, overwrite=True)
    assert len(shard_sets.find_shards(schema.split_file_pattern(out, "train"))) == 4


def test_stale_temporaries_are_removed(tmp_path, mixed_records):
    out = tmp_path / "out"
    out.mkdir()
    stale = [".train-00001-of-00004.tfrecord.tmp-99999",
             ".train_report.json.tmp-123", ".labels.txt.tmp-5"]
    for name in stale + [".val-00000-of-00001.tfrecord.tmp-7"]:
        (out / name).write_bytes(b"partial")
    shard_writer.write_split(mixed_records[:1], str(out), "train", CLASSES,
                    num_shards=1, num_workers=1)
    hidden = sorted(n for n in os.listdir(out) if n.startswith("."))
    # Another split's temporaries are not this run's business.
    assert hidden == [".val-00000-of-00001.tfrecord.tmp-7"]


def test_num_workers_gives_identical_shards(tmp_path, mixed_records):
    outputs = {}
    for workers in (1, 2):
        out = str(tmp_path / f"out{workers}")
        report = shard_writer.write_split(mixed_records, out, "train", CLASSES,
                                 num_shards=2, num_workers=workers)
        outputs[workers] = (report, {
            n: open(os.path.join(out, n), "rb").read()
            for n in shard_files(out, "train")})
    assert outputs[1] == outputs[2]
    assert len(outputs[1][1]) == 2 and all(outputs[1][1].values())


def test_all_images_unreadable(tmp_path):
    records = [shard_writer.ImageRecord(str(tmp_path / "nope.jpg"), "nope.jpg", (0,))]
    with pytest.raises(ValueError, match="none of the 1 images"):
        shard_writer.write_split(records, str(tmp_path / "out"), "train", CLASSES,
                        num_shards=1, num_workers=1)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("kwargs,match", [
    ({"records": []}, "records is empty"),
    ({"records": [shard_writer.ImageRecord("x.jpg", "x.jpg", (3,))]}, "outside"),
    ({"records": [shard_writer.ImageRecord("x.jpg", "x.jpg", (0,), (1,))]},
     "difficult"),
    ({"records": [shard_writer.ImageRecord("x.jpg", "x.jpg"),
                  shard_writer.ImageRecord("y/x.jpg", "x.jpg")]}, "twice"),
    ({"split": "../train"}, "split"),
    ({"class_names": ["cat", "cat"]}, "twice"),
    ({"num_shards": 0}, "num_shards"),
    ({"extra_report": {"num_records": 1}}, "reserved"),
])
def test_write_split_rejects_bad_arguments(tmp_path, kwargs, match):
    arguments = {"records": [shard_writer.ImageRecord("x.jpg", "x.jpg", (0,))],
                 "output_dir": str(tmp_path / "out"), "split": "train",
                 "class_names": CLASSES, "num_shards": 1, "num_workers": 1}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        shard_writer.write_split(**arguments)


# ----------------------------------------------------------------------------
# Generation switch: one atomic step.
# ----------------------------------------------------------------------------

def _split_state(out):
    """(class names, {filename: labels}) as a reader sees them, or None if
    the reader refuses the split."""
    try:
        files = shard_sets.find_shards(schema.split_file_pattern(out, "train"))
        names = label_maps.read_class_names(out)
        expected = shard_sets.expected_records(files)
    except ValueError as e:
        assert "half-way through a switch" in str(e)
        return None
    records = read_split(out, "train")
    assert sum(expected.values()) == len(records)
    return names, {n: r["labels"] for n, r in records.items()}


# os.replace calls of the switch: the journal, 2 shards, the report, labels.
@pytest.mark.parametrize("crash_after", range(5))
def test_overwrite_switch_is_atomic(tmp_path, mixed_records, monkeypatch,
                                    crash_after):
    out = str(tmp_path / "out")
    old_classes, new_classes = CLASSES, ["bird", "cat", "dog"]
    shard_writer.write_split(mixed_records[:2], out, "train", old_classes,
                    num_shards=2, num_workers=1)
    old = _split_state(out)
    new_records = [mixed_records[3], mixed_records[2]]
    real_replace = os.replace
    calls = []

    def crashing_replace(src, dst):
        if len(calls) == crash_after:
            raise OSError(5, "simulated crash")
        calls.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(ValueError):
        shard_writer.write_split(new_records, out, "train", new_classes, num_shards=2,
                        num_workers=1, overwrite=True)
    monkeypatch.undo()
    state = _split_state(out)
    # Crash before the journal: the old set; after it: refused until a rerun.
    assert state == (old if crash_after == 0 else None), calls

    assert generations.finish_interrupted_switch(out, "train") == (crash_after > 0)
    new = _split_state(out)
    assert new == (old if crash_after == 0 else (new_classes, {
        "rotated.jpg": [0, 1, 2], "png.jpg": []}))
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_rerun_finishes_an_interrupted_switch(tmp_path, mixed_records,
                                              monkeypatch):
    out = str(tmp_path / "out")
    shard_writer.write_split(mixed_records[:2], out, "train", CLASSES, num_shards=2,
                    num_workers=1)
    real_replace = os.replace
    calls = []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # The journal and one shard are in place.
            raise OSError(5, "simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(ValueError, match="rerun"):
        shard_writer.write_split(mixed_records[2:4], out, "train", CLASSES,
                        num_shards=2, num_workers=1, overwrite=True)
    monkeypatch.undo()
    journal = os.path.join(out, ".train.switch.json")
    assert os.path.exists(journal)
    with pytest.raises(ValueError, match=r"half-way.*\.train\.switch\.json"):
        shard_sets.find_shards(schema.split_file_pattern(out, "train"))
    with pytest.raises(ValueError, match="half-way"):
        shard_sets.count_records([os.path.join(out, "train-00000-of-00002.tfrecord")])
    with pytest.raises(ValueError, match="half-way"):
        label_maps.class_names_for_shards([os.path.join(out, "x.tfrecord")])
    # Without --overwrite the rerun finishes the switch, then refuses.
    with pytest.raises(ValueError, match="already exists"):
        shard_writer.write_split(mixed_records[:1], out, "train", CLASSES,
                        num_shards=1, num_workers=1)
    assert not os.path.exists(journal)
    assert read_split(out, "train").keys() == {"png.jpg", "rotated.jpg"}


# ----------------------------------------------------------------------------
# Output errors: one ValueError naming the path.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["under_a_file", "missing_parent",
                                   "read_only"])
def test_unusable_output_dir_is_one_error(tmp_path, mixed_records, where):
    (tmp_path / "file").write_text("x")
    output_dir = {"under_a_file": str(tmp_path / "file" / "out"),
                  "missing_parent": "/proc/no_such_dir/out",
                  "read_only": "/sys/mlcrl_tf_test_out"}[where]
    with pytest.raises(ValueError, match="output_dir") as info:
        shard_writer.write_split(mixed_records, output_dir, "train", CLASSES,
                        num_shards=1, num_workers=1)
    assert output_dir in str(info.value)


def test_full_disk_is_one_error(tmp_path, mixed_records, monkeypatch):
    real_writer = tf.io.TFRecordWriter

    class FullDiskWriter(real_writer):
        def write(self, record):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tf.io, "TFRecordWriter", FullDiskWriter)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="No space left on device") as info:
        shard_writer.write_split(mixed_records, out, "train", CLASSES, num_shards=2,
                        num_workers=1)
    assert ".train-0000" in str(info.value)  # Names the file.
    assert os.listdir(out) == []



@pytest.mark.parametrize("failing", ["write", "chunks"])
def test_a_failed_shard_closes_its_writer(tmp_path, mixed_records, monkeypatch, failing):
    """A write error, or a worker failure while the shard is open, closes the
    shard's TFRecordWriter (no leaked handle) and removes the temporary."""
    real_writer = tf.io.TFRecordWriter
    writers = []

    class TrackedWriter(real_writer):
        closed = False

        def __init__(self, path):
            super().__init__(path)
            writers.append(self)

        def write(self, record):
            if failing == "write":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super().write(record)

        def close(self):
            self.closed = True
            super().close()

    def chunks():
        yield [("stored", None, b"one record")]
        raise schema.ConversionError("a worker process died")

    monkeypatch.setattr(tf.io, "TFRecordWriter", TrackedWriter)
    path = str(tmp_path / "shard.tfrecord")
    with pytest.raises(schema.ConversionError):
        shard_writer._write_shard(path, chunks())
    assert len(writers) == 1 and writers[0].closed
    if failing == "write":
        out = str(tmp_path / "out")
        with pytest.raises(schema.ConversionError):
            shard_writer.write_split(mixed_records, out, "train", CLASSES, num_shards=2,
                            num_workers=1)
        assert len(writers) == 2 and writers[1].closed and os.listdir(out) == []


def test_write_split_reports_progress(tmp_path, mixed_records):
    stream = io.StringIO()
    bar = progress.Progress(unit="images", stream=stream, interval=0)
    shard_writer.write_split(mixed_records, str(tmp_path / "out"), "train", CLASSES,
                    num_shards=2, num_workers=1, progress=bar)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "train: 0/6 images (0.0%)"
    assert lines[-2].startswith("train: 6/6 images (100.0%)")
    assert lines[-1].startswith("train: 6 images in ")


def test_existing_crlf_labels_file_with_the_same_names_is_kept(
        tmp_path, mixed_records):
    out = tmp_path / "out"
    out.mkdir()
    (out / "labels.txt").write_bytes(b"cat\r\ndog\r\nperson\r\n")
    shard_writer.write_split(mixed_records[:1], str(out), "train", CLASSES,
                    num_shards=1, num_workers=1)
    assert (out / "labels.txt").read_bytes() == b"cat\r\ndog\r\nperson\r\n"

"""The converters under faults of the second campaign: two converters in one
directory at once, Ctrl-C, URL output paths, file names that are not UTF-8,
CSV headers spelt otherwise (docs/reliability.md, Converters)."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from pipelines.converters import coco_lib
from pipelines.converters import csv_lib
from pipelines.records import label_maps
from pipelines.records import output_lock
from pipelines.records import shard_writer

from conftest import REPO
from helpers import CLASSES
from helpers import default_sigint
from helpers import read_split
from helpers import save


def _records(photos, directory, count=4, labels=(0,)):
    os.makedirs(directory, exist_ok=True)
    return [shard_writer.ImageRecord(save(str(directory), f"{i}.jpg", photos[i % 2], "JPEG"),
                                     f"{i}.jpg", labels) for i in range(count)]


def _temporaries(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


# ---------------------------------------------------------------------------
# Two converters writing into one directory at once.
# ---------------------------------------------------------------------------

def _hold_lock(directory, held, seconds):
    with output_lock.locked(directory):
        held.set()
        time.sleep(seconds)


@pytest.mark.parametrize("lock_the_directory", [True, False])
def test_the_conversion_lock_excludes_another_process(tmp_path, monkeypatch,
                                                     lock_the_directory):
    """The directory itself is locked (nothing left behind); where a file
    system cannot lock a directory (NFS), a lock file is."""
    if not lock_the_directory:
        monkeypatch.setattr(output_lock, "_lock_directory", lambda directory: None)
    context = multiprocessing.get_context("fork")
    held = context.Event()
    holder = context.Process(target=_hold_lock, args=(str(tmp_path), held, 1.5))
    holder.start()
    assert held.wait(60)
    start = time.monotonic()
    with output_lock.locked(str(tmp_path)):
        waited = time.monotonic() - start
    holder.join()
    assert waited > 0.5
    assert os.listdir(tmp_path) == ([] if lock_the_directory else [output_lock.LOCK_NAME])


def _while_writing(monkeypatch, other):
    """Runs `other()` while the next write_split writes its shards: the other
    converter starts after this one checked labels.txt and ends before it
    commits (the race of two parallel conversions)."""
    real = shard_writer._write_shards
    done = []

    def write_shards(*args, **kwargs):
        outcome = real(*args, **kwargs)
        if not done:
            done.append(True)
            other()
        return outcome

    monkeypatch.setattr(shard_writer, "_write_shards", write_shards)


def test_a_split_with_other_class_names_converted_meanwhile_is_refused(tmp_path, photos,
                                                                      monkeypatch):
    """Failed before: the second converter's labels.txt replaced the first's
    (or the reverse), and readers took the shards with the wrong names."""
    out = str(tmp_path / "out")
    other_names = ["bird", "car", "tree"]
    _while_writing(monkeypatch, lambda: shard_writer.write_split(
        _records(photos, tmp_path / "val_images"), out, "val", other_names, 2,
        num_workers=1))
    with pytest.raises(ValueError,
                       match="labels.txt exists with different class names"):
        shard_writer.write_split(_records(photos, tmp_path / "train_images"), out,
                                 "train", CLASSES, 2, num_workers=1)
    assert label_maps.read_class_names(os.path.join(out, "labels.txt")) == other_names
    assert len(read_split(out, "val")) == 4  # the other split, intact
    assert not [n for n in os.listdir(out) if n.startswith("train")]
    assert _temporaries(out) == []


def test_two_splits_of_one_label_map_convert_in_parallel(tmp_path, photos, monkeypatch):
    """The common case (train and val of one dataset at once) just works."""
    out = str(tmp_path / "out")
    _while_writing(monkeypatch, lambda: shard_writer.write_split(
        _records(photos, tmp_path / "val_images"), out, "val", CLASSES, 2, num_workers=1))
    shard_writer.write_split(_records(photos, tmp_path / "train_images"), out, "train",
                             CLASSES, 2, num_workers=1)
    assert len(read_split(out, "train")) == len(read_split(out, "val")) == 4
    assert label_maps.read_class_names(os.path.join(out, "labels.txt")) == CLASSES
    assert _temporaries(out) == []


def test_the_same_split_converted_meanwhile_is_refused(tmp_path, photos, monkeypatch):
    out = str(tmp_path / "out")
    _while_writing(monkeypatch, lambda: shard_writer.write_split(
        _records(photos, tmp_path / "b", count=3), out, "train", CLASSES, 3,
        num_workers=1))
    with pytest.raises(ValueError, match="converted by another process meanwhile"):
        shard_writer.write_split(_records(photos, tmp_path / "a"), out, "train", CLASSES,
                                 2, num_workers=1)
    assert len(read_split(out, "train")) == 3 and _temporaries(out) == []


# ---------------------------------------------------------------------------
# Ctrl-C, URL outputs.
# ---------------------------------------------------------------------------

def test_ctrl_c_during_a_conversion_is_one_line_and_keeps_the_previous_split(tmp_path,
                                                                          photos):
    """Failed before: a 31-frame KeyboardInterrupt traceback (and one from
    every worker process)."""
    images = tmp_path / "images"
    lines = []
    for i in range(400):
        save(str(images), f"{i}.jpg", photos[i % 2], "JPEG")
        lines.append(f"{i}.jpg,{CLASSES[i % 3]}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipelines.csv_to_tfrecord", f"--csv={tmp_path / 'data.csv'}",
            f"--image_dir={images}", f"--output_dir={out}", "--num_shards=4"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run(args + ["--num_workers=1"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    proc = subprocess.Popen(args + ["--num_workers=2", "--overwrite"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # a process group, as a terminal's
                            preexec_fn=default_sigint)
    time.sleep(1)
    while not any(n.startswith(".train-") for n in os.listdir(out)):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the converter and its workers
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("interrupted")] == [
        "interrupted (Ctrl-C): stopped. Files are written whole or not at all: no partial "
        "output was left in place."]
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before


@pytest.mark.parametrize("url", ["ram://converted", "gs://bucket/converted"])
def test_a_url_output_dir_is_refused_not_made_a_local_folder(tmp_path, photos, url,
                                                            monkeypatch):
    """Failed before: a local directory named `ram:` (or `gs:`) held the data."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"--output_dir='{url}' is not on the local file "
                       "system, which the shard writer"):
        shard_writer.write_split(_records(photos, tmp_path / "images"), url, "train",
                                 CLASSES, 2, num_workers=1)
    assert sorted(os.listdir(tmp_path)) == ["images"]


def test_a_file_url_output_dir_is_the_local_directory(tmp_path, photos):
    out = tmp_path / "out"
    shard_writer.write_split(_records(photos, tmp_path / "images"), f"file://{out}",
                             "train", CLASSES, 2, num_workers=1)
    assert len(read_split(str(out), "train")) == 4


# ---------------------------------------------------------------------------
# New kinds of bad input.
# ---------------------------------------------------------------------------

def test_a_coco_file_name_that_is_not_utf8_is_skipped_and_counted(tmp_path, photos):
    """Failed before: a UnicodeEncodeError traceback from the writer."""
    images = tmp_path / "images"
    names = ["a.jpg", os.fsdecode(b"bad\xff.jpg"), "c.jpg"]
    for i, name in enumerate(names):
        save(str(images), name, photos[i % 2], "JPEG")
    coco = {"images": [{"id": i + 1, "file_name": n, "width": 96, "height": 64}
                       for i, n in enumerate(names)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1,
                             "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}
                            for i in range(3)],
            "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "other"}]}
    annotations = tmp_path / "instances_train.json"
    annotations.write_text(json.dumps(coco))  # the bad name as "\udcff"
    report = coco_lib.convert(str(annotations), str(images), str(tmp_path / "out"),
                              num_shards=1, num_workers=1)
    assert report["num_records"] == 2 and report["num_skipped"] == 1
    assert "not valid UTF-8" in report["skipped"][0]["reason"]
    assert sorted(read_split(str(tmp_path / "out"), "train")) == ["a.jpg", "c.jpg"]


@pytest.mark.parametrize("header", ["file_name,classes", "image,tags", "Path,Label"])
def test_a_csv_header_spelt_otherwise_is_read_as_a_header(tmp_path, photos, header):
    """Failed before: `file_name,classes` became an image row and `classes` a
    class of the label map."""
    images = tmp_path / "images"
    for i in range(3):
        save(str(images), f"{i}.jpg", photos[i % 2], "JPEG")
    rows = [header, "0.jpg,cat|dog", "1.jpg,dog", "2.jpg,person"]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    report = csv_lib.convert(str(tmp_path / "data.csv"), str(images), str(tmp_path / "out"),
                             num_shards=1, num_workers=1)
    assert report["num_input_records"] == 3 and report["num_skipped"] == 0
    assert label_maps.read_class_names(str(tmp_path / "out")) == ["cat", "dog", "person"]


def test_a_first_row_with_a_missing_image_of_known_classes_stays_a_data_row(tmp_path,
                                                                            photos):
    images = tmp_path / "images"
    save(str(images), "1.jpg", photos[0], "JPEG")
    (tmp_path / "data.csv").write_text("missing.jpg,cat\n1.jpg,cat|dog\n")
    report = csv_lib.convert(str(tmp_path / "data.csv"), str(images), str(tmp_path / "out"),
                             num_shards=1, num_workers=1)
    assert report["num_input_records"] == 2 and report["num_skipped"] == 1

"""Tests of pipelines.tfrecord_lib on real photos (scikit-learn's samples).

Every fixture image is derived from `sklearn.datasets.load_sample_images()`
(china.jpg, flower.jpg) with PIL and written into a tmp dir.
"""

import builtins
import errno
import io
import json
import os
import struct
import zlib

import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest
from sklearn.datasets import load_sample_images
import tensorflow as tf

from pipelines.records import generations
from pipelines.records import image_files
from pipelines.records import label_maps
from pipelines.records import schema
from pipelines.records import shard_sets
from pipelines.records import shard_writer
from pipelines.utils import progress

W, H = 96, 64  # Fixture size (width, height): small but real content.
CLASSES = ["cat", "dog", "person"]


@pytest.fixture(scope="module")
def photos():
    china, flower = load_sample_images().images
    return [Image.fromarray(p).resize((W, H), Image.BILINEAR)
            for p in (china, flower)]


def save(directory, name, image, fmt, **kwargs):
    path = os.path.join(directory, name)
    image.save(path, fmt, **kwargs)
    return path


def write_bytes(directory, name, data):
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def decode(data):
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()


def mean_abs_diff(a, b):
    return np.abs(a.astype(np.float64) - np.asarray(b, np.float64)).mean()


def read_split(output_dir, split):
    """filename -> dict(labels, difficult, encoded, image) via FEATURE_SPEC."""
    files = shard_sets.find_shards(schema.split_file_pattern(output_dir, split))
    out = {}
    for raw in tf.data.TFRecordDataset(files):
        example = tf.io.parse_single_example(raw, schema.FEATURE_SPEC)
        name = example[schema.FILENAME_KEY].numpy().decode()
        assert name not in out
        encoded = example[schema.ENCODED_KEY].numpy()
        out[name] = {
            "labels": tf.sparse.to_dense(
                example[schema.LABEL_KEY]).numpy().tolist(),
            "difficult": tf.sparse.to_dense(
                example[schema.DIFFICULT_KEY]).numpy().tolist(),
            "encoded": encoded,
            "image": decode(encoded),
        }
    return out


def shard_files(directory, split):
    return sorted(n for n in os.listdir(directory)
                  if n.startswith(split + "-") and n.endswith(".tfrecord"))


# ----------------------------------------------------------------------------
# prepare_image: what is kept, what is re-encoded (measured on TF 2.21).
# ----------------------------------------------------------------------------

def _make_kept(directory, photo, kind):
    if kind == "rgb.jpg":
        return save(directory, kind, photo, "JPEG", quality=90)
    if kind == "gray.jpg":
        return save(directory, kind, photo.convert("L"), "JPEG")
    if kind == "png_named.jpg":
        return save(directory, kind, photo, "PNG")
    if kind == "cmyk.jpg":
        return save(directory, kind, photo.convert("CMYK"), "JPEG", quality=95)
    if kind == "gray16.png":
        gray = np.asarray(photo.convert("L")).astype(np.uint16) * 257
        return save(directory, kind, Image.fromarray(gray), "PNG")
    if kind == "palette.png":
        return save(directory, kind, photo.convert(
            "P", palette=Image.ADAPTIVE), "PNG")
    if kind == "still.gif":
        return save(directory, kind, photo.convert("P"), "GIF")
    if kind == "rgb.bmp":
        return save(directory, kind, photo, "BMP")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "rgb.jpg", "gray.jpg", "png_named.jpg", "cmyk.jpg", "gray16.png",
    "palette.png", "still.gif", "rgb.bmp"])
def test_decodable_images_are_stored_unchanged(tmp_path, photos, kind):
    path = _make_kept(str(tmp_path), photos[0], kind)
    encoded, reason = image_files.prepare_image(path)
    assert reason is None
    with open(path, "rb") as f:
        assert encoded == f.read()
    image = decode(encoded)
    assert image.shape == (H, W, 3)
    # TF's pixels match what the image shows (CMYK included; the 16-bit
    # PNG is scaled to 8 bit, not clipped).
    if kind in ("palette.png", "still.gif"):  # Exact: compare with PIL.
        with Image.open(path) as pil:
            assert np.array_equal(image, np.asarray(pil.convert("RGB")))
        return
    reference = np.asarray(photos[0].convert(
        "L" if kind.startswith("gray") else "RGB"))
    if reference.ndim == 2:
        reference = reference[..., None]
    assert mean_abs_diff(image, reference) < 4


@pytest.mark.parametrize("kind,fmt,magic", [
    ("rgb.tiff", "TIFF", b"\xff\xd8"),
    ("rgb.webp", "WEBP", b"\xff\xd8"),
    ("rgba.tiff", "TIFF", b"\x89PNG"),
])
def test_other_formats_are_reencoded(tmp_path, photos, kind, fmt, magic):
    photo = photos[1].convert("RGBA") if kind.startswith("rgba") else photos[1]
    options = {"lossless": True} if fmt == "WEBP" else {}
    path = save(str(tmp_path), kind, photo, fmt, **options)
    encoded, reason = image_files.prepare_image(path)
    assert fmt in reason
    assert encoded.startswith(magic)
    image = decode(encoded)
    assert image.shape == (H, W, 3)
    assert mean_abs_diff(image, photos[1]) < 4


def test_exif_orientation_is_applied(tmp_path, photos):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display".
    path = save(str(tmp_path), "exif6.jpg", photos[0], "JPEG", quality=95,
                exif=exif.tobytes())
    with open(path, "rb") as f:
        # TensorFlow ignores EXIF: the original bytes decode sideways.
        assert decode(f.read()).shape == (H, W, 3)
    encoded, reason = image_files.prepare_image(path)
    assert "orientation 6" in reason
    image = decode(encoded)
    assert image.shape == (W, H, 3)
    upright = np.rot90(np.asarray(photos[0]), k=-1)  # 90 degrees clockwise.
    assert mean_abs_diff(image, upright) < 4
    assert mean_abs_diff(image, np.rot90(np.asarray(photos[0]), k=1)) > 20


@pytest.mark.parametrize("kind,reason", [
    ("truncated", "not a readable image"),
    ("garbage", "not a readable image"),
    ("empty", "empty file"),
    ("missing", "file not found"),
])
def test_unreadable_images_raise(tmp_path, photos, kind, reason):
    data = jpeg_bytes(photos[0])
    contents = {"truncated": data[:len(data) // 2],
                "garbage": data[:20] + os.urandom(200) + b"\x00" * 100,
                "empty": b""}
    path = str(tmp_path / f"{kind}.jpg")
    if kind != "missing":
        write_bytes(str(tmp_path), f"{kind}.jpg", contents[kind])
    with pytest.raises(image_files.ImageError, match=reason) as info:
        image_files.prepare_image(path)
    assert path in str(info.value)


# ----------------------------------------------------------------------------
# write_split.
# ----------------------------------------------------------------------------

@pytest.fixture()
def mixed_records(tmp_path, photos):
    """Six real images (one corrupt, one missing) with labels."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    d = str(image_dir)
    save(d, "a.jpg", photos[0], "JPEG", quality=90)
    save(d, "gray.jpg", photos[1].convert("L"), "JPEG")
    save(d, "png.jpg", photos[1], "PNG")
    exif = Image.Exif()
    exif[0x0112] = 8
    save(d, "rotated.jpg", photos[0], "JPEG", exif=exif.tobytes())
    write_bytes(d, "corrupt.jpg", jpeg_bytes(photos[0])[:300])
    spec = [("a.jpg", (0, 2), ()), ("gray.jpg", (1,), (1,)),
            ("png.jpg", (), ()), ("rotated.jpg", (0, 1, 2), (2,)),
            ("corrupt.jpg", (0,), ()), ("missing.jpg", (1,), ())]
    return [shard_writer.ImageRecord(os.path.join(d, name), name, labels, difficult)
            for name, labels, difficult in spec]


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
# Class names (issue 13 item 5): only "\n" separates lines of labels.txt.
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
# Generation switch (issue 13 item 7): one atomic step.
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
# Counting and label maps of selected shards (issue 13 items 9, 1, 4).
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


# ----------------------------------------------------------------------------
# Bounded resources (issue 13 items 13, 15).
# ----------------------------------------------------------------------------

def png_of_zeros(path, width, height):
    """A valid grayscale PNG of width x height zeros, built row by row (a
    decompression bomb: tiny file, huge image)."""
    def chunk(kind, data):
        body = kind + data
        return (struct.pack(">I", len(data)) + body
                + struct.pack(">I", zlib.crc32(body) & 0xffffffff))

    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # Filter byte 0 + one byte per pixel.
    idat = b"".join(compressor.compress(row) for _ in range(height))
    idat += compressor.flush()
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                             0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _forbid_decoding(monkeypatch):
    def fail(*unused_args, **unused_kwargs):
        raise AssertionError("decoded an image over the pixel budget")
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    monkeypatch.setattr(tf.io, "decode_image", fail)


def test_pixel_budget_refuses_before_decoding(tmp_path, monkeypatch):
    path = png_of_zeros(str(tmp_path / "bomb.png"), 10_001, 10_000)
    assert os.path.getsize(path) < 200_000
    _forbid_decoding(monkeypatch)
    with pytest.raises(image_files.ImageError, match=(
            r"10001x10000 = 100010000 pixels exceeds the pixel budget "
            r"--max_image_pixels=100000000")):
        image_files.prepare_image(path)


def test_pixel_budget_flag_is_honoured(tmp_path, photos):
    path = save(str(tmp_path), "a.jpg", photos[0], "JPEG")
    limits = image_files.ImageLimits(max_pixels=W * H - 1)
    with pytest.raises(image_files.ImageError, match="pixel budget"):
        image_files.prepare_image(path, limits)
    assert image_files.prepare_image(path, image_files.ImageLimits(max_pixels=W * H))[1] is None
    records = [shard_writer.ImageRecord(path, "a.jpg", (0,)),
               shard_writer.ImageRecord(path + ".png", "b.png", (1,))]
    photos[1].resize((10, 10)).save(records[1].path)
    report = shard_writer.write_split(records, str(tmp_path / "out"), "train",
                             CLASSES, num_shards=1, num_workers=1,
                             limits=image_files.ImageLimits(max_pixels=100))
    assert report["num_skipped"] == 1 and report["max_image_pixels"] == 100
    assert "pixel budget" in report["skipped"][0]["reason"]


def test_animated_gif_stores_first_frame_only(tmp_path, photos):
    frames = [photos[0].convert("P"),
              photos[1].convert("P"), photos[0].rotate(180).convert("P")]
    path = save(str(tmp_path), "anim.gif", frames[0], "GIF", save_all=True,
                append_images=frames[1:])
    encoded, reason = image_files.prepare_image(path)
    assert reason == "animated GIF, first frame stored"
    assert encoded.startswith(b"\x89PNG")  # Lossless.
    with Image.open(io.BytesIO(encoded)) as stored:
        assert not getattr(stored, "is_animated", False)
    with Image.open(path) as original:
        first = np.asarray(original.convert("RGB"))
    assert np.array_equal(decode(encoded), first)


def test_memory_error_is_reported_as_out_of_memory(tmp_path, photos,
                                                   monkeypatch):
    path = save(str(tmp_path), "a.png", photos[0], "PNG")

    def out_of_memory(*unused_args, **unused_kwargs):
        raise MemoryError()

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    with pytest.raises(image_files.ImageError, match="out of memory") as info:
        image_files.prepare_image(path)
    assert "corrupt" not in str(info.value)
    assert "not a readable image" not in str(info.value)


def _forbid_reading(monkeypatch):
    def fail(*unused_args, **unused_kwargs):
        raise AssertionError("read a file that is refused by its fstat")
    monkeypatch.setattr(os, "fdopen", fail)
    monkeypatch.setattr(os, "read", fail)
    monkeypatch.setattr(builtins, "open", fail)


@pytest.mark.parametrize("kind,reason", [
    ("fifo", r"not a regular file \(a FIFO\)"),
    ("directory", r"not a regular file \(a directory\)"),
    ("dev_zero", r"not a regular file \(a character device\)"),
    ("link_to_fifo", r"not a regular file \(a FIFO\)"),
    ("too_big", r"file of 4097 bytes exceeds the size cap "
                r"--max_image_bytes=4096"),
])
def test_special_and_large_files_are_skipped(tmp_path, monkeypatch, fifo_unblocker,
                                             kind, reason):
    path = str(tmp_path / f"{kind}.jpg")
    if kind in ("fifo", "link_to_fifo"):
        os.mkfifo(str(tmp_path / "pipe"))
        fifo_unblocker(str(tmp_path / "pipe"))
        os.symlink(str(tmp_path / "pipe"), path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "dev_zero":
        os.symlink("/dev/zero", path)
    else:
        write_bytes(str(tmp_path), f"{kind}.jpg", b"\xff" * 4097)
    with monkeypatch.context() as patch:
        _forbid_reading(patch)
        with pytest.raises(image_files.ImageError, match=reason):
            image_files.prepare_image(path, image_files.ImageLimits(max_bytes=4096))
    # Refused from fstat alone: nothing was read, and opening the FIFO did
    # not block (a blocked open would have waited for the unblocker).
    assert fifo_unblocker.rescued == []


# ----------------------------------------------------------------------------
# Output errors (issue 13 item 18): one ValueError naming the path.
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

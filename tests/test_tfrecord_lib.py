"""Tests of pipelines.tfrecord_lib on real photos (scikit-learn's samples).

Every fixture image is derived from `sklearn.datasets.load_sample_images()`
(china.jpg, flower.jpg) with PIL and written into a tmp dir.
"""

import io
import json
import os

import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_sample_images
import tensorflow as tf

from pipelines import tfrecord_lib as lib

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
    files = lib.find_shards(lib.split_file_pattern(output_dir, split))
    out = {}
    for raw in tf.data.TFRecordDataset(files):
        example = tf.io.parse_single_example(raw, lib.FEATURE_SPEC)
        name = example[lib.FILENAME_KEY].numpy().decode()
        assert name not in out
        encoded = example[lib.ENCODED_KEY].numpy()
        out[name] = {
            "labels": tf.sparse.to_dense(
                example[lib.LABEL_KEY]).numpy().tolist(),
            "difficult": tf.sparse.to_dense(
                example[lib.DIFFICULT_KEY]).numpy().tolist(),
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
    if kind == "anim.gif":
        frames = [photo.convert("P"), photo.transpose(Image.FLIP_LEFT_RIGHT)
                  .convert("P")]
        return save(directory, kind, frames[0], "GIF", save_all=True,
                    append_images=frames[1:])
    if kind == "rgb.bmp":
        return save(directory, kind, photo, "BMP")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", [
    "rgb.jpg", "gray.jpg", "png_named.jpg", "cmyk.jpg", "gray16.png",
    "palette.png", "anim.gif", "rgb.bmp"])
def test_decodable_images_are_stored_unchanged(tmp_path, photos, kind):
    path = _make_kept(str(tmp_path), photos[0], kind)
    encoded, reason = lib.prepare_image(path)
    assert reason is None
    with open(path, "rb") as f:
        assert encoded == f.read()
    image = decode(encoded)
    assert image.shape == (H, W, 3)
    # TF's pixels match what the image shows (CMYK included; the 16-bit
    # PNG is scaled to 8 bit, not clipped).
    if kind in ("palette.png", "anim.gif"):  # Exact: compare with PIL.
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
    encoded, reason = lib.prepare_image(path)
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
    encoded, reason = lib.prepare_image(path)
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
    with pytest.raises(lib.ImageError, match=reason) as info:
        lib.prepare_image(path)
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
    return [lib.ImageRecord(os.path.join(d, name), name, labels, difficult)
            for name, labels, difficult in spec]


def test_write_split_round_trip(tmp_path, mixed_records):
    out = str(tmp_path / "out")
    report = lib.write_split(mixed_records, out, "train", CLASSES,
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
    lib.write_split(mixed_records, out, "train", CLASSES, num_shards=3,
                    num_workers=1)
    with pytest.raises(ValueError, match="--overwrite") as info:
        lib.write_split(mixed_records, out, "train", CLASSES, num_shards=3,
                        num_workers=1)
    assert os.path.join(out, "train-00000-of-00003.tfrecord") in str(info.value)

    # Overwrite with another shard count: the old set disappears.
    report = lib.write_split(mixed_records[:2], out, "train", CLASSES,
                             num_shards=2, num_workers=1, overwrite=True)
    assert shard_files(out, "train") == [
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    assert report["num_records"] == 2
    assert read_split(out, "train").keys() == {"a.jpg", "gray.jpg"}

    # A report alone also counts as an existing split.
    for name in shard_files(out, "train"):
        os.remove(os.path.join(out, name))
    with pytest.raises(ValueError, match="train_report.json"):
        lib.write_split(mixed_records, out, "train", CLASSES, num_shards=2,
                        num_workers=1)


def test_labels_file_shared_by_splits(tmp_path, mixed_records):
    out = str(tmp_path / "out")
    lib.write_split(mixed_records[:2], out, "train", CLASSES, num_shards=1,
                    num_workers=1)
    lib.write_split(mixed_records[2:4], out, "val", CLASSES, num_shards=1,
                    num_workers=1)
    assert lib.read_class_names(out) == CLASSES
    with pytest.raises(ValueError, match="labels.txt") as info:
        lib.write_split(mixed_records[:2], out, "test",
                        ["cat", "dog", "bird"], num_shards=1, num_workers=1,
                        overwrite=True)
    assert "train" in str(info.value) and "val" in str(info.value)
    assert shard_files(out, "test") == []


def _fail_on_third_shard(monkeypatch):
    real = lib._write_shard
    calls = []

    def flaky(task):
        calls.append(task[0])
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(task)

    monkeypatch.setattr(lib, "_write_shard", flaky)
    return calls


def test_interrupted_run_leaves_no_shards(tmp_path, mixed_records,
                                          monkeypatch):
    out = str(tmp_path / "out")
    calls = _fail_on_third_shard(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        lib.write_split(mixed_records, out, "train", CLASSES, num_shards=4,
                        num_workers=1)
    assert len(calls) == 3  # Two shards were complete when it failed.
    assert shard_files(out, "train") == []
    assert os.listdir(out) == []  # No temporaries, labels or report either.
    with pytest.raises(ValueError, match="matches no file"):
        lib.find_shards(lib.split_file_pattern(out, "train"))

    monkeypatch.undo()  # Nothing final exists: no overwrite needed.
    report = lib.write_split(mixed_records, out, "train", CLASSES,
                             num_shards=4, num_workers=1)
    assert report["num_records"] == 4
    assert len(lib.find_shards(os.path.join(out, "train-*.tfrecord"))) == 4


def test_interrupted_overwrite_keeps_old_split(tmp_path, mixed_records,
                                               monkeypatch):
    out = str(tmp_path / "out")
    lib.write_split(mixed_records[:2], out, "train", CLASSES, num_shards=2,
                    num_workers=1)
    before = {n: (tmp_path / "out" / n).read_bytes()
              for n in shard_files(out, "train")}
    _fail_on_third_shard(monkeypatch)
    with pytest.raises(RuntimeError):
        lib.write_split(mixed_records, out, "train", CLASSES, num_shards=4,
                        num_workers=1, overwrite=True)
    after = {n: (tmp_path / "out" / n).read_bytes()
             for n in shard_files(out, "train")}
    assert after == before
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    monkeypatch.undo()
    lib.write_split(mixed_records, out, "train", CLASSES, num_shards=4,
                    num_workers=1, overwrite=True)
    assert len(lib.find_shards(lib.split_file_pattern(out, "train"))) == 4


def test_stale_temporaries_are_removed(tmp_path, mixed_records):
    out = tmp_path / "out"
    out.mkdir()
    stale = [".train-00001-of-00004.tfrecord.tmp-99999",
             ".train_report.json.tmp-123", ".labels.txt.tmp-5"]
    for name in stale + [".val-00000-of-00001.tfrecord.tmp-7"]:
        (out / name).write_bytes(b"partial")
    lib.write_split(mixed_records[:1], str(out), "train", CLASSES,
                    num_shards=1, num_workers=1)
    hidden = sorted(n for n in os.listdir(out) if n.startswith("."))
    # Another split's temporaries are not this run's business.
    assert hidden == [".val-00000-of-00001.tfrecord.tmp-7"]


def test_num_workers_gives_identical_shards(tmp_path, mixed_records):
    outputs = {}
    for workers in (1, 2):
        out = str(tmp_path / f"out{workers}")
        report = lib.write_split(mixed_records, out, "train", CLASSES,
                                 num_shards=2, num_workers=workers)
        outputs[workers] = (report, {
            n: open(os.path.join(out, n), "rb").read()
            for n in shard_files(out, "train")})
    assert outputs[1] == outputs[2]
    assert len(outputs[1][1]) == 2 and all(outputs[1][1].values())


def test_all_images_unreadable(tmp_path):
    records = [lib.ImageRecord(str(tmp_path / "nope.jpg"), "nope.jpg", (0,))]
    with pytest.raises(ValueError, match="none of the 1 images"):
        lib.write_split(records, str(tmp_path / "out"), "train", CLASSES,
                        num_shards=1, num_workers=1)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("kwargs,match", [
    ({"records": []}, "records is empty"),
    ({"records": [lib.ImageRecord("x.jpg", "x.jpg", (3,))]}, "outside"),
    ({"records": [lib.ImageRecord("x.jpg", "x.jpg", (0,), (1,))]},
     "difficult"),
    ({"records": [lib.ImageRecord("x.jpg", "x.jpg"),
                  lib.ImageRecord("y/x.jpg", "x.jpg")]}, "twice"),
    ({"split": "../train"}, "split"),
    ({"class_names": ["cat", "cat"]}, "twice"),
    ({"num_shards": 0}, "num_shards"),
    ({"extra_report": {"num_records": 1}}, "reserved"),
])
def test_write_split_rejects_bad_arguments(tmp_path, kwargs, match):
    arguments = {"records": [lib.ImageRecord("x.jpg", "x.jpg", (0,))],
                 "output_dir": str(tmp_path / "out"), "split": "train",
                 "class_names": CLASSES, "num_shards": 1, "num_workers": 1}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lib.write_split(**arguments)


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
    files = lib.find_shards(str(tmp_path / "train-*"))
    assert [os.path.basename(f) for f in files] == [
        f"train-0000{i}-of-00003.tfrecord" for i in range(3)]
    # A pattern may pick part of a complete set on purpose.
    assert len(lib.find_shards(str(tmp_path / "train-00001-*"))) == 1
    assert len(lib.find_shards(str(tmp_path / "*.tfrecord"))) == 4


def test_find_shards_detects_incomplete_and_mixed_sets(tmp_path):
    _touch(tmp_path, "train-00000-of-00003.tfrecord",
           "train-00002-of-00003.tfrecord")
    with pytest.raises(ValueError, match=r"missing shard\(s\) \[1\]"):
        lib.find_shards(str(tmp_path / "train-*.tfrecord"))
    with pytest.raises(ValueError, match="incomplete"):
        lib.find_shards(str(tmp_path / "train-00000-of-00003.tfrecord"))
    _touch(tmp_path, "train-00001-of-00003.tfrecord",
           "train-00000-of-00001.tfrecord")
    with pytest.raises(ValueError, match="different sizes"):
        lib.find_shards(str(tmp_path / "train-*.tfrecord"))
    with pytest.raises(ValueError, match="matches no file"):
        lib.find_shards(str(tmp_path / "test-*.tfrecord"))


def test_read_class_names_rejects_blank_lines(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match="line 2"):
        lib.read_class_names(str(tmp_path))

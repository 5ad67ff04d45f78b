"""Tests of the COCO, VOC and CSV converters on tiny datasets of real photos.

Fixture images come from `sklearn.datasets.load_sample_images()`; the COCO
JSON, VOC tree and CSV are written by the tests into tmp dirs.
"""

import json
import os
import subprocess
import sys

from PIL import Image
import pytest
from sklearn.datasets import load_sample_images
import tensorflow as tf

from pipelines import coco_to_tfrecord
from pipelines import csv_to_tfrecord
from pipelines import tfrecord_lib as lib
from pipelines import voc_to_tfrecord

W, H = 80, 56


@pytest.fixture(scope="module")
def photos():
    china, flower = load_sample_images().images
    return [Image.fromarray(p).resize((W, H), Image.BILINEAR)
            for p in (china, flower)]


def make_images(directory, photos, names):
    """Writes real images; names ending in '!corrupt' get truncated bytes,
    '!gray' a grayscale JPEG, '!png' PNG bytes (whatever the extension)."""
    os.makedirs(directory, exist_ok=True)
    for i, spec in enumerate(names):
        name, _, kind = spec.partition("!")
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        photo = photos[i % 2]
        if kind == "gray":
            photo.convert("L").save(path, "JPEG")
        elif kind == "png":
            photo.save(path, "PNG")
        else:
            photo.save(path, "JPEG", quality=90)
        if kind == "corrupt":
            with open(path, "r+b") as f:
                f.truncate(250)


def read_split(output_dir, split):
    """filename -> (labels, difficult, decoded image shape)."""
    files = lib.find_shards(lib.split_file_pattern(output_dir, split))
    out = {}
    for raw in tf.data.TFRecordDataset(files):
        example = tf.io.parse_single_example(raw, lib.FEATURE_SPEC)
        image = tf.io.decode_image(example[lib.ENCODED_KEY], channels=3,
                                   expand_animations=False)
        out[example[lib.FILENAME_KEY].numpy().decode()] = (
            tf.sparse.to_dense(example[lib.LABEL_KEY]).numpy().tolist(),
            tf.sparse.to_dense(example[lib.DIFFICULT_KEY]).numpy().tolist(),
            tuple(image.shape))
    return out


def read_json(path):
    with open(path) as f:
        return json.load(f)


def class_counts(report):
    return {c["name"]: (c["positives"], c["difficult"])
            for c in report["class_counts"]}


@pytest.mark.parametrize("module,command", [
    (coco_to_tfrecord, "python -m pipelines.coco_to_tfrecord "),
    (voc_to_tfrecord, "python -m pipelines.voc_to_tfrecord "),
    (csv_to_tfrecord, "python -m pipelines.csv_to_tfrecord "),
])
def test_docstring_starts_with_run_command(module, command):
    assert module.__doc__.startswith(command)


# ----------------------------------------------------------------------------
# COCO.
# ----------------------------------------------------------------------------

@pytest.fixture()
def coco(tmp_path, photos):
    image_dir = str(tmp_path / "val2014")
    names = ["COCO_val2014_1.jpg", "COCO_val2014_2.jpg!gray",
             "COCO_val2014_3.jpg", "COCO_val2014_4.jpg!corrupt",
             "COCO_val2014_5.jpg!png"]
    make_images(image_dir, photos, names)
    # Categories out of id order: class order must be by id.
    categories = [{"id": 90, "name": "toothbrush", "supercategory": "x"},
                  {"id": 1, "name": "person", "supercategory": "x"},
                  {"id": 18, "name": "dog", "supercategory": "x"}]
    images = [{"id": i, "file_name": f"COCO_val2014_{i}.jpg", "width": W,
               "height": H} for i in (5, 1, 2, 3, 4, 6)]  # 6 is missing.
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 18, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 18, "iscrowd": 0},
        {"id": 13, "image_id": 2, "category_id": 90, "iscrowd": 1},
        {"id": 14, "image_id": 4, "category_id": 1, "iscrowd": 0},
        {"id": 15, "image_id": 5, "category_id": 90, "iscrowd": 0},
        {"id": 16, "image_id": 6, "category_id": 18, "iscrowd": 0},
    ]  # Image 3 has no annotation.
    annotations_file = str(tmp_path / "instances_val2014.json")
    with open(annotations_file, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": categories}, f)
    return annotations_file, image_dir


def test_coco_round_trip(tmp_path, coco):
    annotations_file, image_dir = coco
    out = str(tmp_path / "out")
    report = coco_to_tfrecord.convert(annotations_file, image_dir, out,
                                      num_shards=2, num_workers=1)

    assert report["split"] == "val2014"
    assert lib.read_class_names(out) == ["person", "dog", "toothbrush"]
    assert read_split(out, "val2014") == {
        "COCO_val2014_1.jpg": ([0, 1], [], (H, W, 3)),
        "COCO_val2014_2.jpg": ([2], [], (H, W, 3)),  # iscrowd still labels.
        "COCO_val2014_5.jpg": ([2], [], (H, W, 3)),  # PNG bytes, .jpg name.
    }
    assert report == read_json(os.path.join(out, "val2014_report.json"))
    assert report["dropped_unannotated"] == 1
    assert report["num_images_in_annotations"] == 6
    assert report["num_annotations"] == 7
    assert report["num_crowd_annotations"] == 1
    assert report["category_ids"] == [1, 18, 90]
    assert report["num_records"] == 3
    assert {s["filename"] for s in report["skipped"]} == {
        "COCO_val2014_4.jpg", "COCO_val2014_6.jpg"}
    assert class_counts(report) == {"person": (1, 0), "dog": (1, 0),
                                    "toothbrush": (2, 0)}
    assert report["num_zero_label"] == 0


def test_coco_split_name(tmp_path, coco):
    annotations_file, image_dir = coco
    assert coco_to_tfrecord.default_split("a/instances_train2014.json") == (
        "train2014")
    assert coco_to_tfrecord.default_split("my_coco.json") == "train"
    report = coco_to_tfrecord.convert(annotations_file, image_dir,
                                      str(tmp_path / "out"), split="minival",
                                      num_shards=1, num_workers=1)
    assert report["split"] == "minival"
    assert os.path.exists(tmp_path / "out" / "minival-00000-of-00001.tfrecord")


def test_coco_bad_inputs(tmp_path, coco):
    annotations_file, image_dir = coco
    out = str(tmp_path / "out")
    missing = str(tmp_path / "instances_nope.json")
    with pytest.raises(ValueError, match="does not exist") as info:
        coco_to_tfrecord.convert(missing, image_dir, out)
    assert missing in str(info.value)
    with pytest.raises(ValueError, match="is not a directory") as info:
        coco_to_tfrecord.convert(annotations_file, str(tmp_path / "x"), out)
    assert str(tmp_path / "x") in str(info.value)
    bad = tmp_path / "instances_bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        coco_to_tfrecord.convert(str(bad), image_dir, out)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        coco_to_tfrecord.convert(str(bad), image_dir, out)
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------
# VOC.
# ----------------------------------------------------------------------------

def voc_xml(objects):
    body = "".join(
        f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
        + ("" if difficult is None else f"<difficult>{difficult}</difficult>")
        + "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"
          "</bndbox></object>"
        for name, difficult in objects)
    return (f"<annotation><folder>VOC2007</folder><size><width>{W}</width>"
            f"<height>{H}</height><depth>3</depth></size>{body}</annotation>")


@pytest.fixture()
def voc(tmp_path, photos):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    make_images(str(root / "JPEGImages"), photos,
                ["000001.jpg", "000002.jpg!gray", "000003.jpg",
                 "000004.jpg!corrupt"])
    annotations = {
        # dog: one difficult + one not -> not difficult; person: only
        # difficult -> difficult.
        "000001": [("dog", 1), ("dog", 0), ("person", 1)],
        # chair only difficult (twice) -> difficult; cat fine.
        "000002": [("cat", 0), ("chair", 1), ("chair", 1)],
        "000003": [("bird", None)],  # No <difficult> tag at all.
        "000004": [("sheep", 0)],
    }
    (root / "Annotations").mkdir()
    for image_id, objects in annotations.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects))
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text(
        "000001\n000002\n000004\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("000003\n")
    return str(root)


def test_voc_round_trip(tmp_path, voc):
    out = str(tmp_path / "out")
    report = voc_to_tfrecord.convert(voc, "trainval", out, num_shards=2,
                                     num_workers=1)
    dog, person, cat, chair = 11, 14, 7, 8
    assert read_split(out, "trainval") == {
        "000001.jpg": ([dog, person], [person], (H, W, 3)),
        "000002.jpg": ([cat, chair], [chair], (H, W, 3)),
    }
    assert report["num_records"] == 2
    assert report["skipped"][0]["filename"] == "000004.jpg"
    assert report["num_objects"] == 7
    assert report["num_difficult_objects"] == 4
    counts = class_counts(report)
    assert counts["dog"] == (1, 0) and counts["person"] == (1, 1)
    assert counts["chair"] == (1, 1) and counts["sheep"] == (0, 0)

    names = lib.read_class_names(out)
    assert names == list(voc_to_tfrecord.VOC_CLASSES) and len(names) == 20
    assert names[:3] == ["aeroplane", "bicycle", "bird"]
    assert names[-1] == "tvmonitor"

    report = voc_to_tfrecord.convert(voc, "test", out, num_shards=1,
                                     num_workers=1)
    assert read_split(out, "test") == {"000003.jpg": ([2], [], (H, W, 3))}


def test_voc_bad_inputs(tmp_path, voc):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="nowhere"):
        voc_to_tfrecord.convert(str(tmp_path / "nowhere"), "trainval", out)
    with pytest.raises(ValueError, match="must be one of"):
        voc_to_tfrecord.convert(voc, "training", out)
    with pytest.raises(ValueError, match=r"ImageSets/Main/val\.txt"):
        voc_to_tfrecord.convert(voc, "val", out)
    with open(os.path.join(voc, "Annotations", "000003.xml"), "w") as f:
        f.write(voc_xml([("unicorn", 0)]))
    with pytest.raises(ValueError, match="unknown class 'unicorn'") as info:
        voc_to_tfrecord.convert(voc, "test", out)
    assert "000003.xml" in str(info.value)
    os.remove(os.path.join(voc, "Annotations", "000003.xml"))
    with pytest.raises(ValueError, match="000003.xml does not exist"):
        voc_to_tfrecord.convert(voc, "test", out)


# ----------------------------------------------------------------------------
# CSV.
# ----------------------------------------------------------------------------

@pytest.fixture()
def csv_data(tmp_path, photos):
    image_dir = str(tmp_path / "images")
    make_images(image_dir, photos, ["sub/a.jpg", "b.jpg!gray", "c.png!png",
                                    "d,comma.jpg", "bad.jpg!corrupt"])
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(
        "filename,labels\n"
        "sub/a.jpg, person | dog\n"
        "b.jpg,\n"
        "\n"
        "c.png,cat|dog|\n"
        '"d,comma.jpg",cat\n'
        "bad.jpg,person\n")
    return str(csv_path), image_dir


def test_csv_round_trip_inferred_classes(tmp_path, csv_data):
    csv_path, image_dir = csv_data
    out = str(tmp_path / "out")
    report = csv_to_tfrecord.convert(csv_path, image_dir, out, num_shards=2,
                                     num_workers=1)
    assert lib.read_class_names(out) == ["cat", "dog", "person"]
    assert read_split(out, "train") == {
        "sub/a.jpg": ([1, 2], [], (H, W, 3)),
        "b.jpg": ([], [], (H, W, 3)),
        "c.png": ([0, 1], [], (H, W, 3)),
        "d,comma.jpg": ([0], [], (H, W, 3)),
    }
    assert report["classes_inferred"] is True
    assert report["num_zero_label"] == 1 and report["zero_label"] == ["b.jpg"]
    assert report["num_skipped"] == 1
    assert report["skipped"][0]["filename"] == "bad.jpg"
    assert class_counts(report) == {"cat": (2, 0), "dog": (2, 0),
                                    "person": (1, 0)}


def test_csv_given_classes(tmp_path, csv_data):
    csv_path, image_dir = csv_data
    classes = ["person", "dog", "cat", "bird"]
    report = csv_to_tfrecord.convert(csv_path, image_dir, str(tmp_path / "a"),
                                     classes=",".join(classes), split="val",
                                     num_shards=1, num_workers=1)
    assert report["split"] == "val"
    assert read_split(str(tmp_path / "a"), "val")["sub/a.jpg"][0] == [0, 1]
    # A labels.txt-style file, and a CSV without header.
    labels = tmp_path / "my_labels.txt"
    labels.write_text("\n".join(classes) + "\n")
    no_header = tmp_path / "no_header.csv"
    no_header.write_text("c.png,cat\nsub/a.jpg,bird\n")
    csv_to_tfrecord.convert(str(no_header), image_dir, str(tmp_path / "b"),
                            classes=str(labels), num_shards=1, num_workers=1)
    assert read_split(str(tmp_path / "b"), "train") == {
        "c.png": ([2], [], (H, W, 3)), "sub/a.jpg": ([3], [], (H, W, 3))}
    assert lib.read_class_names(str(tmp_path / "b")) == classes


def test_csv_bad_inputs(tmp_path, csv_data):
    csv_path, image_dir = csv_data
    out = str(tmp_path / "out")
    with pytest.raises(ValueError) as info:
        csv_to_tfrecord.convert(csv_path, image_dir, out, classes="cat,dog")
    message = str(info.value)
    assert "'person'" in message and csv_path in message
    assert "line 2" in message
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="does not exist") as info:
        csv_to_tfrecord.convert(missing, image_dir, out)
    assert missing in str(info.value)
    with pytest.raises(ValueError, match="is not a directory"):
        csv_to_tfrecord.convert(csv_path, str(tmp_path / "x"), out)
    bad = tmp_path / "bad.csv"
    for text, match in [("a.jpg;cat\n", "line 1: expected 2 columns"),
                        ("a.jpg,cat\nb.jpg,\na.jpg,dog\n",
                         "line 3: a.jpg already listed on line 1"),
                        ("/abs/a.jpg,cat\n", "relative to image_dir")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            csv_to_tfrecord.convert(str(bad), image_dir, out)
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------
# The absl entry points (one success, one clean failure).
# ----------------------------------------------------------------------------

def _run(module, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", module, *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_csv_script_prints_summary(tmp_path, csv_data):
    csv_path, image_dir = csv_data
    out = str(tmp_path / "out")
    result = _run("pipelines.csv_to_tfrecord", f"--csv={csv_path}",
                  f"--image_dir={image_dir}", f"--output_dir={out}",
                  "--num_shards=2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "wrote 4 images (1 skipped, 0 re-encoded)" in lines[0]
    assert out in lines[0]
    assert len(lib.find_shards(lib.split_file_pattern(out, "train"))) == 2


def test_coco_script_fails_cleanly(tmp_path):
    missing = str(tmp_path / "instances_val2014.json")
    result = _run("pipelines.coco_to_tfrecord", f"--annotations={missing}",
                  f"--image_dir={tmp_path}", f"--output_dir={tmp_path}/out")
    assert result.returncode == 1
    assert f"error: annotations file {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr

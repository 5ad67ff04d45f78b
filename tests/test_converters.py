"""Tests of the COCO, VOC and CSV converters on tiny datasets of real photos.

Fixture images come from `sklearn.datasets.load_sample_images()`; the COCO
JSON, VOC tree and CSV are written by the tests into tmp dirs.
"""

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

from PIL import Image
import pytest
from sklearn.datasets import load_sample_images
import tensorflow as tf

from pipelines.converters import coco_lib
from pipelines.converters import csv_lib
from pipelines.converters import voc_lib
from pipelines.records import label_maps
from pipelines.records import schema
from pipelines.records import shard_sets

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
    files = shard_sets.find_shards(schema.split_file_pattern(output_dir, split))
    out = {}
    for raw in tf.data.TFRecordDataset(files):
        example = tf.io.parse_single_example(raw, schema.FEATURE_SPEC)
        image = tf.io.decode_image(example[schema.ENCODED_KEY], channels=3,
                                   expand_animations=False)
        out[example[schema.FILENAME_KEY].numpy().decode()] = (
            tf.sparse.to_dense(example[schema.LABEL_KEY]).numpy().tolist(),
            tf.sparse.to_dense(example[schema.DIFFICULT_KEY]).numpy().tolist(),
            tuple(image.shape))
    return out


def read_json(path):
    with open(path) as f:
        return json.load(f)


def class_counts(report):
    return {c["name"]: (c["positives"], c["difficult"])
            for c in report["class_counts"]}


@pytest.mark.parametrize("name", ["coco", "voc", "csv"])
def test_docstring_starts_with_run_command(name):
    command = f"python -m pipelines.{name}_to_tfrecord "
    cli = importlib.import_module(f"pipelines.{name}_to_tfrecord")
    assert cli.__doc__.startswith(command)
    assert command in importlib.import_module(f"pipelines.converters.{name}_lib").__doc__


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
    report = coco_lib.convert(annotations_file, image_dir, out,
                                      num_shards=2, num_workers=1)

    assert report["split"] == "val2014"
    assert label_maps.read_class_names(out) == ["person", "dog", "toothbrush"]
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
    assert coco_lib.default_split("a/instances_train2014.json") == (
        "train2014")
    assert coco_lib.default_split("my_coco.json") == "train"
    report = coco_lib.convert(annotations_file, image_dir,
                                      str(tmp_path / "out"), split="minival",
                                      num_shards=1, num_workers=1)
    assert report["split"] == "minival"
    assert os.path.exists(tmp_path / "out" / "minival-00000-of-00001.tfrecord")


def test_coco_bad_inputs(tmp_path, coco):
    annotations_file, image_dir = coco
    out = str(tmp_path / "out")
    missing = str(tmp_path / "instances_nope.json")
    with pytest.raises(ValueError, match="does not exist") as info:
        coco_lib.convert(missing, image_dir, out)
    assert missing in str(info.value)
    with pytest.raises(ValueError, match="is not a directory") as info:
        coco_lib.convert(annotations_file, str(tmp_path / "x"), out)
    assert str(tmp_path / "x") in str(info.value)
    bad = tmp_path / "instances_bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        coco_lib.convert(str(bad), image_dir, out)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        coco_lib.convert(str(bad), image_dir, out)
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
    report = voc_lib.convert(voc, "trainval", out, num_shards=2,
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

    names = label_maps.read_class_names(out)
    assert names == list(voc_lib.VOC_CLASSES) and len(names) == 20
    assert names[:3] == ["aeroplane", "bicycle", "bird"]
    assert names[-1] == "tvmonitor"

    report = voc_lib.convert(voc, "test", out, num_shards=1,
                                     num_workers=1)
    assert read_split(out, "test") == {"000003.jpg": ([2], [], (H, W, 3))}


def test_voc_bad_inputs(tmp_path, voc):
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="nowhere"):
        voc_lib.convert(str(tmp_path / "nowhere"), "trainval", out)
    with pytest.raises(ValueError, match="must be one of"):
        voc_lib.convert(voc, "training", out)
    with pytest.raises(ValueError, match=r"ImageSets/Main/val\.txt"):
        voc_lib.convert(voc, "val", out)
    with open(os.path.join(voc, "Annotations", "000003.xml"), "w") as f:
        f.write(voc_xml([("unicorn", 0)]))
    with pytest.raises(ValueError, match="unknown class 'unicorn'") as info:
        voc_lib.convert(voc, "test", out)
    assert "000003.xml" in str(info.value)
    os.remove(os.path.join(voc, "Annotations", "000003.xml"))
    with pytest.raises(ValueError, match="000003.xml does not exist"):
        voc_lib.convert(voc, "test", out)


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
    report = csv_lib.convert(csv_path, image_dir, out, num_shards=2,
                                     num_workers=1)
    assert label_maps.read_class_names(out) == ["cat", "dog", "person"]
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
    report = csv_lib.convert(csv_path, image_dir, str(tmp_path / "a"),
                                     classes=",".join(classes), split="val",
                                     num_shards=1, num_workers=1)
    assert report["split"] == "val"
    assert read_split(str(tmp_path / "a"), "val")["sub/a.jpg"][0] == [0, 1]
    # A labels.txt-style file, and a CSV without header.
    labels = tmp_path / "my_labels.txt"
    labels.write_text("\n".join(classes) + "\n")
    no_header = tmp_path / "no_header.csv"
    no_header.write_text("c.png,cat\nsub/a.jpg,bird\n")
    csv_lib.convert(str(no_header), image_dir, str(tmp_path / "b"),
                            classes=str(labels), num_shards=1, num_workers=1)
    assert read_split(str(tmp_path / "b"), "train") == {
        "c.png": ([2], [], (H, W, 3)), "sub/a.jpg": ([3], [], (H, W, 3))}
    assert label_maps.read_class_names(str(tmp_path / "b")) == classes


def test_csv_bad_inputs(tmp_path, csv_data):
    csv_path, image_dir = csv_data
    out = str(tmp_path / "out")
    with pytest.raises(ValueError) as info:
        csv_lib.convert(csv_path, image_dir, out, classes="cat,dog")
    message = str(info.value)
    assert "'person'" in message and csv_path in message
    assert "line 2" in message
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="does not exist") as info:
        csv_lib.convert(missing, image_dir, out)
    assert missing in str(info.value)
    with pytest.raises(ValueError, match="is not a directory"):
        csv_lib.convert(csv_path, str(tmp_path / "x"), out)
    bad = tmp_path / "bad.csv"
    for text, match in [("a.jpg;cat\n", "line 1: expected 2 columns"),
                        ("a.jpg,cat\nb.jpg,\na.jpg,dog\n",
                         "line 3: a.jpg already listed on line 1"),
                        ("/abs/a.jpg,cat\n", "relative to image_dir")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            csv_lib.convert(str(bad), image_dir, out)
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
    assert len(shard_sets.find_shards(schema.split_file_pattern(out, "train"))) == 2


def test_coco_script_fails_cleanly(tmp_path):
    missing = str(tmp_path / "instances_val2014.json")
    result = _run("pipelines.coco_to_tfrecord", f"--annotations={missing}",
                  f"--image_dir={tmp_path}", f"--output_dir={tmp_path}/out")
    assert result.returncode == 1
    assert f"error: annotations file {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------
# Malformed COCO files (issue 13 items 10, 18): one error naming the entry.
# ----------------------------------------------------------------------------

def _mutate(data, kind):
    """Returns the JSON text of the fixture's COCO file with one fault."""
    images, categories = data["images"], data["categories"]
    annotations = data["annotations"]
    literal = None
    if kind == "duplicate_image_id":
        images.append({"id": 1, "file_name": "other.jpg"})
    elif kind in ("image_id_float", "image_id_string", "image_id_bool"):
        images[1]["id"] = {"image_id_float": 1.7, "image_id_string": "3",
                           "image_id_bool": True}[kind]
    elif kind == "annotation_image_id_float":
        annotations[0]["image_id"] = 1.7
    elif kind == "duplicate_category_id":
        categories.append({"id": 18, "name": "cat"})
    elif kind.startswith("category_name_"):
        categories[1]["name"] = {"category_name_null": None,
                                 "category_name_empty": " ",
                                 "category_name_number": 5,
                                 "category_name_u2028": "per\u2028son"}[kind]
    elif kind == "duplicate_category_name":
        categories[2]["name"] = "person"
    elif kind in ("iscrowd_no", "iscrowd_2", "iscrowd_true"):
        annotations[3]["iscrowd"] = {"iscrowd_no": "no", "iscrowd_2": 2,
                                     "iscrowd_true": True}[kind]
    elif kind in ("id_1e400", "id_infinity", "id_nan"):
        images[0]["id"] = 123456789
        literal = {"id_1e400": "1e400", "id_infinity": "Infinity",
                   "id_nan": "NaN"}[kind]
    elif kind == "file_name_null":
        images[0]["file_name"] = None
    text = json.dumps(data)
    return text.replace("123456789", literal) if literal else text


@pytest.mark.parametrize("kind,match", [
    ("duplicate_image_id", r"images\[6\] \(id 1\): id 1 is also the id of "
                           r"images\[1\] \(id 1\)"),
    ("image_id_float", r"images\[1\] 'id' must be an integer, got 1.7"),
    ("image_id_string", r"images\[1\] 'id' must be an integer, got '3'"),
    ("image_id_bool", r"images\[1\] 'id' must be an integer, got True"),
    ("annotation_image_id_float",
     r"annotations\[0\] \(id 10\) 'image_id' must be an integer, got 1.7"),
    ("duplicate_category_id",
     r"categories\[3\] \(id 18\): id 18 is also the id of categories\[2\]"),
    ("category_name_null", r"categories\[1\] \(id 1\): name None is not a "
                           r"string"),
    ("category_name_empty", r"categories\[1\] \(id 1\): name ' ' is empty"),
    ("category_name_number", r"categories\[1\] \(id 1\): name 5 is not a "
                             r"string"),
    ("category_name_u2028", r"categories\[1\] \(id 1\): .*line break"),
    ("duplicate_category_name", r"categories\[2\] \(id 18\): name 'person' "
                                r"is also the name of categories\[1\]"),
    ("iscrowd_no", r"annotations\[3\] \(id 13\): 'iscrowd' must be 0 or 1, "
                   r"got 'no'"),
    ("iscrowd_2", r"'iscrowd' must be 0 or 1, got 2"),
    ("iscrowd_true", r"'iscrowd' must be 0 or 1, got True"),
    ("id_1e400", r"images\[0\] 'id' must be an integer, got inf"),
    ("id_infinity", r"images\[0\] 'id' must be an integer, got inf"),
    ("id_nan", r"images\[0\] 'id' must be an integer, got nan"),
    ("file_name_null", r"images\[0\] \(id 5\): 'file_name' must be a "
                       r"non-empty string, got None"),
])
def test_coco_malformed_entries_are_one_error(tmp_path, coco, kind, match):
    annotations_file, image_dir = coco
    text = _mutate(read_json(annotations_file), kind)
    with open(annotations_file, "w") as f:
        f.write(text)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=match) as info:
        coco_lib.convert(annotations_file, image_dir, out,
                                 num_workers=1)
    assert f"annotations file {annotations_file}: " in str(info.value)
    assert not os.path.exists(out)


def test_coco_deeply_nested_json_is_one_error(tmp_path, coco):
    annotations_file, image_dir = coco
    with open(annotations_file, "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply") as info:
        coco_lib.convert(annotations_file, image_dir,
                                 str(tmp_path / "out"), num_workers=1)
    assert annotations_file in str(info.value)


# ----------------------------------------------------------------------------
# Image paths (issue 13 items 15, 17): inside image_dir, each file once.
# ----------------------------------------------------------------------------

def _rewrite_file_name(annotations_file, image_index, file_name):
    data = read_json(annotations_file)
    data["images"][image_index]["file_name"] = file_name
    with open(annotations_file, "w") as f:
        json.dump(data, f)


def test_coco_paths_must_stay_inside_image_dir(tmp_path, coco, photos):
    annotations_file, image_dir = coco
    outside = str(tmp_path / "outside.jpg")
    photos[0].save(outside)
    out = str(tmp_path / "out")
    # images[1] is image 1 (labelled): an absolute name, then a ../ name.
    _rewrite_file_name(annotations_file, 1, outside)
    with pytest.raises(ValueError, match=r"images\[1\] \(id 1.*must be "
                                         r"relative to image_dir"):
        coco_lib.convert(annotations_file, image_dir, out,
                                 num_workers=1)
    _rewrite_file_name(annotations_file, 1, "../outside.jpg")
    with pytest.raises(ValueError, match=r"images\[1\] \(id 1.*outside "
                                         r"image_dir"):
        coco_lib.convert(annotations_file, image_dir, out,
                                 num_workers=1)
    assert not os.path.exists(out)
    report = coco_lib.convert(annotations_file, image_dir, out,
                                      num_shards=1, num_workers=1,
                                      allow_paths_outside_image_dir=True)
    assert read_split(out, "val2014")["../outside.jpg"][0] == [0, 1]
    assert report["num_records"] == 3


def test_coco_two_names_of_one_file_are_one_error(tmp_path, coco):
    annotations_file, image_dir = coco
    _rewrite_file_name(annotations_file, 2, "./COCO_val2014_1.jpg")
    with pytest.raises(ValueError, match=r"images\[2\] \(id 2.*is the same "
                                         r"file .* as .*images\[1\] \(id 1"):
        coco_lib.convert(annotations_file, image_dir,
                                 str(tmp_path / "out"), num_workers=1)


def test_csv_paths_must_stay_inside_image_dir(tmp_path, csv_data, photos):
    csv_path, image_dir = csv_data
    photos[0].save(str(tmp_path / "secret.jpg"))
    os.symlink(str(tmp_path / "secret.jpg"), os.path.join(image_dir,
                                                          "link.jpg"))
    out = str(tmp_path / "out")
    bad = tmp_path / "bad.csv"
    escape = "../" * 40 + "etc/passwd"
    for row, match in [(f"{escape},cat", f"line 2: {escape} resolves to "
                        "/etc/passwd, outside image_dir"),
                       ("../secret.jpg,cat", "line 2: ../secret.jpg resolves"),
                       ("link.jpg,cat", "line 2: link.jpg resolves to "
                        f"{tmp_path / 'secret.jpg'}, outside image_dir")]:
        bad.write_text("b.jpg,dog\n" + row + "\n")
        with pytest.raises(ValueError, match=match):
            csv_lib.convert(str(bad), image_dir, out, num_workers=1)
    assert not os.path.exists(out)
    report = csv_lib.convert(str(bad), image_dir, out, num_shards=1,
                                     num_workers=1,
                                     allow_paths_outside_image_dir=True)
    assert read_split(out, "train")["link.jpg"][0] == [0]
    assert report["num_records"] == 2


@pytest.mark.parametrize("second", ["./b.jpg", "sub/../b.jpg", "b_link.jpg"])
def test_csv_two_names_of_one_file_are_one_error(tmp_path, csv_data, second):
    csv_path, image_dir = csv_data
    os.symlink("b.jpg", os.path.join(image_dir, "b_link.jpg"))
    bad = tmp_path / "bad.csv"
    bad.write_text(f"b.jpg,dog\nc.png,cat\n{second},cat\n")
    with pytest.raises(ValueError, match=(
            f"line 3: {re.escape(second)} is the same file .* as "
            f"{re.escape(str(bad))}, line 1")):
        csv_lib.convert(str(bad), image_dir, str(tmp_path / "out"),
                                num_workers=1)


def test_voc_ids_and_paths_are_checked(tmp_path, voc, photos):
    out = str(tmp_path / "out")
    split_file = os.path.join(voc, "ImageSets", "Main", "test.txt")
    for text, match in [("000003\n../../x\n", r"line 2: image id '\.\./\.\./x'"
                         " is not a plain file name"),
                        ("000003\n000003\n", "line 2: image id 000003 already "
                         "listed on line 1")]:
        with open(split_file, "w") as f:
            f.write(text)
        with pytest.raises(ValueError, match=match):
            voc_lib.convert(voc, "test", out, num_workers=1)
    photos[0].save(str(tmp_path / "elsewhere.jpg"))
    image = os.path.join(voc, "JPEGImages", "000003.jpg")
    os.remove(image)
    os.symlink(str(tmp_path / "elsewhere.jpg"), image)
    with open(split_file, "w") as f:
        f.write("000003\n")
    with pytest.raises(ValueError, match="line 1: 000003.jpg resolves to .*"
                                         "elsewhere.jpg, outside image_dir"):
        voc_lib.convert(voc, "test", out, num_workers=1)
    assert not os.path.exists(out)
    report = voc_lib.convert(voc, "test", out, num_shards=1,
                                     num_workers=1,
                                     allow_paths_outside_image_dir=True)
    assert report["num_records"] == 1


def test_csv_special_files_are_counted_skips(tmp_path, csv_data):
    csv_path, image_dir = csv_data
    os.mkfifo(os.path.join(image_dir, "pipe.jpg"))
    os.mkdir(os.path.join(image_dir, "folder.jpg"))
    os.symlink("/dev/zero", os.path.join(image_dir, "zero.jpg"))
    listing = tmp_path / "special.csv"
    listing.write_text("b.jpg,dog\npipe.jpg,cat\nfolder.jpg,cat\n"
                       "zero.jpg,cat\n")
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="zero.jpg resolves to /dev/zero"):
        csv_lib.convert(str(listing), image_dir, out, num_workers=1)
    report = csv_lib.convert(str(listing), image_dir, out,
                                     num_shards=1, num_workers=1,
                                     allow_paths_outside_image_dir=True)
    assert report["num_records"] == 1
    assert {s["filename"]: s["reason"] for s in report["skipped"]} == {
        "pipe.jpg": "not a regular file (a FIFO)",
        "folder.jpg": "not a regular file (a directory)",
        "zero.jpg": "not a regular file (a character device)"}


# ----------------------------------------------------------------------------
# Malformed CSV files (issue 13 items 5, 18).
# ----------------------------------------------------------------------------

def test_csv_malformed_text_is_one_error(tmp_path, csv_data):
    csv_path, image_dir = csv_data
    bad = tmp_path / "bad.csv"
    out = str(tmp_path / "out")
    bad.write_text("b.jpg,dog\n" + "x" * 200_000 + ".jpg,cat\nc.png,cat\n")
    with pytest.raises(ValueError, match=r"bad.csv, line 2: field larger "
                                         r"than field limit"):
        csv_lib.convert(str(bad), image_dir, out, num_workers=1)
    bad.write_text('b.jpg,dog\nc.png,"cat|do\rg"\n')
    with pytest.raises(ValueError, match=r"line 2: label 'do\\rg' contains a "
                                         "line break"):
        csv_lib.convert(str(bad), image_dir, out, num_workers=1)
    bad.write_bytes(b"b.jpg,dog\nc.png,caf\xe9\n")
    with pytest.raises(ValueError, match="is not UTF-8"):
        csv_lib.convert(str(bad), image_dir, out, num_workers=1)
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------
# The entry points: progress, one error line, a killed worker.
# ----------------------------------------------------------------------------

def test_csv_script_fails_cleanly_on_unusable_output(tmp_path, csv_data):
    csv_path, image_dir = csv_data
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "file" / "out")
    result = _run("pipelines.csv_to_tfrecord", f"--csv={csv_path}",
                  f"--image_dir={image_dir}", f"--output_dir={out}")
    assert result.returncode == 1
    assert f"error: cannot create output_dir {out}: Not a directory" in (
        result.stderr)
    assert "Traceback" not in result.stderr


def _children(pid):
    """Pids of the processes whose parent is `pid` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_killed_worker_fails_the_conversion(tmp_path, photos):
    image_dir = str(tmp_path / "images")
    names = [f"{i:03d}.jpg" for i in range(400)]
    # 640x480: each worker is busy for a second or so with its images.
    make_images(image_dir, [p.resize((640, 480)) for p in photos], names)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("".join(f"{name},cat\n" for name in names))
    out = str(tmp_path / "out")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.csv_to_tfrecord",
         f"--csv={csv_path}", f"--image_dir={image_dir}",
         f"--output_dir={out}", "--num_workers=2", "--num_shards=2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        # Kill a worker once shards are being written (a worker may then
        # hold a task: multiprocessing.Pool would wait for it forever).
        deadline = time.monotonic() + 60
        victim = None
        while victim is None and time.monotonic() < deadline:
            writing = os.path.isdir(out) and any(
                ".tmp-" in name for name in os.listdir(out))
            workers = [p for p in _children(proc.pid)
                       if "spawn_main" in _cmdline(p)]
            victim = workers[0] if workers and writing else None
            time.sleep(0.01)
        assert victim is not None, "no worker process appeared"
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail("the conversion hung after a worker was killed")
    assert proc.returncode == 1, stderr
    assert "error: a worker process died" in stderr
    assert "Traceback" not in stderr
    assert [n for n in os.listdir(out) if not n.startswith(".")] == []

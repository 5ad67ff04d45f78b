"""TensorFlow Datasets as a source (pipelines.tfds_source), offline.

Two kinds of test:

* Against our own converters. A tiny VOC2007 tree and a tiny COCO 2014
  layout of real photos (scikit-learn's sample images) are written to tmp;
  our converter turns them into TFRecords, and TFDS's own `voc/2007` and
  `coco/2014` builders prepare real TFDS datasets from the very same files
  (their download step is patched to return the tmp folder, nothing else is
  faked). Both paths must give the same bytes and labels for every image.
* `tfds.testing.mock_data` with hand-written examples, for the label rules
  (difficult classes, dropped unlabelled images, single-label datasets).
"""

import json
import os
from unittest import mock

import numpy as np
from PIL import Image
import pytest
from sklearn.datasets import load_sample_images
import tensorflow as tf

from pipelines.converters import coco_lib
from pipelines.converters import voc_lib
from pipelines.records import label_maps
from pipelines.records import schema
from pipelines.records import shard_sets
from pipelines.tfdata import tfds_source

tfds = pytest.importorskip("tensorflow_datasets")  # the tfds extra

# The record contract: what input_pipeline parses out of one of our tf.Examples.
RECORD_SPEC = {
    "image_bytes": tf.TensorSpec([], tf.string),
    "filename": tf.TensorSpec([], tf.string),
    "label_ids": tf.TensorSpec([None], tf.int64),
    "difficult_ids": tf.TensorSpec([None], tf.int64),
}

# id -> [(class, difficult), ...]; covers: a class whose objects are all
# difficult, a mixed class, an image with only difficult objects, repeats.
VOC_OBJECTS = {
    "000001": [("dog", 0), ("person", 1)],
    "000002": [("cat", 1), ("cat", 0)],
    "000003": [("car", 1)],
    "000004": [("bird", 0), ("bird", 0), ("chair", 1), ("chair", 1), ("tvmonitor", 0)],
    "000005": [("aeroplane", 0)],
}
VOC_SETS = {"train": ["000001", "000002", "000003"], "val": ["000004", "000005"],
            "trainval": list(VOC_OBJECTS), "test": ["000001", "000004"]}
# COCO's 80 category ids (1..90 without the 10 unused ones), in id order as in
# the official instances_*2014.json.
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def _photos(n, size=(48, 40)):
    china, flower = load_sample_images().images
    out = []
    for i in range(n):
        photo = (china, flower)[i % 2]
        top, left = 37 * i, 53 * i  # a different crop for every image
        out.append(Image.fromarray(photo[top:top + 200, left:left + 240]).resize(size))
    return out


def _write_voc(root):
    voc = os.path.join(root, "VOCdevkit", "VOC2007")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, sub), exist_ok=True)
    for photo, (image_id, objects) in zip(_photos(len(VOC_OBJECTS)), VOC_OBJECTS.items()):
        photo.save(os.path.join(voc, "JPEGImages", image_id + ".jpg"), quality=90)
        xml = "".join(
            f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>2</xmin><ymin>3</ymin>"
            "<xmax>20</xmax><ymax>30</ymax></bndbox></object>"
            for name, difficult in objects)
        with open(os.path.join(voc, "Annotations", image_id + ".xml"), "w") as f:
            f.write(f"<annotation><size><width>48</width><height>40</height>"
                    f"<depth>3</depth></size>{xml}</annotation>")
    for name, ids in VOC_SETS.items():
        with open(os.path.join(voc, "ImageSets", "Main", name + ".txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return voc


def _write_coco(root):
    """train2014: 4 images (one without annotations), val2014: 2 images."""
    categories = [{"id": i, "name": f"class{i}", "supercategory": "x"} for i in COCO_IDS]
    # image id -> category ids of its annotations ([] = unannotated; 1 crowd).
    splits = {"train2014": {11: [1, 90, 1], 12: [], 13: [5], 14: [44, 2, 44]},
              "val2014": {21: [3], 22: [90, 88]}}
    photos = iter(_photos(8))
    os.makedirs(os.path.join(root, "annotations"))
    for split, images in splits.items():
        os.makedirs(os.path.join(root, split))
        data = {"images": [], "annotations": [], "categories": categories}
        for image_id, category_ids in images.items():
            file_name = f"COCO_{split}_{image_id:012d}.jpg"
            next(photos).save(os.path.join(root, split, file_name), quality=90)
            data["images"].append({"id": image_id, "file_name": file_name,
                                   "height": 40, "width": 48})
            for k, category_id in enumerate(category_ids):
                data["annotations"].append({
                    "id": 100 * image_id + k, "image_id": image_id,
                    "category_id": category_id, "iscrowd": int(k == 2),
                    "bbox": [1.0, 2.0, 10.0, 12.0], "area": 120.0})
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(data, f)
    for test in ("test2014", "test2015"):  # TFDS builds these splits too
        os.makedirs(os.path.join(root, test))
        file_name = f"COCO_{test}_000000000001.jpg"
        next(photos).save(os.path.join(root, test, file_name), quality=90)
        with open(os.path.join(root, "annotations", f"image_info_{test}.json"), "w") as f:
            json.dump({"images": [{"id": 1, "file_name": file_name, "height": 40,
                                   "width": 48}], "categories": categories}, f)
    return root


def _prepare_with_tfds(name, source_dir, data_dir):
    """Runs TFDS's real builder on a local folder instead of its download."""
    def local_files(unused_manager, urls, *unused_args, **unused_kwargs):
        return {key: source_dir for key in urls}

    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract",
                           local_files):
        tfds.builder(name, data_dir=data_dir).download_and_prepare()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Both datasets, written once: TFDS data_dir and our converters' output."""
    root = tmp_path_factory.mktemp("tfds")
    voc_src, coco_src = str(root / "voc_src"), str(root / "coco_src")
    voc_dir = _write_voc(voc_src)
    _write_coco(coco_src)
    data_dir = str(root / "tfds_data")
    _prepare_with_tfds("voc/2007", voc_src, data_dir)
    _prepare_with_tfds("coco/2014", coco_src, data_dir)
    ours = str(root / "ours")
    voc_report = voc_lib.convert(voc_dir, "trainval", os.path.join(ours, "voc"),
                                         num_shards=1, num_workers=1)
    coco_report = coco_lib.convert(
        os.path.join(coco_src, "annotations", "instances_train2014.json"),
        os.path.join(coco_src, "train2014"), os.path.join(ours, "coco"),
        num_shards=1, num_workers=1)
    return {"data_dir": data_dir, "voc": os.path.join(ours, "voc"), "voc_report": voc_report,
            "coco": os.path.join(ours, "coco"), "coco_report": coco_report}


def _ours(output_dir, split):
    """filename -> (bytes, label ids, difficult ids) from our TFRecords."""
    files = shard_sets.find_shards(schema.split_file_pattern(output_dir, split))
    out = {}
    for raw in tf.data.TFRecordDataset(files):
        ex = tf.io.parse_single_example(raw, schema.FEATURE_SPEC)
        out[ex[schema.FILENAME_KEY].numpy().decode()] = (
            ex[schema.ENCODED_KEY].numpy(),
            tf.sparse.to_dense(ex[schema.LABEL_KEY]).numpy().tolist(),
            tf.sparse.to_dense(ex[schema.DIFFICULT_KEY]).numpy().tolist())
    return out


def _theirs(dataset):
    return {r["filename"].numpy().decode(): (r["image_bytes"].numpy(),
                                              r["label_ids"].numpy().tolist(),
                                              r["difficult_ids"].numpy().tolist())
            for r in dataset}


def test_voc_through_tfds_equals_our_converter(prepared):
    split = tfds_source.open_split("tfds:voc/2007:trainval", data_dir=prepared["data_dir"])
    assert split.split == "train+validation" and split.layout == "labels"
    assert split.class_names == list(voc_lib.VOC_CLASSES)
    assert split.class_names == label_maps.read_class_names(prepared["voc"])
    ds = split.records()
    assert ds.element_spec == RECORD_SPEC
    ours, theirs = _ours(prepared["voc"], "trainval"), _theirs(ds)
    assert theirs == ours  # same bytes, labels and difficult classes per image
    names = voc_lib.VOC_CLASSES
    assert theirs["000001.jpg"][1:] == ([names.index("dog"), names.index("person")],
                                        [names.index("person")])
    assert theirs["000003.jpg"][1:] == ([names.index("car")], [names.index("car")])
    assert theirs["000002.jpg"][2] == []  # one cat is not difficult
    assert split.count() == {"num_records": 5, "num_dropped": 0}
    test = tfds_source.open_split("tfds:voc/2007:test", data_dir=prepared["data_dir"])
    assert sorted(_theirs(test.records())) == ["000001.jpg", "000004.jpg"]


def test_coco_through_tfds_equals_our_converter(prepared):
    split = tfds_source.open_split("tfds:coco/2014:train", data_dir=prepared["data_dir"])
    assert split.layout == "objects" and split.drops_unlabelled
    # TFDS's class order (the file's) is the category-id order of our converter.
    assert split.class_names == label_maps.read_class_names(prepared["coco"])
    assert split.class_names == [f"class{i}" for i in COCO_IDS]
    ds = split.records()
    assert ds.element_spec == RECORD_SPEC
    ours, theirs = _ours(prepared["coco"], "train2014"), _theirs(ds)
    assert theirs == ours
    assert sorted(theirs) == ["COCO_train2014_000000000011.jpg",
                              "COCO_train2014_000000000013.jpg",
                              "COCO_train2014_000000000014.jpg"]
    assert theirs["COCO_train2014_000000000014.jpg"][1] == [COCO_IDS.index(2),
                                                            COCO_IDS.index(44)]
    # The unannotated image is dropped and counted, as by our converter.
    assert split.count() == {"num_records": 3, "num_dropped": 1}
    assert prepared["coco_report"]["dropped_unannotated"] == 1
    val = tfds_source.open_split("tfds:coco/2014:validation", data_dir=prepared["data_dir"])
    assert val.count() == {"num_records": 2, "num_dropped": 0}


def test_distributed_reading_splits_every_record_once(prepared):
    split = tfds_source.open_split("tfds:voc/2007:trainval", data_dir=prepared["data_dir"])
    everything = sorted(_theirs(split.records()))
    seen = []
    for i in range(2):  # 2 pipelines; train has 1 file: every 2nd record each
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i)
        seen += list(_theirs(split.records(shuffle_files=True, seed=3,
                                           input_context=context)))
    assert sorted(seen) == everything


def test_spelling_and_errors(prepared, tmp_path, monkeypatch):
    assert tfds_source.is_tfds("tfds:voc/2007:test")
    assert not tfds_source.is_tfds("data/voc2007/test-*.tfrecord")
    assert tfds_source.parse("tfds:coco/2014:1.1.0:train[:10%]+validation") == (
        "coco/2014:1.1.0", "train[:10%]+validation")
    assert tfds_source.parse("tfds:mnist:test") == ("mnist", "test")
    for bad in ("tfds:voc/2007", "tfds::train", "tfds:voc/2007:"):
        with pytest.raises(ValueError, match="tfds:NAME:SPLIT"):
            tfds_source.parse(bad)
    with pytest.raises(ValueError, match="TFDS has no dataset 'no_such_set'"):
        tfds_source.open_split("tfds:no_such_set:train", data_dir=str(tmp_path))
    # Not prepared: nothing is downloaded, the message gives the command.
    with pytest.raises(ValueError) as e:
        tfds_source.open_split("tfds:voc/2007:test", data_dir=str(tmp_path))
    assert ("prepare it once with python -c \"import tensorflow_datasets as tfds; "
            f"tfds.builder('voc/2007', data_dir='{tmp_path}').download_and_prepare()\""
            in str(e.value))
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match=r"unknown split 'tset'.*test, train, validation"):
        tfds_source.open_split("tfds:voc/2007:tset", data_dir=prepared["data_dir"])
    monkeypatch.setattr(tfds_source, "tfds", None)
    with pytest.raises(ImportError, match=r"pip install 'mlcrl_tf\[tfds\]'"):
        tfds_source.open_split("tfds:voc/2007:test")


# ---------------------------------------------------------------------------
# tfds.testing.mock_data: the label rules on hand-written examples.
# ---------------------------------------------------------------------------

def _examples_fn(examples, signature):
    """as_dataset_fn for mock_data: the given examples (as TFDS would decode them)."""
    def as_dataset(unused_builder, *unused_args, **unused_kwargs):
        return tf.data.Dataset.from_generator(lambda: iter(examples),
                                              output_signature=signature)
    return as_dataset


def test_mock_voc_difficult_rule():
    examples = [  # labels, labels_no_difficult -> difficult = the difference
        {"image": b"jpeg-0", "image/filename": "a.jpg", "labels": [0, 5, 9],
         "labels_no_difficult": [5]},
        {"image": b"jpeg-1", "image/filename": "b.jpg", "labels": [2],
         "labels_no_difficult": [2]},
        {"image": b"jpeg-2", "image/filename": "c.jpg", "labels": [3],
         "labels_no_difficult": []},
    ]
    signature = {"image": tf.TensorSpec([], tf.string),
                 "image/filename": tf.TensorSpec([], tf.string),
                 "labels": tf.TensorSpec([None], tf.int64),
                 "labels_no_difficult": tf.TensorSpec([None], tf.int64)}
    with tfds.testing.mock_data(as_dataset_fn=_examples_fn(examples, signature)):
        # Under mock_data nothing is prepared and download_and_prepare is a no-op.
        split = tfds_source.open_split("tfds:voc/2007:train", download=True)
        records = [(r["filename"].numpy(), r["image_bytes"].numpy(),
                    r["label_ids"].numpy().tolist(), r["difficult_ids"].numpy().tolist())
                   for r in split.records()]
        counts = split.count()
    assert records == [(b"a.jpg", b"jpeg-0", [0, 5, 9], [0, 9]),
                       (b"b.jpg", b"jpeg-1", [2], []),
                       (b"c.jpg", b"jpeg-2", [3], [3])]
    assert counts == {"num_records": 3, "num_dropped": 0}
    assert split.class_names == list(voc_lib.VOC_CLASSES)


def test_mock_coco_labels_from_objects_and_dropped_images():
    examples = [{"image": f"jpeg-{i}".encode(), "image/filename": f"{i}.jpg",
                 "objects": {"label": np.array(labels, np.int64)}}
                for i, labels in enumerate([[3, 3, 1], [], [7, 2], [79]])]
    signature = {"image": tf.TensorSpec([], tf.string),
                 "image/filename": tf.TensorSpec([], tf.string),
                 "objects": {"label": tf.TensorSpec([None], tf.int64)}}
    with tfds.testing.mock_data(as_dataset_fn=_examples_fn(examples, signature)):
        split = tfds_source.open_split("tfds:coco/2014:train", download=True)
        ds = split.records()
        records = [(r["filename"].numpy().decode(), r["label_ids"].numpy().tolist(),
                    r["difficult_ids"].numpy().tolist()) for r in ds]
        counts = split.count()
    assert ds.element_spec == RECORD_SPEC
    assert len(split.class_names) == 80
    assert records == [("0.jpg", [1, 3], []), ("2.jpg", [2, 7], []), ("3.jpg", [79], [])]
    assert counts == {"num_records": 3, "num_dropped": 1}


def test_mock_single_label_dataset_uses_tfds_ids():
    with tfds.testing.mock_data(num_examples=3):
        split = tfds_source.open_split("tfds:mnist:test", download=True)
        records = list(split.records())
    assert split.layout == "label" and len(split.class_names) == 10
    for i, r in enumerate(records):
        assert r["label_ids"].shape == (1,) and 0 <= int(r["label_ids"][0]) < 10
        assert r["filename"].numpy().decode().endswith(f"__{i}")  # tfds_id
        assert r["image_bytes"].dtype == tf.string


def test_tfds_source_through_the_input_pipeline(prepared):
    """make_dataset / make_record_dataset read a tfds: source like shards."""
    from pipelines.tfdata import input_pipeline  # pylint: disable=import-outside-toplevel
    from pipelines.tfdata import skip_counts  # pylint: disable=import-outside-toplevel
    source, data_dir = "tfds:voc/2007:trainval", prepared["data_dir"]
    counter = skip_counts.SkipCounter()
    ds = input_pipeline.make_dataset(source, batch_size=2, image_size=32, num_classes=20,
                                     training=False, data_dir=data_dir,
                                     skip_counter=counter)
    labels = {}
    for batch in ds:
        assert batch["images"].shape[1:] == (32, 32, 3)
        for name, row in zip(batch["filename"].numpy(), batch["labels"].numpy()):
            labels[name.decode()] = np.flatnonzero(row).tolist()
    ours = _ours(prepared["voc"], "trainval")
    assert labels == {name: sorted(ids) for name, (_, ids, _) in ours.items()}
    assert counter.delivered == 5 and counter.skipped == 0
    train = input_pipeline.make_dataset(source, batch_size=2, image_size=32, num_classes=20,
                                        training=True, data_dir=data_dir, seed=0)
    for batch in train.take(6):  # 12 images: more than two passes over 5 records
        assert batch["images"].shape == (2, 32, 32, 3)
    records = input_pipeline.make_record_dataset(source, batch_size=2, num_classes=20,
                                                 data_dir=data_dir)
    assert sum(int(b["labels"].shape[0]) for b in records) == 5


def test_training_and_evaluation_on_a_tfds_source(prepared, tmp_path):
    from mlcrl_tf.run_dir import config as config_lib  # pylint: disable=import-outside-toplevel
    from mlcrl_tf.training import train_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.Config(
        model_dir=str(tmp_path / "run"), train_files="tfds:voc/2007:trainval",
        eval_files="tfds:voc/2007:test", data_dir=prepared["data_dir"],
        backbone="small_cnn", backbone_weights=None, image_size=32, batch_size=2,
        epochs=1, steps_per_epoch=2, lr_decay_epochs=(), num_summary_images=0)
    result = train_lib.train_and_evaluate(config)
    assert result["step"] == 2
    assert np.isfinite(result["metrics"]["mAP"])

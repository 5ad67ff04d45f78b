"""Tests of the "outfits" demo set (pipelines.demo.outfits, CLI pipelines.demo_dataset)
and of the Fashion-MNIST reader it is built from, on the real Fashion-MNIST files.

The round trip goes through the real COCO converter and `make_dataset`."""

import gzip
import http.client
import io
import json
import os
import shutil

import numpy as np
import pytest

from pipelines.demo import fashion_mnist
from pipelines.demo import outfits
from pipelines.records import label_maps
from pipelines.records import schema
from pipelines.tfdata import input_pipeline

NUM_TRAIN, NUM_TEST = 40, 20


def _generate(root, name, **kwargs):
    output_dir = os.path.join(root, name)
    outfits.generate(output_dir, num_train=NUM_TRAIN, num_test=NUM_TEST,
                          num_workers=1, **kwargs)
    return output_dir


@pytest.fixture(scope="module")
def demo_sets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo_sets"))
    return {
        "seed0": _generate(root, "seed0", seed=0),
        "seed0_again": _generate(root, "seed0_again", seed=0),
        "seed1": _generate(root, "seed1", seed=1),
        "occluded": _generate(root, "occluded", seed=0, occlusion=True),
    }


@pytest.fixture(scope="module")
def sources():
    return {split: fashion_mnist.load_fashion_mnist(split)
            for split in ("train", "test")}


def _coco(output_dir, split):
    with open(os.path.join(output_dir, "annotations",
                           f"instances_{split}.json"), encoding="utf-8") as f:
        return json.load(f)


def _label_sets(coco):
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    labels = {name: set() for name in names.values()}
    for a in coco["annotations"]:
        labels[names[a["image_id"]]].add(a["category_id"] - 1)
    return labels


def _files(output_dir):
    """Relative path -> bytes of every image, annotation and shard file."""
    out = {}
    for sub in ("images", "annotations", "tfrecords"):
        for dirpath, _, filenames in os.walk(os.path.join(output_dir, sub)):
            for name in filenames:
                if name.endswith("_report.json"):  # holds absolute paths
                    continue
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    out[os.path.relpath(path, output_dir)] = f.read()
    return out


# --------------------------------------------------------------------------
# Round trip, splits, determinism.
# --------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "test"])
def test_tfrecords_carry_the_coco_labels(demo_sets, split):
    output_dir = demo_sets["seed0"]
    expected = _label_sets(_coco(output_dir, split))
    assert len(expected) == (NUM_TRAIN if split == "train" else NUM_TEST)
    ds = input_pipeline.make_dataset(
        schema.split_file_pattern(os.path.join(output_dir, "tfrecords"),
                                        split),
        batch_size=7, image_size=96, num_classes=10,
        training=False)
    got = {}
    for batch in ds.as_numpy_iterator():
        assert batch["images"].shape[1:] == (96, 96, 3)
        for name, labels in zip(batch["filename"], batch["labels"]):
            got[name.decode()] = set(np.flatnonzero(labels).tolist())
    assert got == expected
    assert label_maps.read_class_names(
        os.path.join(output_dir, "tfrecords")) == list(fashion_mnist.CLASS_NAMES)


def test_coco_format(demo_sets):
    coco = _coco(demo_sets["seed0"], "train")
    assert [(c["id"], c["name"]) for c in coco["categories"]] == list(
        enumerate(fashion_mnist.CLASS_NAMES, start=1))
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and a["area"] > 0
        assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96
    cardinality = [len(v) for v in _label_sets(coco).values()]
    assert 1 <= min(cardinality) and max(cardinality) <= 4
    assert np.mean(cardinality) > 2


@pytest.mark.parametrize("split", ["train", "test"])
def test_items_come_from_their_own_official_split(demo_sets, sources, split):
    labels = sources[split][1]
    for a in _coco(demo_sets["seed0"], split)["annotations"]:
        assert a["source_split"] == split
        assert labels[a["source_index"]] == a["category_id"] - 1


def test_pixels_are_the_source_items(demo_sets, sources):
    """A fully visible item's silhouette in the JPEG matches its source."""
    output_dir = demo_sets["seed0"]
    from PIL import Image  # pylint: disable=import-outside-toplevel
    checked = 0
    coco = _coco(output_dir, "test")
    files = {image["id"]: image["file_name"] for image in coco["images"]}
    for a in coco["annotations"]:
        if a["visible_fraction"] < 1:
            continue
        canvas = np.asarray(Image.open(os.path.join(
            output_dir, "images", "test", files[a["image_id"]])), np.float32)
        x, y, side, _ = a["item_box"]
        gray, alpha = outfits.render_item(
            sources["test"][0][a["source_index"]], side)
        patch = canvas[y:y + side, x:x + side].mean(-1)
        inside = alpha > 0.99
        # Tinting scales brightness per channel: the correlation stays high.
        assert np.corrcoef(patch[inside], gray[inside])[0, 1] > 0.8
        checked += 1
    assert checked > 10


def test_same_seed_same_bytes_other_seed_other_bytes(demo_sets):
    first = _files(demo_sets["seed0"])
    assert any(k.endswith(".tfrecord") for k in first)
    assert first == _files(demo_sets["seed0_again"])
    other = _files(demo_sets["seed1"])
    assert first.keys() == other.keys()
    different = [k for k in first if first[k] != other[k]]
    assert any(k.endswith(".jpg") for k in different)
    assert "annotations/instances_train.json" in different


def test_refuses_to_overwrite(demo_sets):
    with pytest.raises(ValueError, match="overwrite"):
        outfits.generate(demo_sets["seed0"], num_train=2, num_test=2)


def test_preview(demo_sets, tmp_path):
    path = str(tmp_path / "preview.png")
    outfits.write_preview(demo_sets["seed0"], path, num=4, columns=2)
    from PIL import Image  # pylint: disable=import-outside-toplevel
    assert Image.open(path).size[0] == 2 * (96 * 2 + 6) + 6


# --------------------------------------------------------------------------
# Occlusion mode and the visibility rule.
# --------------------------------------------------------------------------

def _recomputed_fractions(coco, images, canvas_size=96):
    by_image = {}
    for a in coco["annotations"]:  # annotation order = paste order
        by_image.setdefault(a["image_id"], []).append(a)
    result = []
    for annotations in by_image.values():
        alphas = [outfits.render_item(images[a["source_index"]],
                                           a["item_box"][2])[1]
                  for a in annotations]
        masks, fractions = outfits.visible_masks(
            alphas, [a["item_box"] for a in annotations], canvas_size)
        for a, mask, fraction in zip(annotations, masks, fractions):
            result.append((a, mask, fraction))
    return result


@pytest.mark.parametrize("name,minimum", [
    ("seed0", outfits.DEFAULT_MIN_VISIBLE),
    ("occluded", outfits.OCCLUDED_MIN_VISIBLE)])
def test_visible_fraction_rule(demo_sets, sources, name, minimum):
    coco = _coco(demo_sets[name], "train")
    assert coco["info"]["min_visible_fraction"] == minimum
    for a, mask, fraction in _recomputed_fractions(coco, sources["train"][0]):
        assert fraction >= minimum
        assert abs(fraction - a["visible_fraction"]) < 1e-3
        ys, xs = np.nonzero(mask)
        assert a["area"] == mask.sum()
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                             ys.max() - ys.min() + 1]


def test_occlusion_mode_occludes_and_crops(demo_sets, sources):
    coco = _coco(demo_sets["occluded"], "train")
    fractions = [a["visible_fraction"] for a in coco["annotations"]]
    assert np.mean(fractions) < 0.85
    assert min(fractions) < 0.6
    off_canvas = [a for a in coco["annotations"]
                  if min(a["item_box"][:2]) < 0
                  or max(a["item_box"][:2]) + a["item_box"][2] > 96]
    assert len(off_canvas) > 5
    plain = _coco(demo_sets["seed0"], "train")
    assert all(0 <= a["item_box"][0] and a["item_box"][0] + a["item_box"][2]
               <= 96 for a in plain["annotations"])


def test_occlusion_mode_leaves_classes_mostly_hidden(demo_sets):
    """The ablation's hidden-label AP needs classes whose every item is
    < 50 % visible: the occluded minimum is 25 %, and such classes are common."""
    assert outfits.OCCLUDED_MIN_VISIBLE == 0.25
    coco = _coco(demo_sets["occluded"], "train")
    best = {}
    for a in coco["annotations"]:
        key = (a["image_id"], a["category_id"])
        best[key] = max(best.get(key, 0.0), a["visible_fraction"])
    hidden = [v for v in best.values() if v < 0.5]
    assert len(hidden) >= 0.15 * len(best)
    assert min(a["visible_fraction"] for a in coco["annotations"]) < 0.35


def test_labels_are_exactly_the_visible_classes(demo_sets, sources):
    """Every label has an item at least `OCCLUDED_MIN_VISIBLE` visible, and
    outside the annotated items the canvas is plain background (no unlabelled
    item shows)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    output_dir = demo_sets["occluded"]
    coco = _coco(output_dir, "train")
    images = sources["train"][0]
    recomputed = _recomputed_fractions(coco, images)
    visible = {}
    for a, _, fraction in recomputed:
        if fraction >= outfits.OCCLUDED_MIN_VISIBLE:
            visible.setdefault(a["image_id"], set()).add(a["category_id"] - 1)
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    assert {names[k]: v for k, v in visible.items()} == _label_sets(coco)
    for image_id, name in names.items():
        covered = np.zeros((98, 98), bool)  # one pixel of margin
        for a in coco["annotations"]:
            if a["image_id"] != image_id:
                continue
            x, y, side, _ = a["item_box"]
            alpha = outfits.render_item(images[a["source_index"]], side)[1]
            padded = np.zeros((96 + 2 * side, 96 + 2 * side), bool)
            padded[y + side:y + 2 * side, x + side:x + 2 * side] = alpha > 0
            covered |= padded[side - 1:side + 97, side - 1:side + 97]
        outside = ~(covered[:-2, 1:-1] | covered[2:, 1:-1] | covered[1:-1, :-2]
                    | covered[1:-1, 2:] | covered[1:-1, 1:-1])
        canvas = np.asarray(Image.open(os.path.join(
            output_dir, "images", "train", name)), np.float32)
        assert outside.sum() > 500
        assert canvas[outside].std(axis=0).max() < 5, name  # noise sigma 4


def test_make_canvas_leaves_out_items_without_room(sources):
    rng = np.random.default_rng(0)
    images, labels = sources["test"]
    bags = np.flatnonzero(labels == 8)[:12]
    items = [(8, int(i), images[i]) for i in bags]
    canvas, pasted = outfits.make_canvas(rng, items, 40, occlusion=False)
    assert canvas.shape == (40, 40, 3) and canvas.dtype == np.uint8
    assert 1 <= len(pasted) < 12
    assert min(p["visible_fraction"] for p in pasted) >= 0.9


# --------------------------------------------------------------------------
# Fashion-MNIST reader.
# --------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR),
                    reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("split,size", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_from_debian(sources, split, size):
    images, labels = sources[split]
    assert images.shape == (size, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (size,) and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [size // 10] * 10
    assert 0 < images.mean() < 255
    assert len(fashion_mnist.CLASS_NAMES) == 10


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_data_dir_comes_first(tmp_path, monkeypatch, sources):
    for name in fashion_mnist._FILES["test"]:
        shutil.copy(os.path.join(fashion_mnist.DEBIAN_DIR, name), tmp_path)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "none"))
    images, labels = fashion_mnist.load_fashion_mnist("test", str(tmp_path))
    np.testing.assert_array_equal(images, sources["test"][0])
    np.testing.assert_array_equal(labels, sources["test"][1])


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "deb"))
    monkeypatch.setattr(fashion_mnist, "KERAS_CACHE_DIR",
                        str(tmp_path / "keras"))
    monkeypatch.setattr(fashion_mnist.urllib.request, "urlopen", no_network)
    with pytest.raises(ValueError) as error:
        fashion_mnist.load_fashion_mnist("train", str(tmp_path / "bogus"))
    message = str(error.value)
    for place in ("bogus", "deb", "keras", "downloaded",
                  "apt-get install dataset-fashion-mnist"):
        assert place in message
    assert not os.listdir(tmp_path / "keras")  # nothing half-written


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_download_fills_the_cache(tmp_path, monkeypatch, sources):
    """The download path, served from the Debian files by a file:// URL."""
    monkeypatch.setattr(fashion_mnist, "DOWNLOAD_URL",
                        "file://" + fashion_mnist.DEBIAN_DIR + "/")
    monkeypatch.setattr(fashion_mnist, "KERAS_CACHE_DIR", str(tmp_path / "cache"))
    images, labels = fashion_mnist._download("test")
    np.testing.assert_array_equal(images, sources["test"][0])
    np.testing.assert_array_equal(labels, sources["test"][1])
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(fashion_mnist._FILES["test"])



class _Response(io.BytesIO):
    """What the patched `urlopen` serves: `data`, then optionally an error."""

    def __init__(self, data, error=None):
        super().__init__(data)
        self._error = error

    def read(self, *args):
        chunk = super().read(*args)
        if not chunk and self._error is not None:
            raise self._error
        return chunk


def _serve(monkeypatch, tmp_path, response):
    opened = []

    def urlopen(url, timeout=None):
        del timeout
        opened.append(url)
        return response(os.path.basename(url))

    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "deb"))
    monkeypatch.setattr(fashion_mnist, "KERAS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fashion_mnist.urllib.request, "urlopen", urlopen)
    return opened


@pytest.mark.parametrize("kind,expected", [
    ("truncated", "truncated or corrupt gzip file"),
    ("not_gzip", "truncated or corrupt gzip file"),
    ("other_content", "not the official Fashion-MNIST"),
    ("connection_lost", "IncompleteRead"),
])
def test_fashion_mnist_bad_download_is_one_error_and_leaves_nothing(
        tmp_path, monkeypatch, kind, expected):
    """Offline (patched urlopen): a bad download is one ValueError naming the
    file and the reason, and no file (final or temporary) is left behind."""
    whole = gzip.compress(b"\x00\x00\x08\x01" + bytes(100))

    def response(name):
        del name
        if kind == "truncated":
            return _Response(whole[:len(whole) // 2])
        if kind == "not_gzip":
            return _Response(b"<html>rate limited</html>")
        if kind == "other_content":
            return _Response(whole)
        return _Response(whole[:10], http.client.IncompleteRead(whole[:10], 50))

    opened = _serve(monkeypatch, tmp_path, response)
    with pytest.raises(ValueError) as error:
        fashion_mnist.load_fashion_mnist("test")
    message = str(error.value)
    assert expected in message and "could not be downloaded" in message, message
    assert "t10k-images-idx3-ubyte.gz" in message, message
    assert len(opened) == 1 and os.listdir(tmp_path / "cache") == []


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_download_is_checked_and_renamed(tmp_path, monkeypatch, sources):
    """Offline: the official files, served through a patched urlopen."""
    official = fashion_mnist.DEBIAN_DIR

    def response(name):
        with open(os.path.join(official, name), "rb") as f:
            return _Response(f.read())

    opened = _serve(monkeypatch, tmp_path, response)
    images, labels = fashion_mnist.load_fashion_mnist("test")
    np.testing.assert_array_equal(images, sources["test"][0])
    np.testing.assert_array_equal(labels, sources["test"][1])
    assert [os.path.basename(url) for url in opened] == list(fashion_mnist._FILES["test"])
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(fashion_mnist._FILES["test"])


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_DIR),
                    reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_fashion_mnist_damaged_local_file_is_named(tmp_path, monkeypatch, damage):
    for name in fashion_mnist._FILES["test"]:
        shutil.copy(os.path.join(fashion_mnist.DEBIAN_DIR, name), tmp_path)
    path = tmp_path / fashion_mnist._FILES["test"][1]
    data = path.read_bytes()
    if damage == "truncate":
        data = data[:len(data) // 2]
    else:  # A flipped byte in the deflate stream: caught by the CRC or the SHA-256.
        data = data[:2000] + bytes([data[2000] ^ 0x01]) + data[2001:]
    path.write_bytes(data)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", str(tmp_path / "none"))
    with pytest.raises(ValueError, match="delete it") as error:
        fashion_mnist.load_fashion_mnist("test", str(tmp_path))
    assert str(path) in str(error.value)


def test_fashion_mnist_bad_split():
    with pytest.raises(ValueError, match="split"):
        fashion_mnist.load_fashion_mnist("validation")

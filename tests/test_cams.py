"""Tests of mlcrl_tf.cams (CAM maps, panels, visualize_files) and the
TensorBoard eval panels of mlcrl_tf.summaries."""

import io
import os

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mlcrl_tf.evaluation import cam_panels
from mlcrl_tf.evaluation import cams
from mlcrl_tf.evaluation import visualize_lib
from mlcrl_tf.modeling import backbones
from mlcrl_tf.modeling.model import build_model
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import restore
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.training import summaries
from pipelines.demo import fashion_mnist
from pipelines.records import schema
from pipelines.tfdata import input_pipeline

from conftest import run_module

NUM_CLASSES = 10
SIZE = 64
BACKBONE = "small_cnn"
CLASS_NAMES = list(fashion_mnist.CLASS_NAMES)


def _canvases(count, seed):
    """Real Fashion-MNIST items (2 per canvas) on 64x64 RGB canvases."""
    items, item_labels = fashion_mnist.load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    canvases = np.zeros((count, SIZE, SIZE, 3), np.uint8)
    multi_hot = np.zeros((count, NUM_CLASSES), np.float32)
    for b in range(count):
        for idx in rng.choice(len(items), 2, replace=False):
            y, x = rng.integers(0, SIZE - 27, size=2)
            patch = canvases[b, y:y + 28, x:x + 28]
            np.maximum(patch, items[idx][:, :, None], out=patch)
            multi_hot[b, item_labels[idx]] = 1.0
    return canvases, multi_hot


@pytest.fixture(scope="module")
def data():
    images, labels = _canvases(3, seed=0)
    return images, labels, images.astype(np.float32)  # the model normalises


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(0)
    return {v: build_model(NUM_CLASSES, BACKBONE, SIZE, v) for v in ("crl", "tbc", "baseline")}


@pytest.mark.parametrize("variant", ["crl", "tbc", "baseline"])
def test_cams_equal_numpy_recomputation(models, data, variant):
    model = models[variant]
    _, _, x = data
    ids = np.array([[1, 8], [5, 0], [9, 3]])
    maps = cams.compute_cams(model, x, ids)
    outputs = model.feature_model()(x, training=False)
    features = outputs["features"].numpy()  # (N, h, w, D)
    d = backbones.feature_dim(BACKBONE)
    kernel = model.classifier.kernel.numpy()
    assert kernel.shape[0] == (d + NUM_CLASSES if variant == "tbc" else d)
    h = SIZE // backbones.feature_stride(BACKBONE)
    assert maps["direct"].shape == (3, 2, h, h)
    for n in range(3):
        for k, c in enumerate(ids[n]):
            expected = np.zeros((h, h), np.float64)
            for j in range(d):
                expected += kernel[j, c] * features[n, :, :, j]
            np.testing.assert_allclose(maps["direct"][n, k], expected, rtol=1e-4, atol=1e-4)
            if variant == "baseline":
                assert maps["f_conv"] is None
            else:
                np.testing.assert_allclose(maps["f_conv"][n, k],
                                           outputs["class_maps"].numpy()[n, :, :, c],
                                           atol=1e-6)
    np.testing.assert_allclose(maps["probabilities"],
                               tf.sigmoid(outputs["logits"]).numpy(), atol=1e-6)


def test_cam_pools_to_the_direct_logit(models, data):
    """Sanity of the definition: for baseline, GAP(CAM_c) + GMP part + bias
    recombine to the direct logit (mean pooling commutes with W)."""
    model = models["baseline"]
    _, _, x = data
    ids = np.arange(NUM_CLASSES)[None].repeat(3, 0)
    maps = cams.compute_cams(model, x, ids)
    features = model.feature_model()(x, training=False)["features"].numpy()
    kernel = cams.direct_head_kernel(model)
    gmp_part = features.max(axis=(1, 2)) @ kernel
    logits = maps["direct"].mean(axis=(2, 3)) + gmp_part + model.classifier.bias.numpy()
    np.testing.assert_allclose(logits, model.inference_model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_bad_class_ids(models, data):
    with pytest.raises(ValueError, match="class_ids"):
        cams.compute_cams(models["crl"], data[2], NUM_CLASSES)
    with pytest.raises(ValueError, match="images must have shape"):
        cams.compute_cams(models["crl"], data[2][:, :32], 0)


def test_jet_and_normalisation():
    colours = cams.jet(np.array([[0.0, 0.5, 1.0]]))
    np.testing.assert_array_equal(colours[0, 0], [0, 0, 128])
    np.testing.assert_array_equal(colours[0, 2], [128, 0, 0])
    assert colours[0, 1, 1] == 255  # green at the middle
    heat = cams.upsample_and_normalise(np.array([[0.0, 1.0], [2.0, 3.0]]), 8, 8)
    assert heat.shape == (8, 8) and heat.min() == 0.0 and heat.max() == 1.0
    assert heat[0, 0] < heat[-1, -1]
    assert not cams.upsample_and_normalise(np.ones((2, 2)), 4, 4).any()


def test_render_panel_and_png(models, data, tmp_path):
    images, _, x = data
    maps = cams.compute_cams(models["crl"], x[:1], 8)
    one = {"direct": maps["direct"][0, 0], "f_conv": maps["f_conv"][0, 0]}
    panel = cam_panels.render_cam_panel(images[0], one, "Bag", score=0.87, tile_size=96)
    assert panel.dtype == np.uint8 and panel.shape == (96 + 14, 3 * 96, 3)
    resized = np.asarray(Image.fromarray(images[0]).resize((96, 96), Image.BILINEAR))
    np.testing.assert_array_equal(panel[14:, :96], resized)
    assert not np.array_equal(panel[14:, 96:192], panel[14:, 192:])
    assert panel[:14].any()  # caption text
    only_direct = cam_panels.render_cam_panel(images[0], {"direct": one["direct"]}, "Bag")
    assert only_direct.shape == (SIZE + 14, 2 * SIZE, 3)
    path = str(tmp_path / "cam.png")
    cam_panels.save_png(panel, path)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), panel)


def test_visualize_files_from_a_training_run(models, data, tmp_path):
    model_dir = str(tmp_path / "run")
    os.makedirs(model_dir)
    config = config_lib.Config(model_dir=model_dir, train_files="unused", backbone=BACKBONE,
                               variant="crl", image_size=SIZE, num_classes=NUM_CLASSES)
    run_files.write_run(model_dir, config, CLASS_NAMES)
    tf.train.Checkpoint(model=models["crl"]).save(os.path.join(model_dir, "ckpt"))
    model, config, class_names, _ = restore.restore_model(model_dir)
    image_path = str(tmp_path / "outfit.png")
    Image.fromarray(data[0][0]).resize((100, 80)).save(image_path)
    written, problems = visualize_lib.visualize_files(model, class_names, [image_path],
                                             str(tmp_path / "cams"),
                                             classes=["Bag", "T-shirt/top"], tile_size=64)
    assert problems == []
    assert [os.path.basename(p) for p in written] == ["outfit_Bag.png",
                                                      "outfit_T-shirt_top.png"]
    for path in written:
        assert Image.open(path).size == (3 * 64, 64 + 14)
    top, _ = visualize_lib.visualize_files(model, class_names, [image_path],
                                  str(tmp_path / "top"), top_k=2)
    assert len(top) == 2
    with pytest.raises(ValueError, match="Hat"):
        visualize_lib.visualize_files(model, class_names, [image_path],
                                  str(tmp_path / "x"), classes=["Hat"])


def test_write_eval_images_is_readable_from_the_event_file(models, data, tmp_path):
    _, labels, x = data
    model = models["crl"]
    logits = model.inference_model(x).numpy()
    samples = {"images": x, "labels": labels, "logits": logits,
               "filename": np.array([b"a.jpg", b"b.jpg", b"dir/c.jpg"])}
    writer = tf.summary.create_file_writer(str(tmp_path / "eval"))
    with writer.as_default(step=7):
        assert summaries.write_eval_images(samples, model, CLASS_NAMES,
                                           max_images=2)
    writer.flush()
    [event_file] = tf.io.gfile.glob(str(tmp_path / "eval" / "events.*"))
    found = []
    for event in tf.compat.v1.train.summary_iterator(event_file):
        for value in event.summary.value:
            if value.tag == summaries.TAG:
                found.append((event.step, tf.make_ndarray(value.tensor)))
    [(step, tensor)] = found
    assert step == 7
    width, height = int(tensor[0]), int(tensor[1])
    pictures = [np.asarray(Image.open(io.BytesIO(png))) for png in tensor[2:]]
    assert len(pictures) == 2
    tile = summaries.TILE_SIZE
    assert (width, height) == (3 * tile, tile + 14 + 24)
    assert all(p.shape == (height, width, 3) for p in pictures)
    panels = cam_panels.eval_image_panels(samples, model, CLASS_NAMES, 2, summaries.TILE_SIZE)
    np.testing.assert_array_equal(pictures[0], panels[0])
    # No writer, no samples: nothing written, no error.
    assert not summaries.write_eval_images(None, model, CLASS_NAMES)


def _run_dir(path, model, antialias):
    """A training-run directory holding `model`'s weights, with `antialias`."""
    model_dir = str(path)
    os.makedirs(model_dir)
    config = config_lib.Config(model_dir=model_dir, train_files="unused", backbone=BACKBONE,
                               variant="crl", image_size=SIZE, num_classes=NUM_CLASSES,
                               antialias=antialias)
    run_files.write_run(model_dir, config, CLASS_NAMES)
    tf.train.Checkpoint(model=model).save(os.path.join(model_dir, "ckpt"))
    return model_dir


@pytest.mark.parametrize("antialias", [False, True])
def test_visualize_input_equals_the_runs_eval_pipeline(models, data, tmp_path, monkeypatch,
                                                       antialias):
    """The CAM input of an image file is the eval pipeline's tensor for the
    same bytes, resized with the run's antialias setting."""
    model_dir = _run_dir(tmp_path / "run", models["crl"], antialias)
    image_path = str(tmp_path / "big.png")
    Image.fromarray(data[0][0]).resize((150, 110), Image.NEAREST).save(image_path)
    with open(image_path, "rb") as f:
        encoded = f.read()
    shard = str(tmp_path / "test-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(shard) as writer:
        writer.write(schema.make_example(encoded, "big.png", [1]).SerializeToString())
    pipeline = {a: next(iter(input_pipeline.make_dataset(
        shard, 1, SIZE, NUM_CLASSES, training=False, antialias=a)))["images"].numpy()
        for a in (False, True)}
    assert np.abs(pipeline[True] - pipeline[False]).max() > 1.0  # the test can tell
    seen = []
    real = cams._feature_model  # pylint: disable=protected-access

    def spy(model):
        network = real(model)
        return lambda images, **kwargs: seen.append(np.array(images)) or network(
            images, **kwargs)

    monkeypatch.setattr(cams, "_feature_model", spy)
    code = visualize_lib.run(model_dir, [image_path], str(tmp_path / "cams"), {},
                    stdout=io.StringIO(), stderr=io.StringIO(), top_k=1, tile_size=32)
    assert code == 0 and len(seen) == 1
    np.testing.assert_allclose(seen[0], pipeline[antialias], atol=1e-3)


class _CountingModel:
    """A model whose network runs (inference or feature model) are counted."""

    def __init__(self, model):
        self._model, self.runs = model, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def inference_model(self, *args, **kwargs):
        self.runs += 1
        return self._model.inference_model(*args, **kwargs)

    def feature_model(self):
        features = self._model.feature_model()

        def run(*args, **kwargs):
            self.runs += 1
            return features(*args, **kwargs)
        return run


def test_top_k_runs_the_network_once_per_image(models, data, tmp_path):
    model = _CountingModel(models["tbc"])
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(data[0][i]).save(paths[-1])
    written, problems = visualize_lib.visualize_files(model, CLASS_NAMES, paths,
                                             str(tmp_path / "cams"), top_k=2, tile_size=32)
    assert problems == [] and len(written) == 4
    assert model.runs == 2
    # The classes chosen are the inference branch's top 2.
    logits = models["tbc"].inference_model(data[2][:2]).numpy()
    for i in range(2):
        top = np.argsort(-logits[i], kind="stable")[:2]
        _, class_parts = visualize_lib.output_names(paths, CLASS_NAMES)
        assert sorted(os.path.basename(p) for p in written[2 * i:2 * i + 2]) == sorted(
            f"im{i}_{class_parts[c]}.png" for c in top)


def test_visualize_cli_unreadable_run_is_one_error_line(tmp_path, data):
    """A run.json that cannot be read (here a directory): `error: ...`, no traceback."""
    model_dir = tmp_path / "run"
    (model_dir / "run.json").mkdir(parents=True)
    image_path = str(tmp_path / "im.png")
    Image.fromarray(data[0][0]).save(image_path)
    proc = run_module("mlcrl_tf.visualize", [f"--model_dir={model_dir}",
                                             f"--output_dir={tmp_path / 'cams'}",
                                             image_path], check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "run.json" in proc.stderr

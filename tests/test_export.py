"""Tests for mlcrl_tf.export: export a briefly trained model, reload it (as
TF2 code and as TF Serving does, in a TF1 session), compare with the live
Keras model on real encoded images; the inference-only variable set; bad
image bytes; versions and the atomic write; metadata; saved_model_cli."""

import base64
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.framework import config as tf_config  # disable_op_determinism

from mlcrl_tf.evaluation import evaluator
from mlcrl_tf.modeling import backbones
from mlcrl_tf.modeling.model import build_model
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.serving import contract
from mlcrl_tf.serving import export_lib
from mlcrl_tf.training import train_lib
from pipelines.tfdata.decoder import decode_image
from pipelines.tfdata.preprocessing import preprocess_eval

from helpers import CANVAS_SIZE
from helpers import FASHION_CLASS_NAMES
from helpers import FASHION_CLASSES
from helpers import SMALL_BACKBONE
from helpers import encode_image
from helpers import fashion_canvases
from helpers import train_on_canvases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Real data and a briefly trained model.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained crl and baseline model and their exports."""
    keras.utils.set_random_seed(0)
    root = str(tmp_path_factory.mktemp("exports"))
    crl = build_model(FASHION_CLASSES, SMALL_BACKBONE, CANVAS_SIZE, "crl")
    f_conv_before = crl.f_conv.kernel.numpy().copy()
    crl = train_on_canvases(crl)
    baseline = train_on_canvases(
        build_model(FASHION_CLASSES, SMALL_BACKBONE, CANVAS_SIZE, "baseline"))
    crl_path = export_lib.export_model(crl, os.path.join(root, "crl"), FASHION_CLASS_NAMES,
                                       threshold=0.4, top_k=3)
    baseline_path = export_lib.export_model(baseline, os.path.join(root, "baseline"),
                                            FASHION_CLASS_NAMES)
    return {"crl": crl, "baseline": baseline, "crl_path": crl_path,
            "baseline_path": baseline_path, "root": root, "f_conv_before": f_conv_before}


@pytest.fixture(scope="module")
def loaded(trained):
    return tf.saved_model.load(trained["crl_path"])


@pytest.fixture(scope="module")
def encoded_images():
    """Real images: JPEG and PNG, 64x64 and 100x80, RGB and grayscale."""
    rgb64, _ = fashion_canvases(2, 64, 64, seed=2)
    rgb100, _ = fashion_canvases(1, 80, 100, seed=3)
    gray, _ = fashion_canvases(1, 72, 90, seed=4, gray=True)
    return [encode_image(rgb64[0], "JPEG", quality=90), encode_image(rgb64[1], "PNG"),
            encode_image(rgb100[0], "PNG"), encode_image(rgb100[0], "JPEG"),
            encode_image(gray[0], "JPEG"), encode_image(gray[0], "PNG")]


def _keras_logits(model, image_bytes):
    """The live model on the evaluation preprocessing of each image."""
    batch = tf.stack([preprocess_eval(decode_image(b), CANVAS_SIZE) for b in image_bytes])
    return model.inference_model(batch, training=False).numpy()


# --------------------------------------------------------------------------
# Outputs equal the live model.
# --------------------------------------------------------------------------

def test_weights_were_trained(trained):
    before = trained["f_conv_before"]
    moved = trained["crl"].f_conv.kernel.numpy() - before
    # The coupled weight decay alone moves it by < 5e-5 of its norm in 4 steps
    # (lr 0.05 x 1e-4, momentum 0.9); 4 real steps move it by ~6e-2.
    assert np.linalg.norm(moved) > 1e-3 * np.linalg.norm(before)
    assert not np.allclose(trained["crl"].backbone.get_layer("stage0_bn0").moving_mean.numpy(),
                           0.0)


def test_serving_default_equals_keras_model(trained, loaded, encoded_images):
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded_images))
    expected = _keras_logits(trained["crl"], encoded_images)
    np.testing.assert_allclose(out["logits"].numpy(), expected, rtol=1e-5, atol=1e-5)
    probabilities = out["probabilities"].numpy()
    np.testing.assert_allclose(probabilities, tf.sigmoid(expected).numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["predicted"].numpy(), probabilities >= 0.4)
    top_ids = out["top_k_class_ids"].numpy()
    assert top_ids.shape == (len(encoded_images), 3)
    np.testing.assert_array_equal(top_ids, np.argsort(-probabilities, axis=1)[:, :3])
    np.testing.assert_allclose(out["top_k_scores"].numpy(),
                               np.take_along_axis(probabilities, top_ids, 1), atol=1e-6)
    names = [[n.decode() for n in row] for row in out["top_k_classes"].numpy()]
    assert names == [[FASHION_CLASS_NAMES[i] for i in row] for row in top_ids]
    # Not a constant function of the input.
    assert np.ptp(probabilities, axis=0).max() > 1e-3


def test_baseline_export_equals_its_keras_model(trained, encoded_images):
    out = tf.saved_model.load(trained["baseline_path"]).signatures["serving_default"](
        image_bytes=tf.constant(encoded_images[:2]))
    np.testing.assert_allclose(out["logits"].numpy(),
                               _keras_logits(trained["baseline"], encoded_images[:2]),
                               rtol=1e-5, atol=1e-5)


def test_serve_tensor_equals_keras_model(trained, loaded):
    images, _ = fashion_canvases(3, CANVAS_SIZE, CANVAS_SIZE, seed=5)
    raw = images.astype(np.float32)
    out = loaded.signatures["serve_tensor"](images=tf.constant(raw))
    expected = trained["crl"].inference_model(raw, training=False).numpy()
    np.testing.assert_allclose(out["logits"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert set(out) == set(contract.OUTPUT_KEYS)


def test_tf1_session_load_like_tf_serving(trained, loaded, encoded_images):
    """TF Serving runs SignatureDefs by tensor name in a TF1-style session."""
    direct = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded_images))
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta_graph = tf.compat.v1.saved_model.loader.load(
            session, [tf.saved_model.SERVING], trained["crl_path"])
        signature = meta_graph.signature_def["serving_default"]
        fetches = {k: v.name for k, v in signature.outputs.items()}
        out = session.run(fetches, {signature.inputs["image_bytes"].name: encoded_images})
        metadata = meta_graph.signature_def["metadata"]
        names = session.run(metadata.outputs["class_names"].name)
    np.testing.assert_allclose(out["probabilities"], direct["probabilities"].numpy(), atol=1e-6)
    assert [n.decode() for n in names] == FASHION_CLASS_NAMES


def test_rest_request_body_as_tf_serving_decodes_it(loaded, encoded_images):
    """The docs/serving.md body; {"b64": ...} is base64-decoded into DT_STRING."""
    body = json.dumps({
        "signature_name": "serving_default",
        "instances": [{"image_bytes": {"b64": base64.b64encode(b).decode("ascii")}}
                      for b in encoded_images[:3]],
    })
    request = json.loads(body)
    signature = loaded.signatures[request["signature_name"]]
    inputs = {"image_bytes": tf.constant(
        [base64.b64decode(row["image_bytes"]["b64"]) for row in request["instances"]],
        tf.string)}
    via_rest = signature(**inputs)["probabilities"].numpy()
    direct = signature(image_bytes=tf.constant(encoded_images[:3]))["probabilities"].numpy()
    np.testing.assert_array_equal(via_rest, direct)


# --------------------------------------------------------------------------
# Only the inference branch.
# --------------------------------------------------------------------------

def _checkpoint_variables(path):
    """(name, shape) of every variable saved in the SavedModel's checkpoint."""
    prefix = os.path.join(path, "variables", "variables")
    return [(n, s) for n, s in tf.train.list_variables(prefix)
            if not n.startswith("_CHECKPOINTABLE_OBJECT_GRAPH")]


def test_export_holds_only_the_inference_branch(trained, loaded):
    crl = trained["crl"]
    names = [v.name for v in loaded.model_variables]
    assert not [n for n in names if "projector" in n]
    assert len(names) == len(crl.inference_model.variables)
    assert sorted(n.split(":")[0] for n in names) == sorted(
        v.path for v in crl.inference_model.variables)
    assert "f_conv/kernel:0" in names
    # Nothing else hides in the checkpoint of the SavedModel.
    assert len(_checkpoint_variables(trained["crl_path"])) == len(names)
    training_only = sum(int(np.prod(v.shape)) for v in crl.co_projector_variables)
    assert training_only > 0


def test_parameter_count_is_baseline_plus_f_conv(trained, loaded):
    def count(path):
        return sum(int(np.prod(shape)) for _, shape in _checkpoint_variables(path))

    d = backbones.feature_dim(SMALL_BACKBONE)
    assert count(trained["crl_path"]) == count(trained["baseline_path"]) + d * FASHION_CLASSES \
        + FASHION_CLASSES
    baseline = tf.saved_model.load(trained["baseline_path"])
    loaded_count = sum(int(np.prod(v.shape)) for v in loaded.model_variables)
    assert loaded_count == sum(int(np.prod(v.shape)) for v in baseline.model_variables) \
        + d * FASHION_CLASSES + FASHION_CLASSES


# --------------------------------------------------------------------------
# Bad image bytes.
# --------------------------------------------------------------------------

def test_bad_image_bytes_fail_the_request_naming_them(loaded, encoded_images):
    good = encoded_images[0]
    truncated = encoded_images[3][:len(encoded_images[3]) // 2]
    batch = [good, b"this is not an image", b"", truncated, encoded_images[1]]
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        loaded.signatures["serving_default"](image_bytes=tf.constant(batch))
    message = info.value.message
    assert "image_bytes" in message
    assert "[1 2 3]" in message
    assert "unknown format" in message and "empty" in message
    assert "corrupt or truncated" in message
    # The good images alone are fine; a JPEG cut just before its end marker fails.
    out = loaded.signatures["serving_default"](image_bytes=tf.constant([good]))
    assert out["probabilities"].shape == (1, FASHION_CLASSES)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes.*\[0\]"):
        loaded.signatures["serving_default"](image_bytes=tf.constant([good[:-2]]))


def test_empty_batch_is_a_clear_error(loaded):
    with pytest.raises(tf.errors.InvalidArgumentError, match="image_bytes: the batch is empty"):
        loaded.signatures["serving_default"](image_bytes=tf.constant([], tf.string))
    with pytest.raises(tf.errors.InvalidArgumentError, match="images: the batch is empty"):
        loaded.signatures["serve_tensor"](images=tf.zeros([0, CANVAS_SIZE, CANVAS_SIZE, 3]))


# --------------------------------------------------------------------------
# Metadata, assets, saved_model_cli.
# --------------------------------------------------------------------------

def test_metadata_and_labels_asset(trained, loaded):
    metadata = loaded.signatures["metadata"]()
    assert [n.decode() for n in metadata["class_names"].numpy()] == FASHION_CLASS_NAMES
    assert metadata["threshold"].numpy() == pytest.approx(0.4)
    assert int(metadata["top_k"].numpy()) == 3
    assert int(metadata["image_size"].numpy()) == CANVAS_SIZE
    assert metadata["backbone"].numpy().decode() == SMALL_BACKBONE
    assert metadata["variant"].numpy().decode() == "crl"
    labels = os.path.join(trained["crl_path"], "assets", contract.LABELS_FILE)
    with open(labels, encoding="utf-8") as f:
        assert f.read().splitlines() == FASHION_CLASS_NAMES
    assert loaded.labels_file.asset_path.numpy().decode().endswith("labels.txt")


def test_saved_model_cli_lists_the_signatures(trained):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    proc = subprocess.run([cli, "show", "--dir", trained["crl_path"], "--all"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in ("signature_def['serving_default']", "signature_def['serve_tensor']",
                 "signature_def['metadata']", "inputs['image_bytes']", "inputs['images']",
                 "outputs['probabilities']", "outputs['top_k_classes']",
                 # Any shape: the graph refuses a wrong one naming the right one.
                 "images: TensorSpec(shape=<unknown>, dtype=tf.float32"):
        assert text in proc.stdout


# --------------------------------------------------------------------------
# Versions and atomic writes.
# --------------------------------------------------------------------------

def _listing(directory):
    return sorted(os.listdir(directory))


def test_versions_are_never_overwritten(trained, tmp_path):
    model = trained["baseline"]
    base = str(tmp_path / "m")
    assert export_lib.export_model(model, base, FASHION_CLASS_NAMES) == os.path.join(base, "1")
    assert export_lib.export_model(model, base, FASHION_CLASS_NAMES).endswith(os.sep + "2")
    stamp = os.path.getmtime(os.path.join(base, "1", "saved_model.pb"))
    with pytest.raises(ValueError, match="version=1 already exists"):
        export_lib.export_model(model, base, FASHION_CLASS_NAMES, version=1)
    assert os.path.getmtime(os.path.join(base, "1", "saved_model.pb")) == stamp
    assert export_lib.export_model(model, base, FASHION_CLASS_NAMES, version=7).endswith("7")
    assert export_lib.export_model(model, base, FASHION_CLASS_NAMES).endswith(os.sep + "8")
    assert export_lib.existing_versions(base) == [1, 2, 7, 8]
    assert _listing(base) == ["1", "2", "7", "8"]


def test_failed_export_leaves_no_version(trained, tmp_path, monkeypatch):
    model = trained["baseline"]
    base = str(tmp_path / "m")
    export_lib.export_model(model, base, FASHION_CLASS_NAMES)
    real_save = tf.saved_model.save
    seen = []

    def crash(obj, export_dir, **kwargs):
        seen.append(export_dir)
        os.makedirs(os.path.join(export_dir, "variables"))
        with open(os.path.join(export_dir, "saved_model.pb"), "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_lib.export_model(model, base, FASHION_CLASS_NAMES)
    name = os.path.basename(seen[0])
    assert name.startswith(".") and not name.isdigit()
    assert _listing(base) == ["1"]
    monkeypatch.setattr(tf.saved_model, "save", real_save)
    path = export_lib.export_model(model, base, FASHION_CLASS_NAMES)
    assert path == os.path.join(base, "2")
    tf.saved_model.load(path).signatures["metadata"]()


@pytest.mark.parametrize("kwargs, match", [
    ({"class_names": FASHION_CLASS_NAMES[:-1]}, "class_names"),
    ({"class_names": ["a"] * FASHION_CLASSES}, "class_names"),
    ({"class_names": FASHION_CLASS_NAMES[:-1] + ["two\nlines"]}, "class_names"),
    ({"threshold": 1.5}, "threshold"),
    ({"top_k": FASHION_CLASSES + 1}, "top_k"),
    ({"version": 0}, "version"),
    ({"model": "not a model"}, "model"),
])
def test_bad_arguments_raise_value_error(trained, tmp_path, kwargs, match):
    arguments = {"model": trained["baseline"], "export_dir": str(tmp_path / "m"),
                 "class_names": FASHION_CLASS_NAMES, **kwargs}
    with pytest.raises(ValueError, match=match):
        export_lib.export_model(**arguments)
    assert not os.path.exists(tmp_path / "m" / "1")


# --------------------------------------------------------------------------
# The command line over a training run's model_dir.
# --------------------------------------------------------------------------

def test_cli_exports_a_training_run(trained, tmp_path, encoded_images):
    model_dir = str(tmp_path / "run")
    os.makedirs(model_dir)
    config = config_lib.Config(model_dir=model_dir, train_files="unused", backbone=SMALL_BACKBONE,
                               variant="crl", image_size=CANVAS_SIZE, num_classes=FASHION_CLASSES,
                               threshold=0.3)
    run_files.write_run(model_dir, config, FASHION_CLASS_NAMES)
    tf.train.Checkpoint(model=trained["crl"]).save(os.path.join(model_dir, "ckpt"))
    export_dir = str(tmp_path / "saved")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "mlcrl_tf.export", f"--model_dir={model_dir}",
         f"--export_dir={export_dir}", "--version=3"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = os.path.join(export_dir, "3")
    assert path in proc.stdout
    loaded = tf.saved_model.load(path)
    assert float(loaded.signatures["metadata"]()["threshold"]) == pytest.approx(0.3)
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded_images[:2]))
    np.testing.assert_allclose(out["logits"].numpy(),
                               _keras_logits(trained["crl"], encoded_images[:2]),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already exists"):
        export_lib.export_from_model_dir(model_dir, export_dir, version=3)


def test_bfloat16_export_serves_float32_close_to_the_float32_export(tmp_path, demo_data):
    """--precision=mixed_bfloat16: a bfloat16 serving model whose outputs stay
    float32 and score the demo test images like the float32 export."""
    config = config_lib.Config(
        model_dir=str(tmp_path / "run"), train_files=demo_data["train_files"],
        backbone="small_cnn", backbone_weights=None, lr_decay_epochs=(), image_size=48,
        batch_size=8, epochs=1, steps_per_epoch=4, learning_rate=0.05,
        backbone_learning_rate=0.05, num_summary_images=0, antialias=True,
        deterministic=True)  # the same model on every run: no flaky mAP gap
    try:
        train_lib.train_and_evaluate(config)
    finally:  # op determinism is process-wide: do not slow down later tests
        tf_config.disable_op_determinism()
    paths = {p: export_lib.export_from_model_dir(config.model_dir, str(tmp_path / p),
                                                 precision=p)
             for p in ("float32", "mixed_bfloat16")}
    results = {}
    for precision, path in paths.items():
        loaded = tf.saved_model.load(path)
        metadata = loaded.signatures["metadata"]()
        assert metadata["precision"].numpy().decode() == precision
        assert bool(metadata["antialias"].numpy())  # the run's resize travels along
        results[precision] = evaluator.evaluate_saved_model(
            path, demo_data["test_files"], 10, keep_scores=True)
    f32, bf16 = results["float32"], results["mixed_bfloat16"]
    assert bf16.scores["logits"].dtype == np.float32
    # The tolerance stated in docs/performance.md.
    np.testing.assert_allclose(bf16.scores["logits"], f32.scores["logits"], atol=0.25)
    # A 4-step model's logits lie close together, so bfloat16 rounding reorders
    # more of them than on a trained model (the demo: 83.47 vs 83.50 mAP).
    assert abs(bf16.metrics["mAP"] - f32.metrics["mAP"]) <= 0.01

"""Tests for the ONNX export (`export --format=onnx`) and `predict --format=onnx`:
a briefly trained model on real Fashion-MNIST canvases, onnxruntime against
the SavedModel, the export-time check (a faked mismatch), the command line end
to end, the same labels through both runtimes, and missing packages."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.modeling import precision as precision_lib
from mlcrl_tf.modeling.model import build_model
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.serving import export_lib
from mlcrl_tf.serving import onnx_client
from mlcrl_tf.serving import onnx_export
from mlcrl_tf.serving import predict_lib

from conftest import run_module
from helpers import FASHION_CLASS_NAMES
from helpers import FASHION_CLASSES
from helpers import SMALL_BACKBONE
from helpers import encode_image
from helpers import fashion_canvases
from helpers import train_briefly

pytest.importorskip("tf2onnx")
pytest.importorskip("onnxruntime")

SIZE = 32
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained():
    """A briefly trained crl model (small CNN, 32 px) on real canvases."""
    keras.utils.set_random_seed(0)
    images, labels = fashion_canvases(16, SIZE, SIZE, seed=1)
    return train_briefly(build_model(FASHION_CLASSES, SMALL_BACKBONE, SIZE, "crl"),
                         images.astype(np.float32), labels)


@pytest.fixture(scope="module")
def real_images():
    """Real canvases the model never saw, float32 RGB in [0, 255]."""
    return fashion_canvases(12, SIZE, SIZE, seed=7)[0].astype(np.float32)


@pytest.fixture(scope="module")
def exported(trained, real_images, tmp_path_factory):
    """`export_model(..., model_format="onnx")`: the version directory."""
    root = tmp_path_factory.mktemp("onnx")
    return export_lib.export_model(trained, str(root / "export"), FASHION_CLASS_NAMES,
                                   threshold=0.4, top_k=3, model_format="onnx",
                                   check_images=real_images[:8])


def _saved_model_logits(path, images):
    serve = tf.saved_model.load(path).signatures["serve_tensor"]
    return serve(images=tf.constant(images))["logits"].numpy()


def test_onnx_logits_equal_the_saved_models_on_real_images(exported, real_images, trained):
    onnx_path = os.path.join(exported, "onnx", "model.onnx")
    session = onnx_export.session(onnx_path)
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    got = session.run(["logits"], {"images": real_images})[0]
    expected = _saved_model_logits(exported, real_images)
    assert got.shape == (len(real_images), FASHION_CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got, trained.inference_model(real_images).numpy(), atol=1e-4)
    assert np.ptp(got) > 0.1  # trained logits, not a constant


def test_the_onnx_folder_holds_the_model_labels_and_metadata(exported):
    folder = os.path.join(exported, "onnx")
    assert sorted(os.listdir(folder)) == ["labels.txt", "model.onnx"]
    with open(os.path.join(folder, "labels.txt"), encoding="utf-8") as f:
        assert f.read().splitlines() == FASHION_CLASS_NAMES
    meta = onnx_export.session(os.path.join(folder, "model.onnx")).get_modelmeta()
    info = json.loads(meta.custom_metadata_map[onnx_export.METADATA_KEY])
    assert info["class_names"] == FASHION_CLASS_NAMES
    assert (info["image_size"], info["threshold"], info["top_k"]) == (SIZE, 0.4, 3)
    # The SavedModel beside it is the usual one (TF Serving ignores onnx/).
    assert os.path.exists(os.path.join(exported, "saved_model.pb"))
    assert not [n for n in os.listdir(os.path.dirname(exported)) if n.startswith(".")]


def test_a_mismatch_fails_the_export_in_one_line_and_leaves_no_version(
        trained, real_images, tmp_path, monkeypatch):
    real_run = onnx_export.run_logits
    monkeypatch.setattr(onnx_export, "run_logits",
                        lambda *args: real_run(*args) + np.float32(2e-4))
    export_dir = tmp_path / "export"
    with pytest.raises(ValueError) as error:
        export_lib.export_model(trained, str(export_dir), FASHION_CLASS_NAMES,
                                model_format="onnx", check_images=real_images[:4])
    message = str(error.value)
    assert "\n" not in message
    assert "differ from the SavedModel's by 0.0002" in message
    assert "more than 0.0001 + 1e-06 x |logit|" in message
    assert "nothing was exported" in message
    assert os.listdir(export_dir) == []  # no version, no temporary left


def test_the_check_compares_logits_within_1e_4():
    a = np.array([[1.0, -2.0]])
    assert onnx_export.max_abs_difference(a, a + 5e-5) == pytest.approx(5e-5)
    assert onnx_export.within_tolerance(a + 9e-5, a)
    assert not onnx_export.within_tolerance(a + 1.2e-4, a)
    # 8 float32 ulps more for a large logit: 1e-4 + 1e-6 x 167.
    big = np.array([[167.0, -3.0]])
    assert onnx_export.within_tolerance(big + [[2.5e-4, 0.0]], big)
    assert not onnx_export.within_tolerance(big + [[0.0, 2.5e-4]], big)
    assert onnx_export.max_abs_difference(a, np.array([[1.0, np.nan]])) == float("inf")
    assert not onnx_export.within_tolerance(np.array([[1.0, np.nan]]), a)
    assert onnx_export.max_abs_difference(a, a[:, :1]) == float("inf")


def test_predict_with_onnx_labels_like_the_saved_model(exported, tmp_path):
    images, _ = fashion_canvases(5, 48, 40, seed=11)  # not the model size: resized
    paths = []
    for i, image in enumerate(images):
        fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        paths.append(str(tmp_path / f"img{i}.{ext}"))
        with open(paths[-1], "wb") as f:
            f.write(encode_image(image, fmt))
    paths.append(str(tmp_path / "broken.jpg"))
    with open(paths[-1], "wb") as f:
        f.write(encode_image(images[0], "JPEG")[:300])
    saved = predict_lib.predict_files(exported, paths, all_probabilities=True)
    onnx = predict_lib.predict_files(exported, paths, all_probabilities=True,
                                     model_format="onnx")
    assert [r.get("labels") for r in onnx] == [r.get("labels") for r in saved]
    assert onnx[-1]["error"] == saved[-1]["error"]
    for a, b in zip(saved[:-1], onnx[:-1]):
        np.testing.assert_allclose(list(b["probabilities"].values()),
                                   list(a["probabilities"].values()), atol=1e-5)
    assert any(r["labels"] for r in saved[:-1])
    # The base directory, the onnx/ folder and the file itself all name it.
    for path in (os.path.dirname(exported), os.path.join(exported, "onnx"),
                 os.path.join(exported, "onnx", "model.onnx")):
        assert onnx_client.OnnxClient(path).class_names == FASHION_CLASS_NAMES


def test_predict_onnx_without_an_onnx_model_is_one_clear_error(tmp_path, exported):
    with pytest.raises(ValueError, match="holds no onnx/model.onnx; export it with"):
        onnx_client.resolve_onnx(str(tmp_path))


@pytest.mark.parametrize("missing", ["tf2onnx", "onnxruntime"])
def test_a_missing_runtime_is_one_clear_error(trained, exported, tmp_path, monkeypatch,
                                              missing):
    real_import = onnx_export.importlib.import_module

    def fail(name):
        if name == missing:
            raise ModuleNotFoundError(f"No module named '{missing}'")
        return real_import(name)

    monkeypatch.setattr(onnx_export.importlib, "import_module", fail)
    with pytest.raises(ValueError) as error:
        export_lib.export_model(trained, str(tmp_path / "e"), FASHION_CLASS_NAMES,
                                model_format="onnx")
    assert str(error.value) == (
        f"the ONNX format needs {missing}, which does not import (No module named "
        f"'{missing}'); pip install 'mlcrl_tf[onnx]' (tf2onnx and onnxruntime).")
    assert not os.path.exists(tmp_path / "e")  # refused before any work
    if missing == "onnxruntime":  # predict --format=onnx needs only onnxruntime
        with pytest.raises(ValueError, match="needs onnxruntime, which does not import"):
            predict_lib.predict_files(exported, [], model_format="onnx")


def test_onnx_of_a_bfloat16_model_is_refused(tmp_path):
    with precision_lib.dtype_policy("mixed_bfloat16"):
        model = build_model(FASHION_CLASSES, SMALL_BACKBONE, SIZE, "crl")
    with pytest.raises(ValueError, match="float32 models only"):
        export_lib.export_model(model, str(tmp_path / "e"), FASHION_CLASS_NAMES,
                                model_format="onnx")


def _write_run(tmp_path, model, demo_data):
    model_dir = str(tmp_path / "run")
    os.makedirs(model_dir)
    config = config_lib.Config(model_dir=model_dir, train_files=demo_data["train_files"],
                               eval_files=demo_data["test_files"], backbone=SMALL_BACKBONE,
                               variant="crl", image_size=SIZE, num_classes=FASHION_CLASSES)
    run_files.write_run(model_dir, config, FASHION_CLASS_NAMES)
    tf.train.Checkpoint(model=model).save(os.path.join(model_dir, "ckpt"))
    return model_dir


def test_cli_exports_onnx_checked_on_the_runs_images(trained, tmp_path, demo_data):
    model_dir = _write_run(tmp_path, trained, demo_data)
    export_dir = str(tmp_path / "saved")
    proc = run_module("mlcrl_tf.export", [f"--model_dir={model_dir}",
                                          f"--export_dir={export_dir}", "--format=onnx",
                                          "--verbosity=0"])
    path = os.path.join(export_dir, "1")
    assert f"ONNX model: {path}/onnx/model.onnx" in proc.stdout
    assert "ONNX model checked on 8 image(s)" in proc.stderr  # the run's test images
    assert "random pixels" not in proc.stderr
    images = fashion_canvases(4, SIZE, SIZE, seed=3)[0].astype(np.float32)
    got = onnx_export.run_logits(onnx_export.session(os.path.join(path, "onnx", "model.onnx")),
                                 images, 64)
    np.testing.assert_allclose(got, _saved_model_logits(path, images), atol=1e-4)


def test_cli_without_tf2onnx_is_one_error_line(trained, tmp_path, demo_data):
    model_dir = _write_run(tmp_path, trained, demo_data)
    code = ("import runpy, sys; sys.modules['tf2onnx'] = None; "
            "sys.argv = ['mlcrl_tf.export'] + sys.argv[1:]; "
            "runpy.run_module('mlcrl_tf.export', run_name='__main__')")
    proc = subprocess.run(
        [sys.executable, "-c", code, f"--model_dir={model_dir}",
         f"--export_dir={tmp_path / 'saved'}", "--format=onnx"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("Exporting")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: the ONNX format needs tf2onnx, which does not import")
    assert lines[0].endswith("; pip install 'mlcrl_tf[onnx]' (tf2onnx and onnxruntime).")
    assert not os.path.exists(tmp_path / "saved" / "1")

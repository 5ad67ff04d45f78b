"""Tests for mlcrl_tf.predict: labels real image files through an export,
reports bad files without aborting, and the CLI end to end."""

import io
import json
import os
import subprocess
import sys

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mlcrl_tf.modeling.model import build_model
from mlcrl_tf.serving import export_client
from mlcrl_tf.serving import export_lib
from mlcrl_tf.serving import predict_lib as predict
from pipelines.demo import fashion_mnist
from pipelines.tfdata.decoder import decode_image
from pipelines.tfdata.preprocessing import preprocess_eval

from helpers import train_briefly

NUM_CLASSES = 10
SIZE = 64
BACKBONE = "small_cnn"
CLASS_NAMES = list(fashion_mnist.CLASS_NAMES)
THRESHOLD = 0.45
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _canvases(count, height, width, seed):
    """Real Fashion-MNIST items (2-3 per canvas) on dark RGB canvases."""
    items, item_labels = fashion_mnist.load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    canvases = np.zeros((count, height, width, 3), np.uint8)
    multi_hot = np.zeros((count, NUM_CLASSES), np.float32)
    for b in range(count):
        for idx in rng.choice(len(items), rng.integers(2, 4), replace=False):
            y, x = rng.integers(0, height - 27), rng.integers(0, width - 27)
            patch = canvases[b, y:y + 28, x:x + 28]
            np.maximum(patch, items[idx][:, :, None], out=patch)
            multi_hot[b, item_labels[idx]] = 1.0
    return canvases, multi_hot


def _encode(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A briefly trained crl model, its export and a tree of image files."""
    keras.utils.set_random_seed(0)
    model = build_model(NUM_CLASSES, BACKBONE, SIZE, "crl")
    images, labels = _canvases(16, SIZE, SIZE, seed=1)
    train_briefly(model, images.astype(np.float32), labels)
    root = tmp_path_factory.mktemp("predict")
    saved = export_lib.export_model(model, str(root / "saved"), CLASS_NAMES,
                                    threshold=THRESHOLD)
    # A directory tree: nested folders, upper-case extensions, a non-image
    # file, a corrupt .jpg and a truncated .png.
    tree = root / "images"
    (tree / "a" / "b").mkdir(parents=True)
    pictures, _ = _canvases(4, 80, 100, seed=2)
    files = {
        tree / "one.jpg": _encode(pictures[0], "JPEG"),
        tree / "a" / "two.PNG": _encode(pictures[1], "PNG"),
        tree / "a" / "b" / "three.jpeg": _encode(pictures[2], "JPEG"),
        tree / "a" / "b" / "four.bmp": _encode(pictures[3], "BMP"),
        tree / "a" / "corrupt.jpg": b"\xff\xd8\xff\xe0 definitely not a JPEG body",
        tree / "a" / "b" / "truncated.png": _encode(pictures[0], "PNG")[:300],
        tree / "notes.txt": b"not an image, not even looked at",
    }
    for path, data in files.items():
        path.write_bytes(data)
    good = [str(tree / "one.jpg"), str(tree / "a" / "two.PNG"),
            str(tree / "a" / "b" / "three.jpeg"), str(tree / "a" / "b" / "four.bmp")]
    return {"model": model, "saved": saved, "tree": str(tree), "good": good,
            "corrupt": str(tree / "a" / "corrupt.jpg"),
            "truncated": str(tree / "a" / "b" / "truncated.png")}


def _expected_probabilities(model, path):
    with open(path, "rb") as f:
        image = preprocess_eval(decode_image(f.read()), SIZE)
    return tf.sigmoid(model.inference_model(image[None], training=False))[0].numpy()


def test_find_images_walks_recursively(setup):
    found = [p for p, error in predict.find_images([setup["tree"]]) if error is None]
    assert sorted(found) == sorted(setup["good"] + [setup["corrupt"], setup["truncated"]])
    missing = predict.find_images(["/no/such/file.jpg"])
    assert missing == [("/no/such/file.jpg", "no such file or directory")]


def test_labels_equal_the_live_model_and_bad_files_are_reported(setup):
    paths = [setup["good"][0], setup["corrupt"], setup["good"][1], setup["truncated"],
             setup["good"][2], "/no/such/image.png", setup["good"][3]]
    records = predict.predict_files(setup["saved"], paths, batch_size=4,
                                    all_probabilities=True)
    assert [r["filename"] for r in records] == paths
    errors = {r["filename"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {setup["corrupt"], setup["truncated"], "/no/such/image.png"}
    assert "corrupt or truncated" in errors[setup["corrupt"]]
    assert "no such file" in errors["/no/such/image.png"]
    labelled = [r for r in records if "error" not in r]
    assert len(labelled) == 4
    any_label = False
    for record in labelled:
        p = _expected_probabilities(setup["model"], record["filename"])
        got = np.array([record["probabilities"][n] for n in CLASS_NAMES])
        np.testing.assert_allclose(got, p, atol=1e-5)
        expected = [CLASS_NAMES[i] for i in np.argsort(-p, kind="stable") if p[i] >= THRESHOLD]
        assert record["labels"] == expected
        np.testing.assert_allclose(record["scores"], [p[CLASS_NAMES.index(n)]
                                                      for n in expected], atol=1e-5)
        any_label |= bool(expected)
    assert any_label, "the export's threshold labelled nothing; the test proves little"


def test_top_k_and_threshold_choices(setup):
    path = setup["good"][0]
    p = _expected_probabilities(setup["model"], path)
    [record] = predict.predict_files(setup["saved"], [path], top_k=3)
    assert record["labels"] == [CLASS_NAMES[i] for i in np.argsort(-p, kind="stable")[:3]]
    [record] = predict.predict_files(setup["saved"], [path], threshold=0.01)
    assert record["labels"] == [CLASS_NAMES[i] for i in np.argsort(-p, kind="stable")
                                if p[i] >= 0.01]
    with pytest.raises(ValueError, match="not both"):
        predict.predict_files(setup["saved"], [path], threshold=0.5, top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        predict.predict_files(setup["saved"], [path], top_k=NUM_CLASSES + 1)
    with pytest.raises(ValueError, match="saved_model"):
        predict.predict_files(setup["tree"], [path])


def test_base_directory_uses_the_highest_version(setup):
    base = os.path.dirname(setup["saved"])
    assert export_client.resolve_saved_model(base) == setup["saved"]


def test_run_exit_code_is_one_when_nothing_is_labelled(setup, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    code = predict.run(setup["saved"], [setup["corrupt"], setup["truncated"]],
                       stdout=out, stderr=err)
    assert code == 1
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all("error" in line for line in lines) and len(lines) == 2
    assert "corrupt.jpg" in err.getvalue()


def test_cli_on_a_directory_tree(setup, tmp_path):
    output = tmp_path / "preds.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "mlcrl_tf.predict", f"--saved_model={setup['saved']}",
         setup["tree"], "--batch_size=3", f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    by_name = {r["filename"]: r for r in records}
    assert set(by_name) == set(setup["good"]) | {setup["corrupt"], setup["truncated"]}
    for path in setup["good"]:
        assert set(by_name[path]) == {"filename", "labels", "scores"}
    assert "error" in by_name[setup["corrupt"]] and "error" in by_name[setup["truncated"]]
    assert "corrupt.jpg" in proc.stderr and "Labelled 4 image(s), 2 error(s)" in proc.stderr


def test_bad_export_leaves_no_output_file(setup, tmp_path):
    """The export and the options are checked before --output is created."""
    output = tmp_path / "out" / "preds.jsonl"
    with pytest.raises(ValueError, match="saved_model"):
        predict.run(setup["tree"], [setup["good"][0]], output=str(output),
                    stdout=io.StringIO(), stderr=io.StringIO())
    assert not output.exists()
    with pytest.raises(ValueError, match="top_k"):
        predict.run(setup["saved"], [setup["good"][0]], top_k=NUM_CLASSES + 1,
                    output=str(output), stdout=io.StringIO(), stderr=io.StringIO())
    assert not output.exists()


def test_nan_probabilities_are_written_as_null():
    """A model that outputs NaN: strict JSON lines (null), not the NaN token."""
    record = predict._record("a.jpg", [float("nan"), 2.0], ["x", "y"], 0.5, None, True)
    out, err = io.StringIO(), io.StringIO()
    assert predict._write_records([record], out, err) == (1, 0)

    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    line = json.loads(out.getvalue(), parse_constant=refuse)
    assert line["labels"] == ["y"] and line["probabilities"]["x"] is None


def test_cli_unreadable_export_is_one_error_line(setup, tmp_path):
    """A saved_model.pb that does not parse (OSError): `error: ...`, no traceback."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel protocol buffer")
    output = tmp_path / "preds.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "mlcrl_tf.predict", f"--saved_model={broken}",
         setup["good"][0], f"--output={output}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "saved_model.pb" in proc.stderr and not output.exists()

"""What the commands write, under faults of the second campaign: outputs on a
full disk replace nothing, URL paths (`ram://`) go through tf.io.gfile (never
a local `ram:` folder), a `file://` model_dir is locked, and serve_tensor
refuses a wrong shape in one INVALID_ARGUMENT (docs/reliability.md)."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.evaluation import evaluate_lib
from mlcrl_tf.evaluation import visualize_lib
from mlcrl_tf.modeling.model import build_model
from mlcrl_tf.run_dir import run_lock
from mlcrl_tf.serving import contract
from mlcrl_tf.serving import export_client
from mlcrl_tf.serving import export_lib
from mlcrl_tf.serving import predict_lib
from mlcrl_tf.training import train_lib

from conftest import fill_disk
from conftest import small_config
from helpers import FASHION_CLASS_NAMES
from helpers import encode_image
from helpers import fashion_canvases
from helpers import train_briefly

SIZE = 32


@pytest.fixture(scope="module")
def model():
    images, labels = fashion_canvases(8, SIZE, SIZE, seed=3)
    return train_briefly(build_model(10, "small_cnn", SIZE, "crl"),
                         images.astype(np.float32), labels, steps=2)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    images, _ = fashion_canvases(3, 40, 48, seed=4)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"p{i}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(encode_image(image, "JPEG"))
    return paths


@pytest.fixture(scope="module")
def evaluated(crl_run):
    return evaluate_lib.evaluate_target(model_dir=crl_run.model_dir, keep_scores=True)


# ---------------------------------------------------------------------------
# A full disk replaces nothing.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["output_scores", "output_json"])
def test_evaluate_outputs_on_a_full_disk_keep_the_previous_file(evaluated, small_disk,
                                                                writer):
    """Failed before: the previous file was destroyed and a truncated one left."""
    result, class_names, name = evaluated
    path = small_disk / f"previous.{writer}"
    path.write_bytes(b"the previous file")
    fill_disk(small_disk, leave=0)
    with pytest.raises(OSError, match="No space left on device"):
        if writer == "output_scores":
            evaluate_lib.write_scores(result, class_names, str(path))
        else:
            evaluate_lib.write_json(result, class_names, name, str(path))
    assert path.read_bytes() == b"the previous file"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", path.name]


# ---------------------------------------------------------------------------
# URL paths go through tf.io.gfile.
# ---------------------------------------------------------------------------

def test_an_export_to_ram_holds_its_saved_model_and_serves(model, photos, tmp_path,
                                                          monkeypatch):
    """Failed before: "Exported" with a version directory holding no
    saved_model.pb (the rename of a ram:// directory leaves its files)."""
    monkeypatch.chdir(tmp_path)
    path = export_lib.export_model(model, "ram://exports/outfits", FASHION_CLASS_NAMES)
    assert path == "ram://exports/outfits/1"
    assert tf.io.gfile.exists(f"{path}/saved_model.pb")
    client = export_client.ExportClient(path)
    kept, logits, problems = client.score([open(p, "rb").read() for p in photos])
    assert kept == [0, 1, 2] and logits.shape == (3, 10) and not problems
    assert export_lib.export_model(model, "ram://exports/outfits",
                                   FASHION_CLASS_NAMES).endswith("/2")
    assert os.listdir(tmp_path) == []  # no local "ram:" folder


def test_predict_evaluate_and_visualize_write_to_ram(model, photos, evaluated, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    export = export_lib.export_model(model, "ram://predict/outfits", FASHION_CLASS_NAMES)
    assert predict_lib.run(export, photos, output="ram://out/preds.jsonl",
                           stderr=io.StringIO()) == 0
    lines = tf.io.gfile.GFile("ram://out/preds.jsonl").read().splitlines()
    assert len(lines) == 3
    with pytest.raises(ValueError, match="already exists"):
        predict_lib.run(export, photos, output="ram://out/preds.jsonl",
                        stderr=io.StringIO())
    result, class_names, name = evaluated
    evaluate_lib.write_json(result, class_names, name, "ram://out/eval.json")
    evaluate_lib.write_scores(result, class_names, "ram://out/scores.npz")
    assert tf.io.gfile.exists("ram://out/eval.json") and tf.io.gfile.exists(
        "ram://out/scores.npz")
    written, problems = visualize_lib.visualize_files(model, FASHION_CLASS_NAMES, photos[:1],
                                                      "ram://cams", top_k=1)
    assert len(written) == 1 and not problems and tf.io.gfile.exists(written[0])
    assert os.listdir(tmp_path) == []


def test_a_run_on_ram_trains_and_exports(demo_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = small_config(demo_data, "ram://runs/outfits", steps_per_epoch=2,
                          export_dir="ram://exports/run")
    result = train_lib.train_and_evaluate(config)
    assert result["step"] == 2 and result["export_path"] == "ram://exports/run/1"
    assert tf.io.gfile.exists("ram://runs/outfits/run.json")
    assert tf.io.gfile.exists("ram://exports/run/1/saved_model.pb")
    assert os.listdir(tmp_path) == []


def test_a_file_url_model_dir_is_locked(tmp_path):
    """Failed before: `file://` skipped the lock, so two runs wrote one directory."""
    url = f"file://{tmp_path}"
    with run_lock.run_lock(url, is_chief=True) as lock:
        assert isinstance(lock, run_lock.RunLock) and (tmp_path / ".lock").exists()
        with pytest.raises(ValueError, match="is in use by pid"):
            with run_lock.run_lock(url, is_chief=True):
                pass
        run_lock.check_lock(url)  # found under its local path
    assert not (tmp_path / ".lock").exists()


# ---------------------------------------------------------------------------
# serve_tensor: a wrong shape is one INVALID_ARGUMENT.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 16, 16, 3), (2, SIZE, SIZE, 1), (SIZE, SIZE, 3),
                                   (1, 1, SIZE, SIZE, 3)])
def test_serve_tensor_names_the_expected_shape(model, tmp_path, shape):
    """Failed before: an error deep in the network (or a binding error)."""
    path = export_lib.export_model(model, str(tmp_path / "e"), FASHION_CLASS_NAMES)
    serve = tf.saved_model.load(path).signatures[contract.SERVE_TENSOR]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=rf"images: the batch has shape.*expected \(B, {SIZE}, {SIZE}, 3\)"):
        serve(images=tf.zeros(shape, tf.float32))
    out = serve(images=tf.fill([2, SIZE, SIZE, 3], 100.0))
    assert out["logits"].shape == (2, 10)

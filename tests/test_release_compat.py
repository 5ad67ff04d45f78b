"""Files written by release 0.1's own code still work with today's code.

Release 0.1 is checked out with `git archive` and runs
`tests/fixtures/write_release_0_1_files.py`, which converts a small real
dataset, trains and exports a run and saves a `.keras` file. Today's code
then reads the shards, evaluates, resumes and exports the run, predicts with
the export and loads the `.keras` file, and gets what 0.1 computed.
"""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.evaluation import evaluate_lib
from mlcrl_tf.modeling import optim
from mlcrl_tf.run_dir import checkpoints
from mlcrl_tf.run_dir import restore
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.serving import export_client
from mlcrl_tf.serving import export_lib
from mlcrl_tf.serving import predict_lib
from mlcrl_tf.training import train_lib
from pipelines.records import label_maps
from pipelines.records import shard_sets
from pipelines.tfdata import input_pipeline

from conftest import REPO

# The last commit of release 0.1 (main before the layout of issue 19).
RELEASE_0_1 = "8ddb321c3051255a773d4080c6d7f791c6f9c42a"
SCRIPT = os.path.join(REPO, "tests", "fixtures", "write_release_0_1_files.py")


def _git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, check=False)


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """The files release 0.1 wrote (see the module docstring)."""
    if _git("cat-file", "-e", f"{RELEASE_0_1}^{{commit}}").returncode != 0:
        pytest.fail(f"release 0.1 ({RELEASE_0_1}) is not in this clone's history: "
                    "clone with history (not --depth) to run the compatibility tests")
    source = tmp_path_factory.mktemp("release_0_1")
    archive = _git("archive", "--format=tar", RELEASE_0_1)
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    out = tmp_path_factory.mktemp("written_by_0_1")
    env = dict(os.environ, PYTHONPATH=str(source), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, SCRIPT, str(out)], cwd=source, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "expected.json", encoding="utf-8") as f:
        expected = json.load(f)
    return {"dir": out, "expected": expected,
            "records": str(out / "data" / "tfrecords"), "run": str(out / "run"),
            "export": str(out / "export" / "1")}


def _copy_run(release_files, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(release_files["run"], run)
    return run


def _test_images(release_files, count=16):
    pattern = os.path.join(release_files["records"], "test-*.tfrecord")
    batch = next(iter(input_pipeline.make_dataset(pattern, count, 32, 10, training=False)))
    return batch["images"].numpy()


def test_the_shards_read_as_they_did(release_files):
    records = release_files["records"]
    files = shard_sets.find_shards(os.path.join(records, "test-*.tfrecord"))
    assert shard_sets.count_records(files) == 16
    assert label_maps.class_names_for_shards(files) == release_files["expected"]["class_names"]
    dataset = input_pipeline.make_dataset(os.path.join(records, "train-*.tfrecord"), 8, 32,
                                          10, training=False)
    assert sum(len(batch["labels"]) for batch in dataset) == 32


def test_the_run_restores_and_evaluates(release_files):
    model, config, class_names, _ = restore.restore_model(release_files["run"])
    assert class_names == release_files["expected"]["class_names"]
    logits = model.inference_model(_test_images(release_files)).numpy()
    np.testing.assert_allclose(logits, release_files["expected"]["logits"], atol=1e-5)
    result, _, _ = evaluate_lib.evaluate_target(model_dir=release_files["run"])
    assert result.num_examples == 16 and 0.0 <= result.metrics["mAP"] <= 1.0
    assert config.variant == "crl" and run_files.read_best_metrics(
        os.path.join(release_files["run"], "best", "metrics.json")) is not None


def test_the_run_resumes_with_each_momentum_buffer_on_its_variable(release_files,
                                                                  tmp_path):
    """Optimizer slots are stored by position: the variables must come in
    0.1's order, or a buffer of one variable lands on another (where the
    shapes agree, silently)."""
    run = _copy_run(release_files, tmp_path)
    config = run_files.read_run(run)[0].replace(model_dir=run)
    model = restore.build_model_for(config)
    optimizer = optim.make_optimizer(model, 0.05, 0.05)
    step = tf.Variable(0, dtype=tf.int64)
    tf.train.Checkpoint(model=model, optimizer=optimizer, step=step).restore(
        checkpoints.resolve_checkpoint(run)).expect_partial()
    sums = {v.path: float(np.abs(optimizer.momentum_buffers[
        optimizer._get_variable_index(v)].numpy()).sum()) for v in model.trainable_variables}
    expected = release_files["expected"]["momentum_abs_sums"]
    assert list(sums) == list(expected)
    np.testing.assert_allclose(list(sums.values()), list(expected.values()), rtol=1e-6)
    result = train_lib.train_and_evaluate(config.replace(epochs=2, export_dir=None))
    assert int(step.numpy()) == release_files["expected"]["step"] == 3
    assert result["step"] == 6


def test_the_export_serves_and_the_run_exports_again(release_files, tmp_path):
    client = export_client.ExportClient(release_files["export"])
    assert client.class_names == release_files["expected"]["class_names"]
    images = sorted(os.path.join(release_files["dir"], "data", "images", "test", name)
                    for name in os.listdir(os.path.join(release_files["dir"], "data",
                                                        "images", "test")))[:4]
    records = predict_lib.predict_files(release_files["export"], images)
    assert [r["filename"] for r in records] == images and all("labels" in r for r in records)
    path = export_lib.export_from_model_dir(_copy_run(release_files, tmp_path),
                                            str(tmp_path / "export"))
    ours = export_client.ExportClient(path)
    theirs_logits = client.score([open(p, "rb").read() for p in images])[1]
    ours_logits = ours.score([open(p, "rb").read() for p in images])[1]
    np.testing.assert_allclose(ours_logits, theirs_logits, atol=1e-5)


def test_the_keras_file_loads_compiled(release_files):
    model = keras.saving.load_model(os.path.join(release_files["dir"], "model.keras"))
    logits = model.inference_model(_test_images(release_files)).numpy()
    np.testing.assert_allclose(logits, release_files["expected"]["keras_logits"], atol=1e-5)
    assert type(optim.inner_optimizer(model.optimizer)).__name__ == "PaperSGD"

"""Tests of mlcrl_tf.evaluate: the library, the CLI on a checkpoint and on an
export (same numbers), skipped records, and clear errors."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_module
from mlcrl_tf import checkpoints
from mlcrl_tf import config as config_lib
from mlcrl_tf import evaluate
from mlcrl_tf import export
from mlcrl_tf import metrics
from mlcrl_tf import train_lib
from pipelines import input_pipeline
from pipelines import tfrecord_lib


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """A small crl run (a few real steps) and its export."""
    root = tmp_path_factory.mktemp("eval")
    config = config_lib.Config(
        model_dir=str(root / "run"), train_files=demo_data["train_files"],
        eval_files=demo_data["test_files"], backbone="small_cnn", image_size=48,
        batch_size=8, epochs=1, steps_per_epoch=4, learning_rate=0.05,
        backbone_learning_rate=0.05, num_summary_images=0, log_every_steps=2)
    train_lib.train_and_evaluate(config)
    model, config, class_names, _ = checkpoints.restore_model(config.model_dir)
    export_path = export.export_model(model, str(root / "export"), class_names,
                                      backbone=config.backbone)
    return {"config": config, "model": model, "class_names": class_names,
            "export": export_path, "root": root}


def test_evaluate_model_equals_metrics_on_all_predictions(trained, demo_data):
    config, model = trained["config"], trained["model"]
    dataset = input_pipeline.make_dataset(demo_data["test_files"], 5, 48, 10, "small_cnn",
                                          training=False)
    result = evaluate.evaluate_model(model, dataset, 10, num_samples=3)
    batches = list(dataset.as_numpy_iterator())
    images = np.concatenate([b["images"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    probabilities = tf.sigmoid(model.inference_model(images)).numpy()
    expected = metrics.multilabel_metrics(probabilities, labels)
    assert result.num_examples == 32 == len(labels)
    for key, value in result.metrics.items():
        assert value == pytest.approx(expected[key], abs=1e-6), key
    np.testing.assert_allclose(result.per_class_ap, expected["AP"], atol=1e-6)
    assert result.samples["images"].shape == (3, 48, 48, 3)
    assert config.num_classes == 10


def test_cli_on_checkpoint_and_on_export_agree(trained, demo_data, tmp_path):
    model_dir = trained["config"].model_dir
    out_ckpt, out_export = tmp_path / "ckpt.json", tmp_path / "export.json"
    proc = run_module("mlcrl_tf.evaluate", [f"--model_dir={model_dir}", "--per_class",
                                            f"--output_json={out_ckpt}"])
    header = proc.stdout.splitlines()
    table = "\n".join(header)
    for column in ("mAP", "CF1", "CP", "CR", "OF1", "OP", "OR"):
        assert column in table
    assert "Bag" in table and "Ankle boot" in table  # Table 2 per-class row
    run_module("mlcrl_tf.evaluate", [f"--saved_model={trained['export']}",
                                     f"--eval_files={demo_data['test_files']}",
                                     f"--output_json={out_export}"])
    a, b = json.loads(out_ckpt.read_text()), json.loads(out_export.read_text())
    assert a["num_examples"] == b["num_examples"] == 32
    for key in a["metrics"]:
        assert b["metrics"][key] == pytest.approx(a["metrics"][key], abs=1e-5), key


def test_undecodable_record_is_skipped_and_counted(trained, demo_data, tmp_path):
    """A garbage image among the eval records: skipped and counted, both paths."""
    files = tfrecord_lib.find_shards(demo_data["test_files"])
    records = list(tf.data.TFRecordDataset(files).as_numpy_iterator())[:6]
    bad = tfrecord_lib.make_example(b"not an image", "bad.jpg", [1, 2]).SerializeToString()
    path = str(tmp_path / "test-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for record in records[:3] + [bad] + records[3:]:
            writer.write(record)
    counter = input_pipeline.SkipCounter()
    dataset = input_pipeline.make_dataset(path, 4, 48, 10, "small_cnn", training=False,
                                          skip_counter=counter)
    result = evaluate.evaluate_model(trained["model"], dataset, 10, skip_counter=counter)
    assert (result.num_examples, result.num_skipped) == (6, 1)
    exported = evaluate.evaluate_saved_model(trained["export"], path, 10, batch_size=4)
    assert (exported.num_examples, exported.num_skipped) == (6, 1)
    for key in result.metrics:
        assert exported.metrics[key] == pytest.approx(result.metrics[key], abs=1e-5), key


def test_cli_errors_are_one_line(tmp_path):
    proc = run_module("mlcrl_tf.evaluate", [f"--model_dir={tmp_path}"], check=False)
    assert proc.returncode != 0 and "run.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_checkpoint_is_a_clear_error(trained, tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint"):
        checkpoints.restore_model(trained["config"].model_dir,
                                  checkpoint=str(tmp_path / "ckpt-99"))
    with pytest.raises(ValueError, match="model_dir"):
        checkpoints.read_run(str(tmp_path))


def test_format_report_has_table_rows(trained):
    result = evaluate.EvalResult(metrics={k: 0.5 for k in (
        "mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CP_top3", "CR_top3", "CF1_top3",
        "OP_top3", "OR_top3", "OF1_top3")}, per_class_ap=[0.25] * 10, num_examples=1)
    text = evaluate.format_report(result, trained["class_names"], "crl", per_class=True)
    assert "| crl |" in text and "50.0" in text and "25.0" in text
    assert os.linesep in text or "\n" in text

"""Tests of mlcrl_tf.evaluate: the library, the CLI on a checkpoint and on an
export (same numbers), skipped records, and clear errors."""

import json

import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.evaluation import evaluate_lib
from mlcrl_tf.evaluation import evaluator
from mlcrl_tf.evaluation import metrics
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import restore
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.serving import export_lib as export
from mlcrl_tf.training import train_lib
from pipelines.records import schema
from pipelines.records import shard_sets
from pipelines.tfdata import input_pipeline
from pipelines.tfdata import skip_counts

from conftest import run_module


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """A small crl run (a few real steps) and its export."""
    root = tmp_path_factory.mktemp("eval")
    config = config_lib.Config(
        model_dir=str(root / "run"), train_files=demo_data["train_files"],
        eval_files=demo_data["test_files"], backbone="small_cnn", image_size=48,
        batch_size=8, epochs=1, steps_per_epoch=4, learning_rate=0.05,
        backbone_learning_rate=0.05, num_summary_images=0, log_every_steps=2,
        backbone_weights=None, lr_decay_epochs=())
    train_lib.train_and_evaluate(config)
    model, config, class_names, _ = restore.restore_model(config.model_dir)
    export_path = export.export_model(model, str(root / "export"), class_names)
    return {"config": config, "model": model, "class_names": class_names,
            "export": export_path, "root": root}


def test_evaluate_model_equals_metrics_on_all_predictions(trained, demo_data):
    config, model = trained["config"], trained["model"]
    dataset = input_pipeline.make_dataset(demo_data["test_files"], 5, 48, 10,
                                          training=False)
    result = evaluator.evaluate_model(model, dataset, 10, num_samples=3)
    batches = list(dataset.as_numpy_iterator())
    images = np.concatenate([b["images"] for b in batches])
    labels = np.concatenate([b["labels"] for b in batches])
    logits = model.inference_model(images).numpy()
    expected = metrics.multilabel_metrics(logits, labels, from_logits=True)
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
    files = shard_sets.find_shards(demo_data["test_files"])
    records = list(tf.data.TFRecordDataset(files).as_numpy_iterator())[:6]
    bad = schema.make_example(b"not an image", "bad.jpg", [1, 2]).SerializeToString()
    path = str(tmp_path / "test-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for record in records[:3] + [bad] + records[3:]:
            writer.write(record)
    counter = skip_counts.SkipCounter()
    dataset = input_pipeline.make_dataset(path, 4, 48, 10, training=False,
                                          skip_counter=counter)
    result = evaluator.evaluate_model(trained["model"], dataset, 10, skip_counter=counter)
    assert (result.num_examples, result.num_skipped) == (6, 1)
    exported = evaluator.evaluate_saved_model(trained["export"], path, 10, batch_size=4)
    assert (exported.num_examples, exported.num_skipped) == (6, 1)
    for key in result.metrics:
        assert exported.metrics[key] == pytest.approx(result.metrics[key], abs=1e-5), key


class _SaturatingModel:
    """The trained model with its output layers scaled x200: logits far beyond 16.6."""

    def __init__(self, model, factor=200.0):
        for layer in (model.classifier, model.f_conv):
            for v in layer.weights:
                v.assign(v * factor)
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_checkpoint_and_export_evaluation_rank_saturated_logits(trained, demo_data, tmp_path):
    """Logits >= 16.6 saturate float32 probabilities; evaluation must rank the logits."""
    model, config, class_names, _ = restore.restore_model(trained["config"].model_dir)
    model = _SaturatingModel(model).model
    dataset = input_pipeline.make_dataset(demo_data["test_files"], 8, 48, 10,
                                          training=False)
    batches = list(dataset.as_numpy_iterator())
    logits = model.inference_model(np.concatenate([b["images"] for b in batches])).numpy()
    labels = np.concatenate([b["labels"] for b in batches])
    probabilities = tf.sigmoid(logits).numpy()
    assert np.mean(probabilities == 1.0) > 0.05 and np.abs(logits).max() > 40
    expected = metrics.multilabel_metrics(logits.astype(np.float64), labels, from_logits=True)
    flattened = metrics.multilabel_metrics(probabilities, labels)
    assert abs(flattened["mAP"] - expected["mAP"]) > 1e-3  # the test can tell them apart
    on_checkpoint = evaluator.evaluate_model(model, dataset, 10)
    export_path = export.export_model(model, str(tmp_path / "export"), class_names)
    on_export = evaluator.evaluate_saved_model(export_path, demo_data["test_files"], 10)
    for result in (on_checkpoint, on_export):
        assert result.metrics["mAP"] == pytest.approx(expected["mAP"], abs=1e-6)
        np.testing.assert_allclose(result.per_class_ap, expected["AP"], atol=1e-6)
        for key in ("CF1_top3", "OF1_top3", "CF1", "OF1"):
            assert result.metrics[key] == pytest.approx(expected[key], abs=1e-6), key


def test_output_scores_file(trained, demo_data, tmp_path):
    out = tmp_path / "scores.npz"
    run_module("mlcrl_tf.evaluate", [f"--model_dir={trained['config'].model_dir}",
                                     f"--output_scores={out}"])
    scores = np.load(out)
    assert scores["logits"].shape == scores["labels"].shape == (32, 10)
    assert scores["logits"].dtype == np.float32 and scores["difficult"].dtype == bool
    assert len(set(scores["filenames"])) == 32 and list(scores["class_names"])[8] == "Bag"
    recomputed = metrics.multilabel_metrics(scores["logits"], scores["labels"],
                                            from_logits=True)
    dataset = input_pipeline.make_dataset(demo_data["test_files"], 8, 48, 10,
                                          training=False)
    direct = evaluator.evaluate_model(trained["model"], dataset, 10)
    assert recomputed["mAP"] == pytest.approx(direct.metrics["mAP"], abs=1e-7)


def test_difficult_labels_are_ignored_by_every_metric(trained, demo_data, tmp_path):
    """VOC difficult: an (image, class) pair marked difficult counts neither way."""
    files = shard_sets.find_shards(demo_data["test_files"])
    path = str(tmp_path / "test-00000-of-00001.tfrecord")
    marked = 0
    with tf.io.TFRecordWriter(path) as writer:
        for i, record in enumerate(tf.data.TFRecordDataset(files).as_numpy_iterator()):
            example = tf.train.Example.FromString(record)
            feature = example.features.feature
            labels = list(feature[schema.LABEL_KEY].int64_list.value)
            difficult = labels[:1] if i % 2 == 0 else []
            marked += len(difficult)
            writer.write(schema.make_example(
                feature[schema.ENCODED_KEY].bytes_list.value[0],
                feature[schema.FILENAME_KEY].bytes_list.value[0].decode(),
                labels, difficult).SerializeToString())
    assert marked == 16
    dataset = input_pipeline.make_dataset(path, 8, 48, 10, training=False)
    batches = list(dataset.as_numpy_iterator())
    logits = trained["model"].inference_model(
        np.concatenate([b["images"] for b in batches])).numpy()
    labels = np.concatenate([b["labels"] for b in batches])
    difficult = np.concatenate([b["difficult"] for b in batches])
    assert difficult.sum() == 16 and np.all(labels[difficult] == 1)
    expected = metrics.multilabel_metrics(logits, labels, ignore=difficult, from_logits=True)
    unmasked = metrics.multilabel_metrics(logits, labels, from_logits=True)
    assert any(abs(expected[k] - unmasked[k]) > 1e-3 for k in ("mAP", "CR", "OR"))
    # Ignoring = deleting those entries: AP of each class on the kept rows only.
    for c in range(10):
        keep = ~difficult[:, c]
        if labels[keep, c].any():
            want = metrics.average_precision(logits[keep][:, [c]], labels[keep][:, [c]],
                                             from_logits=True)[0]
            assert expected["AP"][c] == pytest.approx(want, abs=1e-12)
    on_checkpoint = evaluator.evaluate_model(trained["model"], dataset, 10)
    on_export = evaluator.evaluate_saved_model(trained["export"], path, 10)
    for result in (on_checkpoint, on_export):
        for key, value in result.metrics.items():
            assert value == pytest.approx(expected[key], abs=1e-6), key


def test_cli_errors_are_one_line(tmp_path):
    proc = run_module("mlcrl_tf.evaluate", [f"--model_dir={tmp_path}"], check=False)
    assert proc.returncode != 0 and "run.json" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_checkpoint_is_a_clear_error(trained, tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint"):
        restore.restore_model(trained["config"].model_dir,
                                  checkpoint=str(tmp_path / "ckpt-99"))
    with pytest.raises(ValueError, match="model_dir"):
        run_files.read_run(str(tmp_path))


def test_format_report_has_table_rows(trained):
    keys = ("mAP", "CF1", "CP", "CR", "OF1", "OP", "OR", "CF1_top3", "CP_top3", "CR_top3",
            "OF1_top3", "OP_top3", "OR_top3")
    result = evaluator.EvalResult(metrics={k: (i + 1) / 100 for i, k in enumerate(keys)},
                                 per_class_ap=[0.25] * 9 + [float("nan")], num_examples=1)
    names = trained["class_names"]
    text = evaluate_lib.format_report(result, names, "crl", per_class=True)
    lines = text.splitlines()
    # Table 1: header, rule, one row with the 13 values in the paper's column order.
    assert lines[0] == "| method | " + " | ".join(keys) + " |"
    assert lines[2] == "| crl | " + " | ".join(f"{i + 1}.0" for i in range(13)) + " |"
    # Table 2: one column per class, then mAP over the classes with an AP.
    assert lines[4] == "| method | " + " | ".join(names) + " | mAP |"
    assert lines[6] == "| crl | " + " | ".join(["25.0"] * 9 + ["nan"]) + " | 25.0 |"
    assert len(lines) == 7
    assert "\n\n" not in evaluate_lib.format_report(result, names, "crl")


def _strict_json(text):
    """json.loads refusing the NaN / Infinity tokens (not JSON)."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_write_json_writes_nan_as_null(trained, tmp_path):
    """A class without positives has AP NaN: written as null, valid JSON."""
    names = trained["class_names"]
    result = evaluator.EvalResult(metrics={"mAP": 0.5, "CF1": float("nan"),
                                          "OF1": float("inf")},
                                 per_class_ap=[0.25] * 9 + [float("nan")], num_examples=3)
    path = tmp_path / "eval.json"
    evaluate_lib.write_json(result, names, "crl", str(path))
    payload = _strict_json(path.read_text())
    assert payload["per_class_ap"][names[9]] is None
    assert payload["per_class_ap"][names[0]] == 0.25
    assert payload["metrics"] == {"mAP": 0.5, "CF1": None, "OF1": None}


def test_export_evaluation_defaults_to_the_export_threshold(trained, demo_data, tmp_path,
                                                            monkeypatch):
    """Without --threshold an export is evaluated at its own threshold, and
    the SavedModel is loaded once."""
    model, class_names = trained["model"], trained["class_names"]
    path = export.export_model(model, str(tmp_path / "export"), class_names, threshold=0.2)
    at_02 = evaluator.evaluate_saved_model(path, demo_data["test_files"], 10, threshold=0.2)
    at_05 = evaluator.evaluate_saved_model(path, demo_data["test_files"], 10, threshold=0.5)
    assert at_02.metrics["OR"] != at_05.metrics["OR"]  # the test can tell them apart
    loads = []
    real_load = tf.saved_model.load
    monkeypatch.setattr(tf.saved_model, "load",
                        lambda *a, **k: loads.append(a) or real_load(*a, **k))
    result, _, _ = evaluate_lib.evaluate_target(saved_model=path,
                                            eval_files=demo_data["test_files"])
    assert len(loads) == 1
    assert result.metrics == at_02.metrics
    explicit, _, _ = evaluate_lib.evaluate_target(saved_model=path, threshold=0.5,
                                              eval_files=demo_data["test_files"])
    assert explicit.metrics == at_05.metrics


@pytest.mark.parametrize("threshold", [0, 0.0, 1.0, -0.5, float("nan")])
def test_threshold_outside_the_unit_interval_is_refused(trained, threshold):
    """An explicit 0 is not "no threshold": it is refused, before any work."""
    with pytest.raises(ValueError, match="threshold must be in"):
        evaluate_lib.evaluate_target(model_dir=trained["config"].model_dir,
                                 saved_model=trained["export"], threshold=threshold)


def test_export_evaluation_passes_data_dir(trained, demo_data, monkeypatch):
    """--data_dir reaches the record reader of an export's evaluation (TFDS)."""
    seen = []
    real = input_pipeline.make_record_dataset

    def spy(source, batch_size, num_classes, data_dir=None, **kwargs):
        seen.append(data_dir)
        return real(source, batch_size, num_classes, data_dir=data_dir, **kwargs)

    monkeypatch.setattr(input_pipeline, "make_record_dataset", spy)
    evaluate_lib.evaluate_target(saved_model=trained["export"], eval_files=demo_data["test_files"],
                             data_dir="/some/tfds_data")
    assert seen == ["/some/tfds_data"]


def _shard_with(records, directory):
    directory.mkdir()
    path = str(directory / "test-00000-of-00001.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    return path


@pytest.mark.parametrize("garbage", [b"\x0a\xff binary garbage", b"plain text"])
def test_a_record_that_is_not_an_example_is_skipped_and_counted_alike(trained, demo_data,
                                                                      tmp_path, garbage):
    """A record that is not a tf.Example: skipped and counted, by the export's
    evaluation exactly as by the checkpoint's (same metrics, same count), and
    the other records are all scored (not a TensorFlow traceback)."""
    files = shard_sets.find_shards(demo_data["test_files"])
    records = list(tf.data.TFRecordDataset(files).as_numpy_iterator())[:6]
    clean = _shard_with(records, tmp_path / "clean")
    dirty = _shard_with(records[:4] + [garbage] + records[4:], tmp_path / "dirty")
    reference = evaluator.evaluate_saved_model(trained["export"], clean, 10, batch_size=4)
    exported = evaluator.evaluate_saved_model(trained["export"], dirty, 10, batch_size=4)
    assert (reference.num_skipped, exported.num_skipped) == (0, 1)
    assert exported.num_examples == reference.num_examples == 6
    assert exported.metrics == reference.metrics
    checkpoint, _, _ = evaluate_lib.evaluate_target(model_dir=trained["config"].model_dir,
                                                eval_files=dirty, batch_size=4)
    assert (checkpoint.num_skipped, checkpoint.num_examples) == (1, 6)
    proc = run_module("mlcrl_tf.evaluate", [f"--saved_model={trained['export']}",
                                            f"--eval_files={dirty}"], check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "mAP" in proc.stdout and "1 undecodable skipped" in proc.stdout


def test_evaluate_model_traces_once_per_model(trained, demo_data):
    """The per-epoch evaluation reuses one traced function per model."""
    traces = []

    class Counting:
        def __init__(self, model):
            self.model = model

        def inference_model(self, images, training=False):
            traces.append(images.shape)
            return self.model.inference_model(images, training=training)

    model = Counting(trained["model"])
    dataset = input_pipeline.make_dataset(demo_data["test_files"], 5, 48, 10,
                                          training=False)
    first = evaluator.evaluate_model(model, dataset, 10)
    traced = len(traces)
    assert traced >= 1
    second = evaluator.evaluate_model(model, dataset, 10)
    assert len(traces) == traced
    assert first.metrics == second.metrics

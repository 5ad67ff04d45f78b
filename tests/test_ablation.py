"""Tests of the ablation driver (benchmarks/ablation/ablation.py) and its page
(benchmarks/ablation/ablation_page.py) on synthetic runs: no training, seconds.

The runs' files are faked exactly as the CLIs write them: the evaluate CLI's
`--output_scores` npz (filenames, logits, labels, difficult), run.json, the
TensorBoard scalars `metrics/mAP` under <model_dir>/eval."""

import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks", "ablation"))

# pylint: disable=wrong-import-position
import ablation  # noqa: E402
import ablation_page  # noqa: E402

# pylint: enable=wrong-import-position

C, N_TEST, N_TRAIN = 4, 120, 200
SEEDS = (0, 1, 2, 3, 4)
VARIANTS = ("baseline", "tbc", "mse", "crl")


def _campaign(tmp_path, **changes):
    values = dict(work_dir=str(tmp_path / "runs"), output=str(tmp_path / "docs" / "r.md"),
                  variants=VARIANTS, settings=("occluded",), seeds=SEEDS,
                  flagfile="configs/ablation.flags", canvas_size=64, num_train=N_TRAIN,
                  num_test=N_TEST, data_seed=0, pretrain_canvases=100, pretrain_epochs=1,
                  min_positives=5, command="python benchmarks/ablation/ablation.py --x")
    values.update(changes)
    return ablation.Campaign(**values)


def _data(rng, lowest_visible=0.25):
    """Test COCO dict with visible fractions, and train/test labels."""
    images, annotations, test = [], [], np.zeros((N_TEST, C), np.float32)
    for i in range(N_TEST):
        images.append({"id": i + 1, "file_name": f"test_{i:06d}.jpg"})
        for c in rng.choice(C, size=int(rng.integers(1, 4)), replace=False):
            annotations.append({"image_id": i + 1, "category_id": int(c) + 1,
                                "visible_fraction": float(rng.uniform(lowest_visible, 1.0))})
            test[i, c] = 1
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": f"class{k}"} for k in range(C)]}
    train = (rng.random((N_TRAIN, C)) < 0.4).astype(np.float32)
    return coco, train, test


def _write_json(path, payload):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)


def _fake_run(c, rng, variant, seed, test, boost, setting="occluded"):
    """Writes what a finished run leaves behind; returns its record."""
    name = c.run_name(setting, variant, seed)
    model_dir = c.path(name)
    os.makedirs(os.path.join(model_dir, "eval"), exist_ok=True)
    logits = rng.normal(0, 1, test.shape) + (1.0 + boost) * test
    np.savez(c.path(f"{name}.scores.npz"), filenames=np.array(
        [f"test_{i:06d}.jpg" for i in range(N_TEST)]), logits=logits.astype(np.float32),
        labels=test, difficult=np.zeros(test.shape, bool))
    config = {"epochs": 4, "batch_size": 32, "momentum": 0.9, "weight_decay": 1e-4,
              "learning_rate": 0.05, "backbone_learning_rate": 0.005,
              "lr_decay_factor": 0.1, "lr_decay_epochs": [2]}
    with open(os.path.join(model_dir, "run.json"), "w", encoding="utf-8") as f:
        json.dump({"config": config, "class_names": [f"class{k}" for k in range(C)]}, f)
    if variant == "crl":
        np.save(c.path(f"{name}.embeddings.npy"), rng.normal(size=(C, C)))
        _write_json(c.path(f"{name}.units.json"), [[2, 2], [1, 1], [2, 2]])
    if variant == "mse":  # collapsed, as the MSE ablation can: one embedding for all
        np.save(c.path(f"{name}.embeddings.npy"), np.tile(rng.normal(size=C), (C, 1)))
        _write_json(c.path(f"{name}.units.json"), [[2, 2], [1, 1], [0, 2]])
    maps = [0.5, 0.6, 0.65, 0.651 if seed else 0.66]  # seed 0 still rising
    return {"setting": setting, "variant": variant, "seed": seed, "commit": "abc1234",
            "metrics": {"mAP": 0.6 + 0.01 * boost + 0.001 * seed, "CF1": 0.5, "OF1": 0.55,
                        "CP": 0.5, "CR": 0.5, "OP": 0.5, "OR": 0.5},
            "per_class_ap": {}, "eval_maps": maps, "decay_epoch": 2,
            "train_seconds": 60.0, "total_seconds": 70.0}


def test_page_from_synthetic_runs(tmp_path):
    rng = np.random.default_rng(0)
    c = _campaign(tmp_path)
    coco, train, test = _data(rng)
    facts = {"occluded": ablation.facts_from(train, test, coco, c.min_positives)}
    runs = []
    for seed in SEEDS:
        for variant in VARIANTS:
            boost = 2.0 if variant == "crl" else 0.0  # crl clearly better
            record = _fake_run(c, rng, variant, seed, test, boost)
            runs.append(ablation.analyse_run(c, record, facts["occluded"]))
    figures = {"embeddings_occluded": ablation_page.write_embedding_figure(
        c, "occluded", runs, facts["occluded"])}
    ablation_page.write(c, runs, facts, {"settings": {
        "num_train": 100, "canvas_size": 64, "epochs": 1, "learning_rate": 0.05,
        "batch_size": 64, "num_test": 50}, "seconds": 60, "test_accuracy": 0.8,
        "train_accuracy_per_epoch": [0.7]}, 100.0, figures, "def5678")
    text = open(c.output, encoding="utf-8").read()
    # The rule comes before any verdict; crl's designed gain is detected.
    rule = text.index("## Protocol and verdict rule")
    assert rule < text.index("## Headline") < text.index("Verdicts")
    assert "crl − baseline: mean +2.00 mAP" in text
    assert text.count("**crl helps**") >= 6  # mAP and hidden AP vs 3 variants
    assert "**16 of 20 runs converged** (80 %)" in text
    assert "Single-item TEST accuracy" in text and "**80.0 %**" in text
    assert "Warning" not in text  # every run had the same flags
    assert "over the 6 class pairs" in text
    assert "in 5 of 5 seeds the label projector collapsed" in text
    assert ("mse's f_l: ReLU units active for at least one class, per hidden layer "
            "(of 2, 1, 2), per seed: 2/1/0, 2/1/0, 2/1/0, 2/1/0, 2/1/0; 5 of 5 seeds") in text
    assert "per seed: 2/1/2, 2/1/2, 2/1/2, 2/1/2, 2/1/2; 0 of 5 seeds" in text
    assert "| mse | 5 |" in text and "| undefined (5 collapsed) |" in text
    assert "| crl | 5 |" in text and "## Headline (for the README)" in text
    assert os.path.exists(os.path.join(tmp_path, "docs", figures["embeddings_occluded"]))
    hidden = runs[0]["hidden"]
    assert hidden["num_positives"].tolist() == facts["occluded"]["hidden_counts"].tolist()


def test_page_without_hidden_items(tmp_path):
    """The standard setting has no mostly-hidden items: hidden-label AP is n/a,
    with no verdict on it."""
    rng = np.random.default_rng(2)
    c = _campaign(tmp_path, settings=("standard",), seeds=(0, 1))
    coco, train, test = _data(rng, lowest_visible=0.9)
    facts = {"standard": ablation.facts_from(train, test, coco, c.min_positives)}
    runs = [ablation.analyse_run(c, _fake_run(c, rng, variant, seed, test, 0.0, "standard"),
                                 facts["standard"])
            for seed in (0, 1) for variant in VARIANTS]
    # One run reused from an invocation with another budget.
    run_json = os.path.join(c.path(c.run_name("standard", "crl", 1)), "run.json")
    with open(run_json, encoding="utf-8") as f:
        payload = json.load(f)
    payload["config"]["epochs"] = 6
    with open(run_json, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    ablation_page.write(c, runs, facts, {"settings": {
        "num_train": 100, "canvas_size": 64, "epochs": 1, "learning_rate": 0.05,
        "batch_size": 64, "num_test": 50}, "seconds": 60, "test_accuracy": 0.8,
        "train_accuracy_per_epoch": [0.7]}, 100.0, {}, "def5678")
    text = open(c.output, encoding="utf-8").read()
    assert "Hidden-label AP: n/a in this setting" in text
    assert "**Warning: the runs differ in epochs**" in text
    assert "hidden-label AP, 95 %" not in text and "nan" not in text
    assert text.count("\n- crl − ") == 3  # mAP verdicts only


def test_hidden_ap_refuses_scores_of_other_data(tmp_path):
    rng = np.random.default_rng(1)
    c = _campaign(tmp_path)
    coco, train, test = _data(rng)
    facts = ablation.facts_from(train, test, coco, c.min_positives)
    record = _fake_run(c, rng, "crl", 0, 1 - test, 0.0)  # wrong labels in the npz
    with pytest.raises(ValueError, match="differ from the annotations"):
        ablation.analyse_run(c, record, facts)


def test_read_eval_curve_orders_steps_and_keeps_the_last_value(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path / "eval"))
    with writer.as_default():
        for step, value in ((250, 0.55), (125, 0.5), (250, 0.56), (375, 0.6)):
            tf.summary.scalar("metrics/mAP", value, step=step)
            tf.summary.scalar("metrics/CF1", 0.1, step=step)
    writer.flush()
    curve = ablation.read_eval_curve(str(tmp_path))
    assert np.allclose(curve, [0.5, 0.56, 0.6])


def test_campaign_is_frozen(tmp_path):
    c = _campaign(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.seeds = (0,)
    assert c.run_name("standard", "crl", 3) == "standard_crl_seed3"


def test_page_only_writes_the_finished_runs_and_names_the_missing(tmp_path, monkeypatch):
    """--page_only trains nothing: a campaign stopped after seeds 0-1 and part
    of seed 2 gets a page of its finished runs that names the missing ones."""
    rng = np.random.default_rng(3)
    c = _campaign(tmp_path, page_only=True)
    coco, train, test = _data(rng)
    finished = [(seed, v) for seed in (0, 1) for v in VARIANTS] + [(2, "baseline")]
    for seed, variant in finished:
        record = _fake_run(c, rng, variant, seed, test, 2.0 if variant == "crl" else 0.0)
        with open(c.path(c.run_name("occluded", variant, seed) + ".json"), "w",
                  encoding="utf-8") as f:
            json.dump(record, f)
    weights = c.path("pretrain", "small_cnn_64.weights.h5")
    os.makedirs(os.path.dirname(weights))
    with open(weights + ".json", "w", encoding="utf-8") as f:
        json.dump({"settings": {"num_train": 100, "canvas_size": 64, "epochs": 1,
                                "learning_rate": 0.05, "batch_size": 64, "num_test": 50},
                   "seconds": 60, "test_accuracy": 0.8,
                   "train_accuracy_per_epoch": [0.7]}, f)

    def never(*args, **kwargs):
        raise AssertionError(f"--page_only ran {args}")

    monkeypatch.setattr(ablation, "run_command", never)
    monkeypatch.setattr(ablation, "train_and_evaluate", never)
    monkeypatch.setattr(ablation, "make_data", lambda c, setting: c.path("data"))
    monkeypatch.setattr(ablation, "setting_facts", lambda c, root: ablation.facts_from(
        train, test, coco, c.min_positives))
    monkeypatch.setattr(ablation_page, "write_cam_figure", lambda *args: None)
    runs = ablation.run_campaign(c)
    assert [(r["seed"], r["variant"]) for r in runs] == finished
    text = open(c.output, encoding="utf-8").read()
    missing = [c.run_name("occluded", v, s) for s in (2, 3, 4) for v in VARIANTS
               if (s, v) != (2, "baseline")]
    assert f"**Incomplete campaign: {len(missing)} planned run(s)" in text
    assert all(name in text for name in missing)
    assert "2–3 seed(s) per variant" in text and "Seeds 0, 1, 2;" in text

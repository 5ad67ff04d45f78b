"""Resuming a run: what is refused, and an evaluation the run never finished."""

import json
import os

import numpy as np
import pytest

from mlcrl_tf.run_dir import checkpoints
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import restore
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.training import train_lib
from pipelines.utils import files

from conftest import small_config


def _config(demo_data, model_dir, **overrides):
    """A small run of 2 epochs x 2 steps (one checkpoint and evaluation each)."""
    return small_config(demo_data, model_dir, **{"epochs": 2, "steps_per_epoch": 2,
                                                  **overrides})


def _run_json(model_dir):
    with open(os.path.join(model_dir, run_files.RUN_FILE), encoding="utf-8") as f:
        return json.load(f)


def test_an_evaluation_killed_after_the_checkpoint_runs_on_resume(demo_data, tmp_path):
    config = _config(demo_data, tmp_path / "run")
    first = train_lib.train_and_evaluate(config)
    assert first["metrics"] is not None
    evaluated = os.path.join(config.model_dir, run_files.EVALUATED_FILE)
    with open(evaluated, encoding="utf-8") as f:
        assert json.load(f) == {"step": 4}
    # As if killed during the last epoch's evaluation: its checkpoint (step 4)
    # exists, the evaluation record says epoch 1 (step 2).
    with open(evaluated, "w", encoding="utf-8") as f:
        json.dump({"step": 2}, f)
    again = train_lib.train_and_evaluate(config)
    assert again["step"] == 4
    assert again["metrics"] is not None  # evaluated now, not skipped
    assert again["metrics"]["mAP"] == pytest.approx(first["metrics"]["mAP"], abs=1e-9)
    with open(evaluated, encoding="utf-8") as f:
        assert json.load(f) == {"step": 4}
    # A finished and evaluated run has nothing left to do.
    assert train_lib.train_and_evaluate(config)["metrics"] is None


def test_a_refused_resume_leaves_run_json_alone(demo_data, tmp_path):
    config = _config(demo_data, tmp_path / "run", epochs=1)
    train_lib.train_and_evaluate(config)
    before = _run_json(config.model_dir)
    # The checkpoints hold no EMA: the resume fails, run.json must not claim one.
    with pytest.raises((ValueError, checkpoints.CheckpointError)):
        train_lib.train_and_evaluate(_config(demo_data, tmp_path / "run", epochs=2,
                                             ema_decay=0.5))
    assert _run_json(config.model_dir) == before
    with pytest.raises(ValueError, match="--antialias=True differs"):
        train_lib.train_and_evaluate(_config(demo_data, tmp_path / "run", epochs=2,
                                             antialias=True))
    assert _run_json(config.model_dir) == before


def test_a_run_json_without_antialias_predates_the_flag(tmp_path):
    model_dir = tmp_path / "old"
    model_dir.mkdir()
    config = config_lib.Config(model_dir=str(model_dir), num_classes=3)
    payload = {"config": {k: v for k, v in config.__dict__.items() if k != "antialias"},
               "class_names": ["a", "b", "c"], "format": run_files.RUN_FORMAT}
    (model_dir / run_files.RUN_FILE).write_text(json.dumps(payload))
    assert run_files.read_run(str(model_dir))[0].antialias is True


def test_a_checkpoint_without_what_run_json_describes_is_one_error(crl_run, tmp_path):
    """Failed before: an AssertionError traceback from TensorFlow."""
    saved, names = run_files.read_run(crl_run.model_dir)
    claims_ema = saved.replace(model_dir=str(tmp_path / "claims_ema"), ema_decay=0.5)
    os.makedirs(claims_ema.model_dir)
    run_files.write_run(claims_ema.model_dir, claims_ema, names)
    latest = checkpoints.resolve_checkpoint(crl_run.model_dir)
    with pytest.raises(ValueError, match=r"does not hold the model described by.*EMA"):
        restore.restore_model(claims_ema.model_dir, checkpoint=latest)
    model, _, _, path = restore.restore_model(claims_ema.model_dir, checkpoint=latest,
                                                  use_ema=False)
    assert path == latest and model.variant == "crl"


def test_run_files_are_strict_json(tmp_path):
    """best/metrics.json holds per-class AP, NaN for a class without positives:
    it was written as the invalid token NaN before."""
    path = str(tmp_path / "metrics.json")
    files.write_json_atomically(path, {"mAP": np.float32(0.5), "per_class_ap": [
        float("nan"), np.float64("inf"), 0.25], "step": 3, "ok": True})

    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    with open(path, encoding="utf-8") as f:
        payload = json.loads(f.read(), parse_constant=refuse)
    assert payload == {"mAP": 0.5, "per_class_ap": [None, None, 0.25], "step": 3,
                       "ok": True}

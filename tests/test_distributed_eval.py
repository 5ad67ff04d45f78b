"""Evaluation during training runs on every replica and every worker, and its
metrics equal one device's on the same weights (2 logical CPU devices under
MirroredStrategy; 2 local workers under MultiWorkerMirroredStrategy)."""

import json
import os
import subprocess
import sys

import pytest

from pipelines.tfdata import input_pipeline

from conftest import REPO
from conftest import free_port
from conftest import run_module

SMALL = ["--backbone=small_cnn", "--backbone_weights=", "--lr_decay_epochs=",
         "--image_size=48", "--batch_size=8", "--learning_rate=0.05",
         "--backbone_learning_rate=0.05", "--epochs=1", "--steps_per_epoch=3",
         "--num_summary_images=2"]
# Per-example logits must not depend on how a batch is split across replicas:
# oneDNN may pick another kernel for another batch size (last-bit changes).
EXACT = {"TF_ENABLE_ONEDNN_OPTS": "0"}


def _single_device_metrics(model_dir, tmp_path):
    out = tmp_path / "single.json"
    run_module("mlcrl_tf.evaluate", [f"--model_dir={model_dir}", f"--output_json={out}"],
               env=EXACT)
    return json.loads(out.read_text())


def _assert_equal_metrics(distributed, single):
    for key, value in single["metrics"].items():
        assert distributed[key] == pytest.approx(value, rel=0, abs=1e-12), key


def test_mirrored_evaluation_equals_one_device(demo_data, tmp_path):
    model_dir = tmp_path / "run"
    run_module("mlcrl_tf.train", SMALL + [
        f"--model_dir={model_dir}", f"--train_files={demo_data['train_files']}",
        f"--eval_files={demo_data['test_files']}", "--strategy=mirrored",
        "--num_cpu_devices=2"], env=EXACT)
    best = json.loads((model_dir / "best" / "metrics.json").read_text())
    assert best["step"] == 3
    _assert_equal_metrics(best["metrics"], _single_device_metrics(model_dir, tmp_path))


def test_two_workers_evaluate_every_image_once(demo_data, tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = tmp_path / "mw"
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **EXACT, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mlcrl_tf.train", *SMALL, "--strategy=multi_worker",
             f"--model_dir={model_dir}", f"--train_files={demo_data['train_files']}",
             f"--eval_files={demo_data['test_files']}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    finals = [out.split("Final eval: ")[1].splitlines()[0] for out, _ in outputs]
    assert finals[0] == finals[1]  # both workers computed the same metrics
    best = json.loads((model_dir / "best" / "metrics.json").read_text())
    _assert_equal_metrics(best["metrics"], _single_device_metrics(model_dir, tmp_path))


_IN_PROCESS = r"""
import json, sys
import numpy as np
import tensorflow as tf
from mlcrl_tf.evaluation import evaluator
from mlcrl_tf.modeling import model as model_lib
from mlcrl_tf.training import distribute
from pipelines.tfdata import input_pipeline

files = sys.argv[1]
strategy = distribute.make_strategy("mirrored", 2)
with strategy.scope():
    model = model_lib.build_model(10, "small_cnn", 48, "crl")
batches, steps = input_pipeline.eval_batches_per_pipeline(files, 6, 2)
fn = lambda ctx: input_pipeline.padded_eval_dataset(files, 6, 48, 10, ctx, batches)
sizes = [[int(tf.shape(x)[0]) for x in strategy.experimental_local_results(b["images"])]
         for b in strategy.distribute_datasets_from_function(fn)]
spread = evaluator.evaluate_distributed(model, strategy, fn, steps, 10)
one = evaluator.evaluate_model(model, input_pipeline.make_dataset(files, 6, 48, 10, False), 10)
print(json.dumps({"sizes": sizes, "steps": steps, "n": spread.num_examples,
                  "diff": max(abs(spread.metrics[k] - one.metrics[k]) for k in one.metrics)}))
"""


def test_each_replica_scores_its_share(demo_data):
    proc = subprocess.run([sys.executable, "-c", _IN_PROCESS, demo_data["test_files"]],
                          cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **EXACT),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # 32 images, 3 per replica-batch: 11 real batches + 1 empty, 6 steps each.
    assert result["steps"] == 6 and len(result["sizes"]) == 6
    assert all(len(step) == 2 for step in result["sizes"])
    assert sum(map(sum, result["sizes"])) == 32 == result["n"]
    assert sum(1 for step in result["sizes"] if min(step) > 0) >= 5  # both replicas busy
    assert result["diff"] < 1e-12


@pytest.mark.parametrize("replicas, pipelines, batch, expected", [
    (2, 1, 8, (8, 4)),    # 32 records, 4 per replica batch: 8 batches, 4 steps each
    (2, 2, 8, (4, 4)),    # 2 workers: 16 records each, 4 per batch
    (4, 2, 8, (8, 4)),    # 2 workers x 2 replicas: 2 per batch
    (2, 1, 6, (12, 6)),   # uneven: 11 batches of 3, padded to 12 (6 steps each)
])
def test_every_replica_runs_the_same_number_of_steps(demo_data, replicas, pipelines,
                                                     batch, expected):
    assert input_pipeline.eval_batches_per_pipeline(
        demo_data["test_files"], batch, replicas, pipelines) == expected

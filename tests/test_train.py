"""Tests of the training loop (mlcrl_tf.train / train_lib) on the real demo set.

The slow parts run `python -m mlcrl_tf.train` in subprocesses, as users do:
end to end with TensorBoard and checkpoints, SIGKILL + resume, 2-replica
MirroredStrategy and 2-worker MultiWorkerMirroredStrategy.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import restore
from mlcrl_tf.training import flagfiles
from mlcrl_tf.training import step_progress
from mlcrl_tf.training import train_flags
from mlcrl_tf.training import train_lib
from mlcrl_tf.training import trainer as trainer_lib

from conftest import REPO
from conftest import free_port
from conftest import run_module
from conftest import small_config

SMALL = ["--backbone=small_cnn", "--backbone_weights=", "--lr_decay_epochs=",
         "--image_size=48", "--batch_size=8",
         "--learning_rate=0.05", "--backbone_learning_rate=0.02", "--log_every_steps=1"]


def _event_tags(directory):
    """{tag: [(step, value or None)]} from the TensorBoard event files."""
    tags = {}
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                scalar = None
                if value.metadata.plugin_data.plugin_name == "scalars":
                    scalar = float(tf.make_ndarray(value.tensor))
                tags.setdefault(value.tag, []).append((event.step, scalar))
    return tags


def _image_counts(directory):
    """Number of images of each eval/cams summary, in step order."""
    counts = []
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag == "eval/cams":
                    counts.append((event.step, len(tf.make_ndarray(value.tensor)) - 2))
    return [n for _, n in sorted(counts)]


def _checkpoint_values(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if name.startswith("model/") and "OPTIMIZER_SLOT" not in name}


# ---------------------------------------------------------------------------
# End to end, as users run it.
# ---------------------------------------------------------------------------

def test_demo_flags_end_to_end(demo_data, tmp_path):
    model_dir = tmp_path / "run"
    export_dir = tmp_path / "export"
    proc = run_module("mlcrl_tf.train", [
        "--flagfile=configs/demo.flags", f"--model_dir={model_dir}",
        f"--train_files={demo_data['train_files']}",
        f"--eval_files={demo_data['test_files']}", "--image_size=48", "--batch_size=8",
        "--epochs=2", "--lr_decay_epochs=1", "--steps_per_epoch=3", "--log_every_steps=1",
        "--num_summary_images=6", f"--export_dir={export_dir}"])
    assert "Finished at step 6" in proc.stdout
    assert "\r" not in proc.stdout  # not a TTY: plain lines for log files
    # Checkpoints: latest K, and the best-by-mAP one with its metrics.
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-6")
    best = json.loads((model_dir / "best" / "metrics.json").read_text())
    assert set(best["metrics"]) >= {"mAP", "CF1", "OF1", "CF1_top3", "OP_top3"}
    assert len(best["per_class_ap"]) == 10
    run = json.loads((model_dir / "run.json").read_text())
    assert run["config"]["num_classes"] == 10 and run["class_names"][8] == "Bag"
    # TensorBoard: every loss term, both learning rates, throughput, metrics, images.
    train_tags = _event_tags(str(model_dir / "train"))
    for tag in ("loss/loss", "loss/classification", "loss/crl", "loss/crl_image_term",
                "loss/crl_label_term", "learning_rate/head", "learning_rate/backbone",
                "throughput/images_per_sec"):
        assert tag in train_tags, tag
    assert [s for s, _ in train_tags["loss/loss"]] == [1, 2, 3, 4, 5, 6]
    eval_tags = _event_tags(str(model_dir / "eval"))
    for name in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1", "CP_top3", "CR_top3",
                 "CF1_top3", "OP_top3", "OR_top3", "OF1_top3"):
        assert f"metrics/{name}" in eval_tags, name
        assert [s for s, _ in eval_tags[f"metrics/{name}"]] == [3, 6]
    assert any(t.startswith("per_class_ap/") for t in eval_tags)
    # --num_summary_images=6 panels per evaluation (it was capped at 4).
    assert _image_counts(str(model_dir / "eval")) == [6, 6]
    assert best["selected_on"] == "eval_files"  # no --selection_files: the test split
    # The export of the end of training.
    assert "Exported the inference model to" in proc.stdout
    assert (export_dir / "1" / "saved_model.pb").exists()


def test_flagfiles_parse():
    """Every flagfile under configs/ is valid and includes base.flags."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    paths = sorted(glob.glob(os.path.join(REPO, "configs", "*.flags")))
    assert any(p.endswith("coco_keras_hub.flags") for p in paths)
    for path in paths:
        values = flags.FlagValues()
        train_flags.define_flags(values)
        values(flagfiles.expand(
            ["train", f"--flagfile={path}", "--model_dir=x", "--train_files=y"]))
        config = train_flags.config_from_flags(values)
        config_lib.validate(config)
        if not path.endswith("base.flags"):
            text = open(path).read()
            # base.flags directly, or through demo.flags / coco.flags.
            assert any(f"--flagfile={parent}" in text
                       for parent in ("base.flags", "demo.flags", "coco.flags")), path
            assert open(path).read().startswith("#"), "states its command first"
        if path.endswith("coco_keras_hub.flags"):
            assert config.backbone == "keras_hub:resnet_101_imagenet"
        if path.endswith(("coco.flags", "voc.flags", "base.flags", "coco_keras_hub.flags")):
            assert (config.learning_rate, config.backbone_learning_rate) == (0.01, 0.001)
            assert (config.momentum, config.weight_decay, config.image_size) == (0.9, 1e-4, 448)
            assert (config.crl_margin, config.crl_image_weight) == (0.5, 0.5)


# ---------------------------------------------------------------------------
# Resume after SIGKILL.
# ---------------------------------------------------------------------------

def _resume_args(demo_data, model_dir):
    return SMALL + [
        f"--model_dir={model_dir}", f"--train_files={demo_data['train_files']}",
        "--epochs=2", "--steps_per_epoch=12", "--lr_decay_epochs=1",
        "--checkpoint_every_steps=2", "--deterministic", "--seed=3", "--shuffle_buffer=64"]


def test_sigkill_then_rerun_continues_and_matches_uninterrupted(demo_data, tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    run_module("mlcrl_tf.train", _resume_args(demo_data, reference_dir))

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlcrl_tf.train", *_resume_args(demo_data, killed_dir)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it in the second epoch (after the learning-rate decay), once a
    # checkpoint past the decay exists.
    deadline = time.time() + 300

    def latest_step():
        latest = tf.train.latest_checkpoint(str(killed_dir))
        return int(latest.rsplit("-", 1)[1]) if latest else 0

    while latest_step() < 14:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = tf.train.latest_checkpoint(str(killed_dir))
    killed_at = int(latest.rsplit("-", 1)[1])
    assert 14 <= killed_at < 24, latest

    resumed = run_module("mlcrl_tf.train", _resume_args(demo_data, killed_dir))
    assert f"Resuming at step {killed_at}/24 (epoch 2)" in resumed.stdout
    assert "Finished at step 24" in resumed.stdout
    # The step counter continued: train summaries after the restart start past it.
    steps = [s for s, _ in _event_tags(str(killed_dir / "train"))["loss/loss"]]
    assert max(steps) == 24 and steps.count(killed_at + 1) >= 1
    # Same learning rate after the restart (decayed ×0.1 in epoch 2).
    lrs = dict(_event_tags(str(killed_dir / "train"))["learning_rate/head"])
    assert lrs[24] == pytest.approx(0.005)
    # Bit-identical to the uninterrupted run.
    reference = _checkpoint_values(str(reference_dir / "ckpt-24"))
    result = _checkpoint_values(str(killed_dir / "ckpt-24"))
    assert reference.keys() == result.keys() and reference
    for name in reference:
        np.testing.assert_array_equal(result[name], reference[name], err_msg=name)


# ---------------------------------------------------------------------------
# Strategies.
# ---------------------------------------------------------------------------

def _first_losses(model_dir):
    tags = _event_tags(str(model_dir / "train"))
    return {name: dict(tags[f"loss/{name}"]) for name in ("loss", "classification", "crl")}


def test_mirrored_two_replicas_matches_one_device(demo_data, tmp_path):
    """Our loss scaling and all-reduces make 2 replicas = 1 device.

    oneDNN is switched off for both runs: with it, the 2-replica graph's
    first convolution gets a different oneDNN kernel whose weight gradient
    differs by ~0.2 % (measured; deterministic, not a race), which says
    nothing about our distributed arithmetic.
    """
    args = SMALL + [f"--train_files={demo_data['train_files']}", "--epochs=1",
                    "--steps_per_epoch=3", "--weight_decay=1e-4", "--deterministic"]
    exact = {"TF_ENABLE_ONEDNN_OPTS": "0"}
    run_module("mlcrl_tf.train", args + [f"--model_dir={tmp_path / 'one'}"], env=exact)
    mirrored = run_module("mlcrl_tf.train", args + [
        f"--model_dir={tmp_path / 'two'}", "--strategy=mirrored", "--num_cpu_devices=2",
        "--verbosity=0"], env=exact)  # INFO: the "Training ... 2 replicas." line
    assert "2 replicas" in mirrored.stderr
    one, two = _first_losses(tmp_path / "one"), _first_losses(tmp_path / "two")
    for name in one:
        for step in (1, 2, 3):
            assert two[name][step] == pytest.approx(one[name][step], rel=1e-4, abs=1e-5), (
                name, step)
    a = _checkpoint_values(str(tmp_path / "one" / "ckpt-3"))
    b = _checkpoint_values(str(tmp_path / "two" / "ckpt-3"))
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-3, atol=1e-4, err_msg=name)


def test_multi_worker_two_local_workers(demo_data, tmp_path):
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = tmp_path / "mw"
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mlcrl_tf.train", *SMALL, "--strategy=multi_worker",
             f"--model_dir={model_dir}", f"--train_files={demo_data['train_files']}",
             f"--eval_files={demo_data['test_files']}", "--epochs=1",
             "--steps_per_epoch=3", "--verbosity=0"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
        assert "Finished at step 3" in out
    fingerprints = [out.split("weights fingerprint ")[1].split()[0] for out, _ in outputs]
    assert fingerprints[0] == fingerprints[1]
    assert "2 replicas" in outputs[0][1]
    # Only the chief's checkpoints stay.
    assert tf.train.latest_checkpoint(str(model_dir)).endswith("ckpt-3")
    assert not glob.glob(str(model_dir / ".workers" / "*" / "ckpt-*"))


# ---------------------------------------------------------------------------
# In-process: learning rates, EMA, bad input, divergence.
# ---------------------------------------------------------------------------

_TWO_RATES_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.training import data, distribute, trainer as trainer_lib

replicas, train_files, model_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
config = config_lib.Config(
    model_dir=model_dir, train_files=train_files, backbone="small_cnn",
    backbone_weights=None, image_size=48,
    batch_size=8, epochs=2, steps_per_epoch=2, lr_decay_epochs=(1,), lr_decay_factor=0.1,
    learning_rate=0.05, backbone_learning_rate=0.005, momentum=0.9, weight_decay=1e-2,
    strategy="mirrored" if replicas > 1 else "default", num_cpu_devices=replicas,
    num_summary_images=0, shuffle_buffer=64)
config, names, count = data.resolve_data(config)
strategy = distribute.make_strategy(config.strategy, config.num_cpu_devices)
trainer = trainer_lib.Trainer(config, names, strategy, count)
model = trainer.model
variables = model.trainable_variables
backbone = {id(v) for v in model.backbone_variables}

def replica_grads(batch):
    with tf.GradientTape() as tape:
        terms = model.loss_terms(model(batch["images"], training=True), batch["labels"])
    return tape.gradient(terms["loss"], variables)

@tf.function
def global_grads(batch):  # what the optimizer receives: the sum over replicas
    per_replica = strategy.run(replica_grads, args=(batch,))
    return [strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None) for g in per_replica]

theta = [v.numpy().astype(np.float64) for v in variables]
buffers = [None] * len(theta)
errors, moved = [], {"backbone": 0.0, "head": 0.0}
iterator = iter(trainer.train_dataset(0))
for step in range(4):
    batch = next(iterator)
    grads = [g.numpy().astype(np.float64) for g in global_grads(batch)]
    rate = 0.05 * (0.1 if step >= 2 else 1.0)   # x0.1 after epoch 1 = 2 steps
    for i, v in enumerate(variables):           # torch.optim.SGD, two param groups
        d_p = grads[i] + 1e-2 * theta[i]
        buffers[i] = d_p if buffers[i] is None else 0.9 * buffers[i] + d_p
        theta[i] = theta[i] - rate * (0.1 if id(v) in backbone else 1.0) * buffers[i]
    trainer.train_step(batch)
    errors.append(max(float(np.abs(v.numpy() - t).max() / (np.abs(t).max() + 1e-3))
                      for v, t in zip(variables, theta)))
print(json.dumps({"errors": errors, "rates": trainer.current_learning_rates(),
                  "replicas": strategy.num_replicas_in_sync}))
"""


@pytest.mark.parametrize("replicas", [1, 2])
def test_two_learning_rates_momentum_and_decay_match_pytorch(demo_data, tmp_path, replicas):
    """4 real steps across a x0.1 decay, momentum 0.9, weight decay 1e-2, two rates.

    The reference is torch.optim.SGD's rule in NumPy on the gradient the
    optimizer receives (the sum of the replicas' gradients).
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", _TWO_RATES_SCRIPT, str(replicas), demo_data["train_files"],
         str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == replicas
    assert result["rates"] == pytest.approx([0.005, 0.0005])
    assert max(result["errors"]) < 1e-5, result["errors"]


def _checkpoint_keys_under(prefix, root):
    """{object path: checkpoint key} of every variable reachable from the
    checkpoint's top-level object `root` ("model" or "ema"), read from the
    checkpoint's own object graph, except the optimizer's (a compiled model
    tracks its optimizer).

    A variable is saved once, under its shortest path: with an EMA, whose
    `_model_variables` list tracks the model's trainable variables, the raw
    trainable weights are stored under `ema/_model_variables/<i>/` and the
    `model/` keys hold only the BatchNorm statistics, so the keys of the
    model's variables must be found through the graph, not by name.
    """
    from tensorflow.core.protobuf import trackable_object_graph_pb2  # pylint: disable=import-outside-toplevel
    reader = tf.train.load_checkpoint(prefix)
    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    (start,) = [c.node_id for c in graph.nodes[0].children if c.local_name == root]
    keys, stack, seen = {}, [(root, start)], set()
    while stack:
        path, node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        node = graph.nodes[node_id]
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE":
                keys[path] = attribute.checkpoint_key
        stack += [(f"{path}/{c.local_name}", c.node_id) for c in node.children
                  if c.local_name != "optimizer"]
    return keys


def _value_multiset(arrays):
    import collections  # pylint: disable=import-outside-toplevel
    return collections.Counter(
        (a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes()) for a in arrays)


def test_ema_weights_are_evaluated_and_restored(demo_data, tmp_path, monkeypatch):
    trainers = []

    class RecordingTrainer(trainer_lib.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(trainer_lib, "Trainer", RecordingTrainer)
    config = small_config(demo_data, tmp_path / "ema", ema_decay=0.5)
    result = train_lib.train_and_evaluate(config)
    assert result["metrics"] is not None
    (trainer,) = trainers
    model, _, _, _ = restore.restore_model(config.model_dir, use_ema=True)
    raw, _, _, _ = restore.restore_model(config.model_dir, use_ema=False)
    latest = tf.train.latest_checkpoint(config.model_dir)
    assert latest.endswith("ckpt-3")  # saved at the end of the epoch, before its eval
    reader = tf.train.load_checkpoint(latest)
    kernel = model.classifier.kernel
    assert not np.allclose(kernel.numpy(), raw.classifier.kernel.numpy())

    # After the run (the eval swapped the EMA in and out again) the live model
    # holds the raw weights: those the checkpoint saved for the model.
    model_keys = _checkpoint_keys_under(latest, "model")
    assert len(model_keys) == len(trainer.model.variables)
    saved_model = [reader.get_tensor(k) for k in model_keys.values()]
    assert _value_multiset(saved_model) == _value_multiset(
        [v.numpy() for v in trainer.model.variables])
    # ...and the shadow holds the averages, saved as ema/shadow/<i> in the order
    # of the model's trainable variables.
    shadow_keys = sorted((k for k in reader.get_variable_to_shape_map()
                          if k.startswith("ema/shadow/")),
                         key=lambda k: int(k.split("/")[2]))
    assert len(shadow_keys) == len(trainer.model.trainable_variables) == len(
        trainer.ema.shadow)
    differs = 0
    for key, shadow, live, ema_restored, raw_restored in zip(
            shadow_keys, trainer.ema.shadow, trainer.model.trainable_variables,
            model.trainable_variables, raw.trainable_variables):
        saved = reader.get_tensor(key)
        np.testing.assert_array_equal(shadow.numpy(), saved, err_msg=key)
        np.testing.assert_array_equal(ema_restored.numpy(), saved, err_msg=key)
        np.testing.assert_array_equal(raw_restored.numpy(), live.numpy(), err_msg=key)
        differs += not np.array_equal(saved, live.numpy())
    assert differs > len(shadow_keys) // 2  # the average is not the raw weights
    # best/ was saved after that eval: the same raw weights and averages.
    best = tf.train.latest_checkpoint(os.path.join(config.model_dir, "best"))
    assert best.endswith("ckpt-3")
    best_reader = tf.train.load_checkpoint(best)
    for key in list(model_keys.values()) + shadow_keys:
        np.testing.assert_array_equal(best_reader.get_tensor(key), reader.get_tensor(key),
                                      err_msg=key)


@pytest.mark.parametrize("overrides, message", [
    ({"train_files": "/nonexistent/train-*.tfrecord"}, "--train_files"),
    ({"train_files": ""}, "--train_files"),
    ({"eval_files": "/nonexistent/test-*.tfrecord"}, "--eval_files"),
    ({"num_classes": 7}, "--num_classes=7 disagrees"),
    ({"variant": "gcn"}, "--variant"),
    ({"backbone": "resnet152"}, "--backbone"),
    ({"batch_size": 0}, "--batch_size"),
    ({"epochs": 3, "lr_decay_epochs": (3,)}, r"--lr_decay_epochs=3.*\[1, 3\)"),
    ({"epochs": 3, "lr_decay_epochs": (5,)}, "--lr_decay_epochs"),
    ({"epochs": 3, "lr_decay_epochs": (0,)}, "--lr_decay_epochs"),
    ({"epochs": 3, "lr_decay_epochs": (1, 1)}, "--lr_decay_epochs lists an epoch twice"),
    ({"lr_decay_factor": 0.0}, r"--lr_decay_factor must be in \(0, 1\]"),
    ({"lr_decay_factor": 1.5}, "--lr_decay_factor"),
    ({"momentum": 1.0}, r"--momentum must be in \[0, 1\)"),
    ({"momentum": -0.1}, "--momentum"),
    ({"crl_margin": -0.5}, "--crl_margin must be >= 0"),
    ({"aux_weight": -1.0}, "--aux_weight"),
])
def test_bad_configuration_is_one_clear_error(demo_data, tmp_path, overrides, message):
    config = small_config(demo_data, tmp_path / "bad", **overrides)
    with pytest.raises(ValueError, match=message):
        train_lib.train_and_evaluate(config)


def test_bad_flags_fail_before_any_work(demo_data, tmp_path):
    """Validation runs first: nothing is created, no data is read."""
    config = small_config(demo_data, tmp_path / "never", momentum=1.5,
                          train_files=str(tmp_path / "missing-*.tfrecord"))
    with pytest.raises(ValueError, match="--momentum"):
        train_lib.train_and_evaluate(config)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("overrides, warns", [
    ({"backbone": "resnet50", "backbone_weights": None}, True),
    ({"backbone": "vgg16", "backbone_weights": None}, True),
    ({"backbone": "resnet50", "backbone_weights": "imagenet"}, False),
    ({"backbone": "resnet50", "backbone_weights": None, "backbone_learning_rate": 0.05},
     False),
    ({"backbone": "small_cnn", "backbone_weights": None}, False),
])
def test_random_init_with_a_small_backbone_rate_warns_once(demo_data, tmp_path, overrides,
                                                          warns):
    config = small_config(demo_data, tmp_path / "w", **overrides)
    messages = config_lib.warnings_for(config)
    assert len(messages) == int(warns)
    if warns:
        assert "random initialisation" in messages[0] and "10x smaller" in messages[0]


def test_the_warning_is_printed_by_the_cli(demo_data, tmp_path):
    junk = tmp_path / "junk.tfrecord"  # Passes the pre-TensorFlow data check.
    junk.write_text("not a shard")
    proc = run_module("mlcrl_tf.train", [
        f"--model_dir={tmp_path / 'r'}", f"--train_files={junk}",
        "--backbone=resnet50", "--backbone_weights="], check=False)
    assert proc.stderr.count("random initialisation") == 1
    assert proc.returncode != 0 and "labels file" in proc.stderr


def test_best_is_selected_on_held_out_training_shards(demo_data, tmp_path):
    records = os.path.dirname(demo_data["train_files"])
    train = os.path.join(records, "train-0000[0-6]-of-00008.tfrecord")
    held_out = os.path.join(records, "train-00007-of-00008.tfrecord")
    config = small_config(demo_data, tmp_path / "sel", train_files=train, selection_files=held_out,
                          epochs=2, steps_per_epoch=2)
    train_lib.train_and_evaluate(config)
    best = json.loads((tmp_path / "sel" / "best" / "metrics.json").read_text())
    assert best["selected_on"] == "selection_files"
    assert best["selection_files"] == held_out
    assert set(best["metrics"]) >= {"mAP", "CF1"}  # the --eval_files (test) metrics
    tags = _event_tags(str(tmp_path / "sel" / "eval"))
    logged = sorted(tags["selection_metrics/mAP"])
    assert [s for s, _ in logged] == [2, 4]
    # best/ is the evaluation with the highest selection mAP (the first one on
    # a tie: a later one must beat it), and stores that mAP (TensorBoard keeps
    # it as float32).
    values = [v for _, v in logged]
    first_best = int(np.argmax(values))
    assert best["step"] == logged[first_best][0], (best["step"], logged)
    assert best["selection_mAP"] == pytest.approx(max(values), rel=1e-6, abs=1e-7)
    assert tf.train.latest_checkpoint(
        str(tmp_path / "sel" / "best")).endswith(f"ckpt-{best['step']}")
    # The reported metrics are the --eval_files ones of that same step.
    eval_maps = dict(tags["metrics/mAP"])
    assert best["metrics"]["mAP"] == pytest.approx(eval_maps[best["step"]], rel=1e-6,
                                                   abs=1e-7)
    overlapping = config.replace(model_dir=str(tmp_path / "overlap"),
                                 selection_files=demo_data["train_files"])
    with pytest.raises(ValueError, match="--selection_files.*held out"):
        train_lib.train_and_evaluate(overlapping)


def test_unwritable_model_dir(demo_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    config = small_config(demo_data, blocker / "run")
    with pytest.raises(ValueError, match="--model_dir"):
        train_lib.train_and_evaluate(config)


def test_resume_with_another_network_is_refused(demo_data, tmp_path):
    config = small_config(demo_data, tmp_path / "run", eval_files=None, steps_per_epoch=1)
    train_lib.train_and_evaluate(config)
    with pytest.raises(ValueError, match="--variant='baseline' differs"):
        train_lib.train_and_evaluate(config.replace(variant="baseline"))


def test_divergence_stops_and_keeps_last_good_checkpoint(demo_data, tmp_path):
    config = small_config(demo_data, tmp_path / "nan", eval_files=None, steps_per_epoch=2,
                          checkpoint_every_steps=1)
    train_lib.train_and_evaluate(config)
    good = tf.train.latest_checkpoint(config.model_dir)
    assert good.endswith("ckpt-2")
    diverging = config.replace(epochs=3, learning_rate=1e12, backbone_learning_rate=1e12)
    with pytest.raises(trainer_lib.NonFiniteLossError, match="last good checkpoint"):
        train_lib.train_and_evaluate(diverging)
    for path in glob.glob(os.path.join(config.model_dir, "ckpt-*.index")):
        for name, value in _checkpoint_values(path[:-len(".index")]).items():
            assert np.all(np.isfinite(value)), (path, name)


def test_cli_reports_bad_flags_without_traceback(demo_data, tmp_path):
    proc = run_module("mlcrl_tf.train", [
        f"--model_dir={tmp_path / 'x'}", "--train_files=/nonexistent/*.tfrecord"],
        check=False)
    assert proc.returncode != 0
    assert "--train_files" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_module("mlcrl_tf.train", [
        f"--model_dir={tmp_path / 'x'}", f"--train_files={demo_data['train_files']}",
        "--variant=gcn"], check=False)
    assert proc.returncode != 0 and "variant" in proc.stderr


def test_mixed_precision_trains(demo_data, tmp_path):
    proc = run_module("mlcrl_tf.train", SMALL + [
        f"--model_dir={tmp_path / 'mp'}", f"--train_files={demo_data['train_files']}",
        "--epochs=1", "--steps_per_epoch=2", "--mixed_precision"])
    assert "Finished at step 2" in proc.stdout
    assert "loss_scale" in _event_tags(str(tmp_path / "mp" / "train"))


def test_progress_is_line_based_without_tty():
    import io  # pylint: disable=import-outside-toplevel
    stream = io.StringIO()
    progress = step_progress.StepProgress(total_steps=100, global_batch_size=4, stream=stream,
                                     is_tty=False)
    progress.start(0)
    speed = progress.update(10, 0.5)
    progress.message("epoch done")
    text = stream.getvalue()
    assert "\r" not in text and text.count("\n") == 2
    assert "step  10/100" in text and "ETA" in text and speed["images_per_sec"] > 0
    # Durations are written as everywhere else (pipelines.progress): 1:02:05.
    now = [0.0]
    progress = step_progress.StepProgress(total_steps=100, global_batch_size=4, stream=stream,
                                     is_tty=False, clock=lambda: now[0])
    progress.start(0)
    now[0] = 3725.0 / 9  # 10 steps: the 90 left take 3725 s
    progress.update(10, 0.5)
    assert stream.getvalue().splitlines()[-1].endswith("ETA 1:02:05")


def test_progress_redraws_one_line_on_a_tty_with_interval_speed_and_eta():
    import io  # pylint: disable=import-outside-toplevel

    class Tty(io.StringIO):
        def isatty(self):
            return True

    now = [100.0]
    stream = Tty()
    progress = step_progress.StepProgress(total_steps=100, global_batch_size=4, stream=stream,
                                     clock=lambda: now[0])
    progress.start(20)  # resumed at step 20: ETA from the steps done since
    now[0] += 10
    assert progress.update(30, 0.5, "epoch 1/2") == {"steps_per_sec": 1.0,
                                                     "images_per_sec": 4.0}
    now[0] += 2
    speed = progress.update(40, 0.25)
    progress.message("Epoch 1/2 done")
    text = stream.getvalue()
    assert text.startswith("\rstep  30/100 ( 30.0%) loss 0.5000 | 1.00 steps/s 4.0 img/s"
                           " | ETA 1:10 | epoch 1/2")
    assert speed["steps_per_sec"] == 5.0
    # 20 steps in 12 s since the restart: 60 steps left take 36 s.
    assert "\rstep  40/100 ( 40.0%) loss 0.2500 | 5.00 steps/s 20.0 img/s | ETA 0:36" in text
    assert "Epoch 1/2 done\n" in text and text.count("\n") == 1  # one line kept
    assert text.endswith("ETA 0:36")  # the progress line is drawn again below it


def test_the_speed_after_an_evaluation_counts_training_steps_only():
    """Failed before: the first report after an evaluation divided the steps
    by the training time plus the evaluation time."""
    import io  # pylint: disable=import-outside-toplevel
    now = [0.0]
    progress = step_progress.StepProgress(total_steps=100, global_batch_size=4,
                                     stream=io.StringIO(), is_tty=False,
                                     clock=lambda: now[0])
    progress.start(0)
    now[0] += 10
    assert progress.update(10, 0.5)["steps_per_sec"] == 1.0
    now[0] += 50  # an evaluation
    progress.resume()
    now[0] += 10
    assert progress.update(20, 0.5) == {"steps_per_sec": 1.0, "images_per_sec": 4.0}


def test_the_summary_writers_are_closed_when_training_fails(demo_data, tmp_path,
                                                            monkeypatch):
    """Failed before: TrainingSummaries had no close() and the trainer left
    its tf.summary writers open, also after an error."""
    closed = []
    real_close = trainer_lib.summaries_lib.TrainingSummaries.close

    def spy(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(trainer_lib.summaries_lib.TrainingSummaries, "close", spy)

    def diverge(self, epoch, progress):
        self.summaries.write_train(1, {"loss": 1.0}, (0.1, 0.01),
                                   {"images_per_sec": 1.0, "steps_per_sec": 1.0})
        raise trainer_lib.NonFiniteLossError("diverged")

    monkeypatch.setattr(trainer_lib.Trainer, "_train_epoch", diverge)
    config = small_config(demo_data, tmp_path / "run", eval_files=None)
    with pytest.raises(trainer_lib.NonFiniteLossError, match="diverged"):
        train_lib.train_and_evaluate(config)
    (summaries,) = closed
    assert summaries._writers == {}  # pylint: disable=protected-access
    assert _event_tags(str(tmp_path / "run" / "train"))["loss/loss"] == [(1, 1.0)]


_WITHOUT_KERAS_HUB = """
import runpy, sys
sys.modules["keras_hub"] = None  # `import keras_hub` raises ImportError
sys.argv = ["train"] + sys.argv[1:]
runpy.run_module("mlcrl_tf.train", run_name="__main__")
"""


def test_a_keras_hub_backbone_without_keras_hub_is_one_error_line(demo_data, tmp_path):
    """Failed before: an ImportError traceback from deep in the model build."""
    args = SMALL + [f"--model_dir={tmp_path / 'run'}", "--epochs=1", "--steps_per_epoch=1",
                    f"--train_files={demo_data['train_files']}",
                    "--backbone=keras_hub:resnet_18_imagenet"]
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_KERAS_HUB, *args], cwd=REPO,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [text for text in proc.stderr.splitlines() if text.startswith("error:")]
    assert "KerasHub is not installed" in line and "pip install" in line
    assert "mlcrl_tf[keras_hub]" in line

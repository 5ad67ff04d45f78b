"""Training under faults of the second campaign: preemption (SIGTERM, SIGINT),
a disk that fills up or turns read-only, and a resume whose data changed its
label map. Each ends in one line, with the last good checkpoint intact and a
resume that continues exactly (docs/reliability.md)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.evaluation import evaluate_lib
from mlcrl_tf.run_dir import checkpoints
from mlcrl_tf.training import stop_signals
from mlcrl_tf.training import train_lib
from mlcrl_tf.training import trainer as trainer_lib

from conftest import REPO
from conftest import fill_disk
from conftest import free_port
from conftest import run_module
from conftest import small_config
from helpers import default_sigint

SMALL = ["--backbone=small_cnn", "--backbone_weights=", "--image_size=48",
         "--batch_size=8", "--learning_rate=0.05", "--backbone_learning_rate=0.05",
         "--num_summary_images=0", "--log_every_steps=1"]


def _run_args(demo_data, model_dir, *extra):
    """A run of 2 epochs x 12 steps with no periodic checkpoint inside an epoch,
    so that only a stop signal can save mid-epoch."""
    return SMALL + [f"--model_dir={model_dir}", f"--train_files={demo_data['train_files']}",
                    "--epochs=2", "--steps_per_epoch=12", "--lr_decay_epochs=1",
                    "--checkpoint_every_steps=1000", "--deterministic", "--seed=5",
                    "--shuffle_buffer=64", *extra]


def _checkpoint_values(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(prefix)
            if name.startswith("model/")}


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith(("error:", "stopped"))]


@pytest.fixture(scope="module")
def uninterrupted(demo_data, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_module("mlcrl_tf.train", _run_args(demo_data, model_dir))
    return model_dir


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_the_current_step_and_the_run_resumes_exactly(
        demo_data, uninterrupted, tmp_path, number):
    """Failed before: SIGTERM killed the run without a checkpoint (every step
    since the last periodic one was lost); SIGINT printed a traceback."""
    model_dir = tmp_path / "run"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "mlcrl_tf.train",
                             *_run_args(demo_data, model_dir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    deadline = time.time() + 300
    for line in proc.stdout:  # progress lines: "step  5/24 ..."
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 5:
            proc.send_signal(number)
            break
        assert time.time() < deadline, "no progress"
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + number, err[-3000:]
    assert "Traceback" not in err
    (line,) = _error_lines(err)
    name = signal.Signals(number).name
    step = int(line.split(" at step ")[1].split("/")[0])
    assert line.startswith(f"stopped by {name} at step ") and 5 <= step < 12, line
    assert f"saved {model_dir / f'ckpt-{step}'}" in line
    assert tf.train.latest_checkpoint(str(model_dir)).endswith(f"ckpt-{step}")

    resumed = run_module("mlcrl_tf.train", _run_args(demo_data, model_dir))
    assert f"Resuming at step {step}/24 (epoch 1)" in resumed.stdout
    reference = _checkpoint_values(str(uninterrupted / "ckpt-24"))
    result = _checkpoint_values(str(model_dir / "ckpt-24"))
    assert reference.keys() == result.keys() and reference
    for key in reference:
        np.testing.assert_array_equal(result[key], reference[key], err_msg=key)


def test_a_signal_to_one_worker_stops_every_worker_at_the_same_step(demo_data, tmp_path):
    """Multi-worker: SIGTERM to the non-chief only; the workers agree after
    the step, the chief saves that step, both stop with the one line."""
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = tmp_path / "mw"
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
                   TF_CONFIG=json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mlcrl_tf.train", *_run_args(demo_data, model_dir),
             "--strategy=multi_worker"], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint))
    deadline = time.time() + 600
    for line in procs[0].stdout:  # the chief's progress lines
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 3:
            procs[1].send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "no progress"
    results = [p.communicate(timeout=600) for p in procs]
    lines = []
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
        (line,) = _error_lines(err)
        lines.append(line)
    steps = {int(line.split(" at step ")[1].split("/")[0]) for line in lines}
    assert len(steps) == 1 and 3 <= min(steps) < 24, lines
    assert tf.train.latest_checkpoint(str(model_dir)).endswith(f"ckpt-{steps.pop()}")


def test_a_signal_ignored_at_start_stays_ignored():
    """`nohup` and `cmd &` start a process with SIGINT ignored: keep that."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_signals.StopSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_during_the_evaluation_stops_at_once_and_reruns_it(demo_data, tmp_path,
                                                                 monkeypatch):
    config = small_config(demo_data, tmp_path / "run", epochs=2)
    real_after_epoch = trainer_lib.epoch_evaluation.EpochEvaluation.after_epoch

    def preempted(self, epoch, progress):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while evaluating
        return real_after_epoch(self, epoch, progress)

    monkeypatch.setattr(trainer_lib.epoch_evaluation.EpochEvaluation, "after_epoch",
                        preempted)
    with pytest.raises(stop_signals.StopRequested, match="during the evaluation") as stop:
        train_lib.train_and_evaluate(config)
    assert stop.value.signal_number == signal.SIGTERM
    assert str(tmp_path / "run" / "ckpt-3") in str(stop.value)
    monkeypatch.undo()
    result = train_lib.train_and_evaluate(config)
    assert result["step"] == 6 and result["metrics"] is not None
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


def test_a_second_signal_stops_the_process_the_default_way():
    script = ("import os, signal, time\n"
              "from mlcrl_tf.training import stop_signals\n"
              "with stop_signals.StopSignals() as s:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    assert s.received == signal.SIGTERM\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == -signal.SIGTERM


def test_a_resume_on_a_reordered_label_map_is_refused_and_changes_nothing(demo_data,
                                                                       tmp_path):
    """Failed before: same number of classes, another order: the run resumed
    and every output trained on another class; run.json was rewritten."""
    config = small_config(demo_data, tmp_path / "run")
    train_lib.train_and_evaluate(config)
    run_json = (tmp_path / "run" / "run.json").read_bytes()
    shards = tmp_path / "reordered"
    shutil.copytree(os.path.dirname(demo_data["train_files"]), shards)
    names = (shards / "labels.txt").read_text().splitlines()
    (shards / "labels.txt").write_text("\n".join(names[1:] + names[:1]) + "\n")
    with pytest.raises(ValueError, match=r"label map differs from the run's \(class id 0 is "
                       rf"{names[1]!r} there but {names[0]!r} in .*run.json\); resuming "
                       "would train every output on another class"):
        train_lib.train_and_evaluate(config.replace(
            train_files=str(shards / "train-*.tfrecord"), eval_files=None, epochs=2))
    assert (tmp_path / "run" / "run.json").read_bytes() == run_json


@pytest.mark.parametrize("free", [0, 4096])
def test_a_full_disk_is_one_line_and_the_run_resumes(demo_data, tmp_path, mount_tmpfs,
                                                     free):
    """A disk full before the start is refused by the output check; one with a
    page left fails writing run.json. Failed before: a traceback from writing
    run.json (and from releasing the lock), the real error masked."""
    disk = mount_tmpfs("64m")
    args = SMALL + [f"--model_dir={disk / 'run'}", f"--train_files={demo_data['train_files']}",
                    "--epochs=1", "--steps_per_epoch=2", "--lr_decay_epochs="]
    run_module("mlcrl_tf.train", args)
    fill_disk(disk, leave=free)
    args = [a if a != "--epochs=1" else "--epochs=2" for a in args]
    proc = run_module("mlcrl_tf.train", args, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    assert "No space left on device" in line and str(disk / "run") in line, line
    if free:
        assert "run.json" in line and "last good checkpoint" in line and "ckpt-2" in line
    os.remove(disk / "filler")
    resumed = run_module("mlcrl_tf.train", args)
    assert "Resuming at step 2/4" in resumed.stdout and "Finished at step 4" in resumed.stdout
    assert json.loads((disk / "run" / "run.json").read_text())["config"]["epochs"] == 2


def test_a_model_dir_made_read_only_mid_run_is_one_line_and_resumes(demo_data, tmp_path,
                                                                     make_read_only):
    """Failed before: a traceback, the real error masked by a second one."""
    model_dir = tmp_path / "run"
    args = SMALL + [f"--model_dir={model_dir}", f"--train_files={demo_data['train_files']}",
                    "--epochs=1", "--steps_per_epoch=40", "--lr_decay_epochs=",
                    "--checkpoint_every_steps=2"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen([sys.executable, "-m", "mlcrl_tf.train", *args], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not tf.train.latest_checkpoint(str(model_dir)):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    make_read_only(model_dir)
    try:
        err = proc.communicate(timeout=300)[1]
    finally:
        make_read_only(model_dir, False)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    (line,) = _error_lines(err)
    assert "Read-only file system" in line and str(model_dir) in line, line
    last_good = tf.train.latest_checkpoint(str(model_dir))
    assert f"last good checkpoint is {last_good}" in line
    resumed = run_module("mlcrl_tf.train", args)
    step = int(last_good.rsplit("-", 1)[1])
    assert f"Resuming at step {step}/40" in resumed.stdout, resumed.stdout[-2000:]


def test_evaluate_takes_the_newest_checkpoint_when_training_rotates_one_away(
        crl_run, tmp_path, monkeypatch, caplog):
    """Failed before: a checkpoint deleted between listing and loading (a run
    with --keep_checkpoints=1 saving meanwhile) was a NotFoundError."""
    model_dir = tmp_path / "run"
    shutil.copytree(crl_run.model_dir, model_dir)
    real_resolve = checkpoints.resolve_checkpoint
    rotated = []

    def resolve_then_rotate(directory, checkpoint=None, best=False):
        path = real_resolve(directory, checkpoint, best)
        if not rotated:  # the training run saves ckpt-9 and deletes this one
            for name in tf.io.gfile.glob(path + ".*"):
                shutil.copy(name, name.replace(os.path.basename(path), "ckpt-9"))
                os.remove(name)
            checkpoints.write_checkpoint_state(str(model_dir), [9])
            rotated.append(path)
        return path

    monkeypatch.setattr(checkpoints, "resolve_checkpoint", resolve_then_rotate)
    result, _, name = evaluate_lib.evaluate_target(model_dir=str(model_dir))
    assert result.num_examples == 32 and "ckpt-9" in name
    assert "deleted while it was read" in caplog.text


def test_imagenet_weights_offline_are_one_line_and_create_nothing(demo_data, tmp_path):
    """Failed before: a 105-line traceback from Keras' download, and an empty
    run directory left behind."""
    env = {"KERAS_HOME": str(tmp_path / "keras"),  # an empty cache: it must download
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    proc = run_module("mlcrl_tf.train", [
        "--backbone=resnet50", "--backbone_weights=imagenet", "--image_size=64",
        f"--model_dir={tmp_path / 'run'}", f"--train_files={demo_data['train_files']}",
        "--epochs=1", "--lr_decay_epochs=", "--batch_size=8"], env=env, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    assert "could not download the ImageNet weights of resnet50" in line, line
    assert "--backbone_weights=<path to the .h5>" in line
    assert str(tmp_path / "keras" / "models") in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--lr_decay_epochs=x", "--crop_scales=1.0,abc",
                                  "--lr_decay_epochs=1.5"])
def test_a_malformed_list_flag_is_the_one_line_flag_error(demo_data, tmp_path, flag):
    """Failed before: a ValueError traceback."""
    proc = run_module("mlcrl_tf.train", [f"--model_dir={tmp_path / 'x'}",
                                         f"--train_files={demo_data['train_files']}", flag],
                      check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"FATAL Flags parsing error: flag {flag}: expected a comma-separated list of" in (
        proc.stderr)


def test_missing_data_is_one_line_before_tensorflow_loads(tmp_path):
    """Failed before: after TensorFlow's start-up, an error naming neither the
    directory nor the command that makes the shards."""
    fake = tmp_path / "fake" / "tensorflow"  # importing TensorFlow would fail loudly
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('tensorflow was imported')\n")
    proc = subprocess.run([sys.executable, "-m", "mlcrl_tf.train", "--flagfile=coco.flags"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=f"{fake.parent}:{REPO}"))
    assert proc.returncode == 1
    (line,) = _error_lines(proc.stderr)
    assert line.startswith("error: --train_files='data/coco/train2014-*.tfrecord' matches "
                           f"no file: looked in {tmp_path / 'data' / 'coco'}")
    assert "python -m pipelines.coco_to_tfrecord --annotations=coco/annotations/" in line
    assert "(from coco.flags)" in line
    assert "tensorflow was imported" not in proc.stderr

"""The data check `python -m mlcrl_tf.train` makes before TensorFlow loads."""

import os
import subprocess
import sys

import pytest

from mlcrl_tf.training import preflight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_missing_shard_glob_names_the_directory_and_the_flagfile_converter(tmp_path):
    problem = preflight.missing_data_problem(
        ["train", "--flagfile=coco.flags", "--model_dir=x"], cwd=str(tmp_path))
    assert problem.startswith("--train_files='data/coco/train2014-*.tfrecord' matches no file")
    assert f"looked in {tmp_path / 'data' / 'coco'}" in problem
    assert "python -m pipelines.coco_to_tfrecord --annotations=coco/annotations/" \
           "instances_train2014.json" in problem and "(from coco.flags)" in problem


def test_without_a_flagfile_the_converters_are_listed(tmp_path):
    problem = preflight.missing_data_problem(
        ["train", "--eval_files", "val-*.tfrecord"], cwd=str(tmp_path))
    assert problem.startswith("--eval_files='val-*.tfrecord' matches no file")
    assert "csv_to_tfrecord" in problem


@pytest.mark.parametrize("pattern", ["gs://bucket/train-*.tfrecord", "tfds:voc/2007:train",
                                     "ram://x/*.tfrecord"])
def test_remote_and_tfds_sources_are_left_to_the_reader(tmp_path, pattern):
    assert preflight.missing_data_problem(["train", f"--train_files={pattern}"],
                                          cwd=str(tmp_path)) is None


def test_existing_shards_pass_and_hidden_files_do_not_count(tmp_path):
    (tmp_path / ".train-0.tfrecord").write_text("")
    argv = ["train", "--train_files=train-*.tfrecord"]
    assert preflight.missing_data_problem(argv, cwd=str(tmp_path)) is not None
    (tmp_path / "train-0.tfrecord").write_text("")
    assert preflight.missing_data_problem(argv, cwd=str(tmp_path)) is None


def test_a_broken_flagfile_is_left_to_absl(tmp_path):
    assert preflight.missing_data_problem(["train", "--flagfile=nonexistent.flags"],
                                          cwd=str(tmp_path)) is None


def test_only_other_programs_and_help_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--train_files=none-*.tfrecord"]
    with pytest.raises(SystemExit, match="^error: --train_files='none-"):
        preflight.check_before_tensorflow(["python", "-m", "mlcrl_tf.train"], argv)
    preflight.check_before_tensorflow(["python", "-m", "mlcrl_tf.evaluate"], argv)
    for flag in ("--only_check_args", "--helpfull", "-help"):
        preflight.check_before_tensorflow(["python", "-m", "mlcrl_tf.train"], argv + [flag])


def test_the_cli_answers_before_tensorflow_loads(tmp_path):
    """Failed before: the error came after TensorFlow's 10-20 s start (and its
    console lines)."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="0")
    proc = subprocess.run([sys.executable, "-m", "mlcrl_tf.train", "--model_dir=r",
                           "--train_files=none-*.tfrecord"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --train_files=")
    assert "tensorflow" not in proc.stderr.lower() and not (tmp_path / "r").exists()

"""A quiet console (pipelines.console) and progress on every long job.

By default a command line's stderr holds its progress and results only:
no TensorFlow C++ INFO line (oneDNN banner, cpu_feature_guard), no abseil
pre-initialisation notice, no absl INFO line; `--verbosity=1` brings them
back. `evaluate` reports progress lines when its output is not a terminal.
"""

import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from mlcrl_tf.evaluation import evaluator
from mlcrl_tf.run_dir import restore
from pipelines.tfdata import input_pipeline
from pipelines.utils import console

from conftest import REPO

INFO_LINE = re.compile(r"^I\d{4} ", re.MULTILINE)
# A C++ INFO line of TensorFlow's: every CPU prints one at import (the oneDNN
# banner where TensorFlow turns oneDNN on, cpu_feature_guard on AVX2-only CPUs).
CPP_INFO_LINE = re.compile(r"^I\d{4} [\d:. ]+\d+ \w+\.cc:\d+\] ", re.MULTILINE)


def _run(module, args):
    """`python -m module args` as a user runs it: no TF_CPP_MIN_LOG_LEVEL."""
    env = {k: v for k, v in os.environ.items() if k != console.ENV}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_quiet(stderr):
    assert not INFO_LINE.search(stderr), stderr
    assert "oneDNN" not in stderr and "InitializeLog" not in stderr, stderr
    assert "cpu_feature_guard" not in stderr, stderr


# ---------------------------------------------------------------------------
# The pieces.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,value", [
    ([], None), (["--verbosity=1"], 1), (["--verbosity", "0"], 0), (["-v", "1"], 1),
    (["-v=2"], 2), (["--v=-1"], -1), (["-verbosity=1"], 1),
    (["--verbosity=1", "--verbosity=-1"], -1), (["--", "--verbosity=1"], None),
    (["--verbosity=loud"], None), (["--verbose_output=1"], None), (["-v"], None)])
def test_command_line_verbosity(args, value):
    assert console.command_line_verbosity(args) == value


@pytest.mark.parametrize("argv,environ,level,hidden", [
    (["-m", "--model_dir=x"], {}, "2", True),             # a CLI run: quiet
    (["-m", "--verbosity=0"], {}, None, False),           # asked for INFO
    (["-m", "-v", "1"], {}, None, False),
    (["-m", "--verbosity=-1"], {}, "2", True),
    (["-m"], {console.ENV: "0"}, "0", False),             # the user's level wins
    (["-m", "-v", "1"], {console.ENV: "2"}, "2", True),
    (["script.py"], {}, None, False),                     # a library import
    (["-c"], {console.ENV: "3"}, "3", True),
])
def test_quiet_tensorflow_logs(argv, environ, level, hidden):
    assert console.quiet_tensorflow_logs(argv, environ) is hidden
    assert environ.get(console.ENV) == level


def test_drop_info_lines():
    text = (f"{console.ABSEIL_NOTICE}\n"
            "I0000 00:00:1795734124.675729     906 port.cc:153] oneDNN custom "
            "operations are on.\n"
            "I1126 23:02:12.848819 140577368959872 train_lib.py:314] Training\n"
            "W1126 23:02:12.848819 14057 dataset.cc:10] a real warning\n"
            "Information for you\n")
    assert console.drop_info_lines(text) == (
        "W1126 23:02:12.848819 14057 dataset.cc:10] a real warning\n"
        "Information for you\n")


def test_hidden_info_lines_filters_file_descriptor_2(capfd):
    with console.hidden_info_lines():
        os.write(2, b"I0000 00:00:17.5 906 port.cc:153] banner\nkept\n")
    assert capfd.readouterr().err == "kept\n"
    with pytest.raises(KeyError):
        with console.hidden_info_lines():
            os.write(2, b"I0000 00:00:17.5 906 port.cc:153] banner\n")
            raise KeyError("x")
    assert "banner" in capfd.readouterr().err  # a failure shows everything


# ---------------------------------------------------------------------------
# Command lines, as users run them.
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    lines = []
    for i in range(3):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        lines.append(f"{i}.png,{'cat|dog' if i % 2 else 'cat'}")
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("verbose", [False, True])
def test_converter_is_quiet_unless_verbosity(tiny_csv, tmp_path, verbose):
    args = [f"--csv={tiny_csv / 'data.csv'}", f"--image_dir={tiny_csv / 'images'}",
            f"--output_dir={tmp_path / 'out'}", "--num_shards=1", "--num_workers=1"]
    proc = _run("pipelines.csv_to_tfrecord", args + (["--verbosity=1"] if verbose else []))
    assert "wrote 3 images" in proc.stdout
    assert "train: 3 images in" in proc.stderr  # progress stays
    if verbose:
        assert CPP_INFO_LINE.search(proc.stderr), proc.stderr
        assert "Writing 3 images of split 'train'" in proc.stderr  # absl INFO
    else:
        _assert_quiet(proc.stderr)
        assert "Writing 3 images" not in proc.stderr


def test_evaluate_prints_progress_lines_without_a_tty(crl_run):
    proc = _run("mlcrl_tf.evaluate", [f"--model_dir={crl_run.model_dir}",
                                      "--batch_size=4"])
    _assert_quiet(proc.stderr)
    lines = proc.stderr.splitlines()
    assert "\r" not in proc.stderr
    assert lines[0] == "eval: 0/32 images (0.0%)"
    assert re.fullmatch(r"eval: 32 images in \d+:\d\d \([\d.]+ images/s\)", lines[-1])
    assert "| mAP |" in proc.stdout and "eval:" not in proc.stdout


class _Counter:
    def __init__(self):
        self.updates = []

    def update(self, n):
        self.updates.append(n)


def test_evaluate_model_reports_every_batch(crl_run):
    model, config, _, _ = restore.restore_model(crl_run.model_dir)
    dataset = input_pipeline.make_dataset(config.eval_files, 5, 48, 10, training=False)
    counter = _Counter()
    result = evaluator.evaluate_model(model, dataset, 10, progress=counter)
    assert counter.updates == [5] * 6 + [2] and result.num_examples == 32

"""Shared fixtures: a tiny real "outfits" demo set built once per session."""

import os
import socket
import subprocess
import sys
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """64 train / 32 test real Fashion-MNIST canvases at 48 px, as TFRecords.

    Built by the real generator and the real COCO converter.

    Returns:
        dict with `dir`, `train_files`, `test_files` globs and `labels_file`.
    """
    from pipelines.demo import outfits  # pylint: disable=import-outside-toplevel
    root = str(tmp_path_factory.mktemp("demo"))
    outfits.generate(root, num_train=64, num_test=32, canvas_size=48, seed=0,
                          num_workers=1)
    records = os.path.join(root, "tfrecords")
    return {"dir": root,
            "train_files": os.path.join(records, "train-*.tfrecord"),
            "test_files": os.path.join(records, "test-*.tfrecord"),
            "labels_file": os.path.join(records, "labels.txt")}


def small_config(demo_data, model_dir, **overrides):
    """The Config of a small, fast training run on `demo_data` (1 epoch of 3
    steps of batch 8 at 48 px, random init, no decay); `overrides` replace
    any field."""
    from mlcrl_tf.run_dir import config as config_lib  # pylint: disable=import-outside-toplevel
    values = dict(model_dir=str(model_dir), train_files=demo_data["train_files"],
                  eval_files=demo_data["test_files"], backbone="small_cnn",
                  image_size=48, batch_size=8, epochs=1, steps_per_epoch=3,
                  learning_rate=0.05, backbone_learning_rate=0.005, log_every_steps=1,
                  checkpoint_every_steps=2, num_summary_images=0, shuffle_buffer=64,
                  backbone_weights=None, lr_decay_epochs=())
    values.update(overrides)
    return config_lib.Config(**values)


@pytest.fixture(scope="session")
def crl_run(demo_data, tmp_path_factory):
    """A crl training run of 2 epochs x 2 steps on `demo_data` (evaluated
    after each epoch; no summary images, no EMA). Returns its Config."""
    from mlcrl_tf.run_dir import config as config_lib  # pylint: disable=import-outside-toplevel
    from mlcrl_tf.training import train_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.Config(
        model_dir=str(tmp_path_factory.mktemp("crl_run") / "run"),
        train_files=demo_data["train_files"], eval_files=demo_data["test_files"],
        backbone="small_cnn", image_size=48, batch_size=8, epochs=2, steps_per_epoch=2,
        num_summary_images=0, backbone_weights=None, lr_decay_epochs=())
    train_lib.train_and_evaluate(config)
    return config


class FifoUnblocker:
    """Opens FIFOs for writing once a reader may have been blocked on them for
    `after` seconds, so that a reader that blocks gets EOF instead of hanging
    the suite. `rescued` lists every FIFO it had to open: a non-blocking
    reader never needs it. Stopped (its threads joined) by `stop`."""

    def __init__(self):
        self.rescued = []
        self._stop = threading.Event()
        self._threads = []

    def __call__(self, path, after=10):
        def unblock():
            if self._stop.wait(after):
                return
            while not self._stop.is_set():
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                    self.rescued.append(path)
                except OSError:  # No reader (any more), or the FIFO is gone.
                    pass
                self._stop.wait(0.1)

        thread = threading.Thread(target=unblock, name=f"unblock {path}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join()


@pytest.fixture
def fifo_unblocker():
    """`fifo_unblocker(path)` guards a FIFO a test hands to a reader (see
    `FifoUnblocker`); its thread is stopped and joined at teardown."""
    unblocker = FifoUnblocker()
    yield unblocker
    unblocker.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(module, args, env=None, timeout=600, check=True):
    """Runs `python -m module args` from the repo root; returns the process."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_briefly(model, images, labels, steps=4, learning_rate=0.05):
    """A few real steps of the model's own objective (its Keras train_step)
    with the paper's optimizer, on RGB images in [0, 255]."""
    from mlcrl_tf.modeling import optim  # pylint: disable=import-outside-toplevel
    model.compile(optimizer=optim.make_optimizer(model, learning_rate, learning_rate,
                                                 momentum=0.9, weight_decay=1e-4))
    for _ in range(steps):
        model.train_step((images, labels))
    return model

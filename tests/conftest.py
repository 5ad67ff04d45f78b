"""Shared fixtures: a tiny real "outfits" demo set built once per session."""

import os
import socket
import subprocess
import sys
import threading

from PIL import Image
import pytest
from sklearn.datasets import load_sample_images

from pipelines.records import shard_writer

from helpers import H
from helpers import W
from helpers import jpeg_bytes
from helpers import save
from helpers import write_bytes

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


@pytest.fixture(scope="module")
def photos():
    """Two real photos (scikit-learn's china.jpg, flower.jpg) at W x H."""
    china, flower = load_sample_images().images
    return [Image.fromarray(p).resize((W, H), Image.BILINEAR)
            for p in (china, flower)]


@pytest.fixture()
def mixed_records(tmp_path, photos):
    """Six real images (one corrupt, one missing) with labels."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    d = str(image_dir)
    save(d, "a.jpg", photos[0], "JPEG", quality=90)
    save(d, "gray.jpg", photos[1].convert("L"), "JPEG")
    save(d, "png.jpg", photos[1], "PNG")
    exif = Image.Exif()
    exif[0x0112] = 8
    save(d, "rotated.jpg", photos[0], "JPEG", exif=exif.tobytes())
    write_bytes(d, "corrupt.jpg", jpeg_bytes(photos[0])[:300])
    spec = [("a.jpg", (0, 2), ()), ("gray.jpg", (1,), (1,)),
            ("png.jpg", (), ()), ("rotated.jpg", (0, 1, 2), (2,)),
            ("corrupt.jpg", (0,), ()), ("missing.jpg", (1,), ())]
    return [shard_writer.ImageRecord(os.path.join(d, name), name, labels, difficult)
            for name, labels, difficult in spec]


@pytest.fixture
def mount_tmpfs(tmp_path):
    """`mount_tmpfs(size)` gives a directory on its own tmpfs of that size
    ("512k", "64m"): a disk that fills up, or is made read-only, for real
    (skipped where this user may not mount one; the CI runs as root)."""
    mounts = []

    def mount(size, name="disk"):
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(path)], capture_output=True, text=True, check=False)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}): run as root")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(mount_tmpfs):
    """A directory on its own 512 KiB tmpfs (see `mount_tmpfs`)."""
    return mount_tmpfs("512k")


@pytest.fixture
def make_read_only():
    """`make_read_only(directory)` makes a directory read-only for new opens
    (EROFS) while files already open stay writable, as a file system remounted
    read-only under a running process (a read-only bind mount over it);
    `make_read_only(directory, False)` undoes it. Skipped where this user may
    not mount (the CI runs as root)."""
    mounted = []

    def make(directory, read_only=True):
        if not read_only:
            subprocess.run(["umount", str(directory)], check=True)
            mounted.remove(directory)
            return
        for args in (["--bind", str(directory), str(directory)],
                     ["-o", "remount,ro,bind", str(directory)]):
            proc = subprocess.run(["mount", *args], capture_output=True, text=True,
                                  check=False)
            if proc.returncode:
                pytest.skip(f"cannot mount here ({proc.stderr.strip()}): run as root")
            if args[0] == "--bind":
                mounted.append(directory)

    yield make
    for directory in mounted:
        subprocess.run(["umount", str(directory)], check=False)


def fill_disk(directory, leave=0):
    """Fills the file system of `directory` with the file `filler`, leaving
    about `leave` bytes free."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with open(os.path.join(directory, "filler"), "wb") as f:
        f.write(b"\0" * max(0, free - leave))
        f.flush()

"""Bad inputs against the export, predict, visualize and evaluate (issue 13,
items 6, 11, 12, 13, 15, 16, 18): large requests, decompression bombs,
non-finite pixels, special files and symlink loops, outputs that would
destroy inputs or cannot be written, damaged checkpoints. Bombs, FIFOs and
links are built on the fly in tmp directories."""

import errno
import io
import json
import os
import signal
import time

import keras
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from mlcrl_tf.evaluation import visualize_lib
from mlcrl_tf.modeling.model import build_model
from mlcrl_tf.run_dir import config as config_lib
from mlcrl_tf.run_dir import run_files
from mlcrl_tf.serving import contract
from mlcrl_tf.serving import export_client
from mlcrl_tf.serving import export_lib
from mlcrl_tf.serving import predict_lib
from mlcrl_tf.serving import request_checks
from pipelines.records import image_header
from pipelines.records import shard_writer

from conftest import fill_disk
from conftest import run_module
from helpers import gif_of_frames
from helpers import png_bomb

NUM_CLASSES = 4
SIZE = 32
CLASS_NAMES = ["T-shirt/top", "T-shirt_top", "Bag", "bag"]  # Clash when file-safe.
MAX_BATCH = 8
MAX_PIXELS = 1_000_000


def _jpeg(seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_model(NUM_CLASSES, "small_cnn", SIZE, "crl")


@pytest.fixture(scope="module")
def export(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    path = export_lib.export_model(model, str(root / "saved"), CLASS_NAMES,
                                   max_batch_size=MAX_BATCH, max_image_pixels=MAX_PIXELS)
    loaded = tf.saved_model.load(path)
    return {"path": path, "loaded": loaded,
            "serve": loaded.signatures[contract.SERVING_DEFAULT],
            "tensor": loaded.signatures[contract.SERVE_TENSOR]}


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    """A training run's directory (run.json + one checkpoint)."""
    model_dir = str(tmp_path_factory.mktemp("run"))
    config = config_lib.Config(model_dir=model_dir, train_files="unused",
                               backbone="small_cnn", variant="crl", image_size=SIZE,
                               num_classes=NUM_CLASSES)
    run_files.write_run(model_dir, config, CLASS_NAMES)
    tf.train.Checkpoint(model=model).save(os.path.join(model_dir, "ckpt"))
    return model_dir


# --------------------------------------------------------------------------
# Item 12: bounded requests.
# --------------------------------------------------------------------------

def test_requests_above_max_batch_size_are_refused(export):
    serve, tensor = export["serve"], export["tensor"]
    images = [_jpeg(i) for i in range(MAX_BATCH + 1)]
    assert serve(image_bytes=tf.constant(images[:MAX_BATCH]))["logits"].shape == (
        MAX_BATCH, NUM_CLASSES)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"image_bytes: the batch has\] \[9\] \[images, above the "
                             r"limit of this export, max_batch_size=8"):
        serve(image_bytes=tf.constant(images))
    pixels = tf.zeros([MAX_BATCH + 1, SIZE, SIZE, 3])
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_batch_size=8"):
        tensor(images=pixels)
    metadata = export["loaded"].signatures[contract.METADATA]()
    assert int(metadata["max_batch_size"]) == MAX_BATCH
    assert int(metadata["max_image_pixels"]) == MAX_PIXELS


def test_client_splits_requests_at_the_exports_limit(export):
    client = export_client.ExportClient(export["path"])
    assert client.max_batch_size == MAX_BATCH
    images = [_jpeg(i) for i in range(2 * MAX_BATCH + 3)]
    kept, logits, problems = client.score(images)
    assert kept == list(range(len(images))) and not problems
    one = np.stack([client.outputs([data])["logits"][0] for data in images[:3]])
    np.testing.assert_allclose(logits[:3], one, atol=1e-5)


def test_export_limits_are_validated(model, tmp_path):
    for kwargs in ({"max_batch_size": 0}, {"max_image_pixels": -1},
                   {"max_batch_size": True}):
        with pytest.raises(ValueError, match="must be a positive integer"):
            export_lib.export_model(model, str(tmp_path), CLASS_NAMES, **kwargs)


# --------------------------------------------------------------------------
# Item 13: decompression bombs; an out of memory says so.
# --------------------------------------------------------------------------

def test_bomb_in_a_request_is_refused_by_index_before_decoding(export):
    bomb = png_bomb(20000, 20000)  # 48 KB, 1.2 GB once decoded.
    start = time.perf_counter()
    with pytest.raises(tf.errors.InvalidArgumentError) as raised:
        export["serve"](image_bytes=tf.constant([_jpeg(0), bomb, _jpeg(1)]))
    assert time.perf_counter() - start < 5.0  # Decoding it takes ~12 s.
    message = raised.value.message
    assert "refused before decoding the element(s) at index] [1]" in message
    assert ("20000x20000 = 400000000 pixels, above the pixel budget of 1000000"
            in message)


def test_gif_frames_count_against_the_budget(export):
    many = gif_of_frames(200, 100, 60)  # 1.2 MP in 60 frames.
    few = gif_of_frames(200, 100, 40)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="GIF of 60 frame.s. of 200x100: 1200000 pixels"):
        export["serve"](image_bytes=tf.constant([many]))
    assert export["serve"](image_bytes=tf.constant([few]))["logits"].shape == (1, 4)


def _noise_jpeg(width, height, **kwargs):
    """A large JPEG (random pixels at quality 95: ~1.2 bytes per pixel)."""
    rng = np.random.default_rng(width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def test_pixel_budget_of_large_jpegs_reads_a_bounded_prefix(monkeypatch):
    """The header walk of a large JPEG sees its first HEADER_PREFIX_BYTES only
    (it used to copy the whole file into an int64 tensor), with the answers
    of the whole-file rule; a header past the prefix still gets the whole file."""
    large = _noise_jpeg(1200, 900)  # ~1.3 MB, header in its first bytes.
    late_header = _noise_jpeg(1100, 1000,
                              icc_profile=b"\0" * 3 * request_checks.HEADER_PREFIX_BYTES)
    small, png, gif = _jpeg(0), png_bomb(2000, 1000), gif_of_frames(200, 100, 60)
    assert len(large) > 10 * request_checks.HEADER_PREFIX_BYTES
    batch = [large, small, large[:request_checks.HEADER_PREFIX_BYTES + 10], late_header, png, gif,
             b"", b"junk", large[:40]]
    lengths = []
    real = image_header.budget_problem

    def spy(data, max_pixels):  # Eager: records what each element's walk is given.
        lengths.append(int(tf.strings.length(data)))
        return real(data, max_pixels)

    monkeypatch.setattr(image_header, "budget_problem", spy)
    problems = request_checks.pixel_budget_problems(tf.constant(batch), MAX_PIXELS).numpy()
    monkeypatch.undo()
    expected = [image_header.pixel_budget_problem(data, MAX_PIXELS) or "" for data in batch]
    assert [p.decode() for p in problems] == expected
    assert expected[0] == "1200x900 = 1080000 pixels, above the pixel budget of 1000000"
    assert expected[3] == "1100x1000 = 1100000 pixels, above the pixel budget of 1000000"
    assert lengths[0] == lengths[2] == request_checks.HEADER_PREFIX_BYTES
    assert lengths[3] == len(late_header)  # libjpeg needs more than the prefix.
    assert lengths[1] == len(small) and lengths[5] == len(gif)


def test_client_reports_bombs_and_out_of_memory_as_what_they_are(export, monkeypatch):
    client = export_client.ExportClient(export["path"])
    bomb, good = png_bomb(2000, 1000), _jpeg(0)
    kept, _, problems = client.score([good, bomb, b"", b"junk"])
    assert kept == [0]
    reasons = {p.index: p.reason for p in problems}
    assert "2000x1000 = 2000000 pixels, above the pixel budget of 1000000" in reasons[1]
    assert reasons[2] == request_checks.EMPTY and reasons[3] == request_checks.UNKNOWN_FORMAT

    def exhausted(unused_image_bytes):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating")
    monkeypatch.setattr(client, "outputs", exhausted)
    kept, _, problems = client.score([good])
    assert kept == [] and problems == [export_client.ImageProblem(0, request_checks.OUT_OF_MEMORY)]
    assert "out of memory" in request_checks.CORRUPT  # The graph cannot tell them apart.


# --------------------------------------------------------------------------
# Item 16: serve_tensor refuses non-finite and out-of-range pixels.
# --------------------------------------------------------------------------

def test_serve_tensor_refuses_non_finite_and_out_of_range_pixels(export):
    images = np.full((5, SIZE, SIZE, 3), 128.0, np.float32)
    images[0, 0, 0, 0], images[4, 0, 0, 0] = 0.0, 255.0
    assert np.isfinite(export["tensor"](images=tf.constant(images))["logits"]).all()
    images[1, 3, 3, 1] = np.nan
    images[3, 0, 0, 0] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"NaN, infinite or outside \[0, 255\] at index\] \[1 3\]"):
        export["tensor"](images=tf.constant(images))
    for value in (-0.5, 255.5):
        images = np.full((2, SIZE, SIZE, 3), 10.0, np.float32)
        images[1, 5, 5, 2] = value
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"at index\] \[1\]"):
            export["tensor"](images=tf.constant(images))


# --------------------------------------------------------------------------
# Items 6 and 15: predict's inputs and output.
# --------------------------------------------------------------------------

def _photos(folder, count=2):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(os.path.join(folder, f"p{i}.jpg"))
        with open(paths[-1], "wb") as f:
            f.write(_jpeg(i))
    return paths


@pytest.mark.parametrize("case", ["image extension", "an input", "exists"])
def test_predict_output_that_would_destroy_a_file_is_refused(tmp_path, case):
    photos = _photos(str(tmp_path / "photos"))
    notes = str(tmp_path / "photos" / "notes.jsonl")
    with open(notes, "w", encoding="utf-8") as f:
        f.write("mine\n")
    output, inputs, match = {
        "image extension": (photos[0], photos[1:], "has an image file extension"),
        "an input": (str(tmp_path / "photos" / ".." / "photos" / "notes.jsonl"),
                     [notes] + photos, "is one of the input files"),
        "exists": (notes, photos, "already exists; pass --overwrite"),
    }[case]
    before = {p: open(p, "rb").read() for p in photos + [notes]}
    # A bogus export: the output is refused before anything is loaded or read.
    with pytest.raises(ValueError, match=match):
        predict_lib.run(str(tmp_path / "no_export"), inputs, output=output,
                        stderr=io.StringIO())
    assert before == {p: open(p, "rb").read() for p in before}


def test_predict_overwrite_and_unwritable_output(export, tmp_path):
    photos = _photos(str(tmp_path / "photos"))
    output = str(tmp_path / "out" / "new" / "preds.jsonl")  # Parents created.
    assert predict_lib.run(export["path"], photos, output=output, stderr=io.StringIO()) == 0
    assert predict_lib.run(export["path"], photos, output=output, overwrite=True,
                           stderr=io.StringIO()) == 0
    assert len(open(output, encoding="utf-8").read().splitlines()) == 2
    with pytest.raises(ValueError, match="p0.jpg is not a directory"):
        predict_lib.run(export["path"], photos, output=os.path.join(photos[0], "x.jsonl"),
                        stderr=io.StringIO())


@pytest.mark.parametrize("free", [0, 4096])
def test_predict_on_a_full_disk_keeps_the_previous_output(export, tmp_path, small_disk,
                                                          free):
    """A disk full before the start is refused before any image is read; one
    that fills up while the lines are written fails in one line too. Failed
    before: the previous file was truncated, then left half written."""
    photos = _photos(str(tmp_path / "photos"), count=40)  # > 4 KiB of JSON lines
    output = small_disk / "preds.jsonl"
    output.write_text("the previous predictions\n")
    fill_disk(small_disk, leave=free)
    with pytest.raises(ValueError, match="No space left on device"):
        predict_lib.run(export["path"], photos, output=str(output), overwrite=True,
                        all_probabilities=True, stderr=io.StringIO())
    assert output.read_text() == "the previous predictions\n"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "preds.jsonl"]


@pytest.fixture
def alarm():
    """Fails a test that runs longer than 60 s instead of hanging."""
    def timeout(unused_signum, unused_frame):
        # Not an OSError (TimeoutError is one): a directory walk would swallow it.
        raise KeyboardInterrupt("took longer than 60 s (hang?)")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_predict_walk_reads_regular_files_once(export, tmp_path, alarm):
    del alarm
    tree = tmp_path / "tree"
    photos = _photos(str(tree))
    os.mkfifo(tree / "pipe.jpg")
    os.symlink(".", tree / "loop1")
    os.symlink(".", tree / "loop2")
    os.symlink(photos[0], tree / "z_again.jpg")
    big = str(tree / "big.png")
    with open(big, "wb") as f:
        f.write(png_bomb(3000, 3000) + b"\0" * 20_000)
    os.mkfifo(tmp_path / "named.fifo")
    inputs = [str(tree), photos[1], str(tmp_path / "named.fifo")]
    stderr = io.StringIO()
    found, duplicates = predict_lib.search_images(inputs)
    assert duplicates == [str(tree / "z_again.jpg"), photos[1]]
    records = predict_lib.predict_files(export["path"], found, max_image_bytes=10_000)
    by_name = {r["filename"]: r for r in records}
    assert len(records) == len(by_name) == 5
    assert "labels" in by_name[photos[0]] and "labels" in by_name[photos[1]]
    assert by_name[str(tree / "pipe.jpg")]["error"] == "not a regular file (a FIFO), not read"
    assert "not a regular file (a FIFO)" in by_name[str(tmp_path / "named.fifo")]["error"]
    assert "exceeds the size cap --max_image_bytes=10000" in by_name[big]["error"]
    records = predict_lib.predict_files(export["path"], [big])
    assert "3000x3000 = 9000000 pixels, above the pixel budget of 1000000" in (
        records[0]["error"])
    assert predict_lib.run(export["path"], inputs, stderr=stderr,
                           stdout=io.StringIO()) == 0
    assert "2 duplicate path(s) skipped" in stderr.getvalue()


# --------------------------------------------------------------------------
# Item 11: visualize never overwrites its own outputs; bad images skipped.
# --------------------------------------------------------------------------

def test_visualize_names_are_distinct_and_bad_images_are_skipped(model, tmp_path):
    a, b = _photos(str(tmp_path / "a"), 1), _photos(str(tmp_path / "b"), 1)
    bad = str(tmp_path / "bad.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really")
    bomb = str(tmp_path / "bomb.png")
    with open(bomb, "wb") as f:
        f.write(png_bomb(20000, 20000))
    written, problems = visualize_lib.visualize_files(
        model, CLASS_NAMES, [a[0], bad, b[0], bomb, a[0]], str(tmp_path / "out"),
        classes=CLASS_NAMES, tile_size=32)
    assert len(written) == len(set(written)) == 2 * len(CLASS_NAMES)
    assert len(set(os.listdir(tmp_path / "out"))) == 2 * len(CLASS_NAMES)
    names = sorted(os.path.basename(p) for p in written)
    assert "p0~1_T-shirt_top~0.png" in names and "p0~3_bag~3.png" in names
    assert [p for p, _ in problems] == [bad, bomb]
    assert "corrupt or truncated" in problems[0][1]
    assert "above the pixel budget" in problems[1][1]


def test_visualize_run_exit_codes_and_output_dir(run_dir, tmp_path):
    photo = _photos(str(tmp_path / "in"), 1)[0]
    bad = str(tmp_path / "bad.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    options = {"checkpoint": None, "best": False, "use_ema": True}
    out, err = io.StringIO(), io.StringIO()
    assert visualize_lib.run(run_dir, [bad, photo], str(tmp_path / "o"), options, out, err,
                    top_k=1, tile_size=32) == 0
    assert f"warning: {bad}: " in err.getvalue() and len(out.getvalue().split()) == 1
    assert visualize_lib.run(run_dir, [bad], str(tmp_path / "o"), options, io.StringIO(),
                    io.StringIO(), top_k=1) == 1
    with pytest.raises(ValueError, match="output_dir=.*cannot create the directory"):
        visualize_lib.run("/no/such/run", [photo], os.path.join(photo, "x"), options)


# --------------------------------------------------------------------------
# Item 18: damaged checkpoints and unusable outputs are one line.
# --------------------------------------------------------------------------

@pytest.fixture
def damaged_run(run_dir, tmp_path):
    """A copy of the run whose checkpoint data file is cut in half."""
    copy = str(tmp_path / "damaged")
    os.makedirs(copy)
    for name in os.listdir(run_dir):
        with open(os.path.join(run_dir, name), "rb") as f:
            data = f.read()
        if name.startswith("ckpt-1.data"):
            data = data[:len(data) // 2]
        with open(os.path.join(copy, name), "wb") as f:
            f.write(data)
    return copy


@pytest.fixture
def eval_files(tmp_path):
    """A one-shard test split of two real JPEGs with the run's classes."""
    photos = _photos(str(tmp_path / "eval_images"))
    records = [shard_writer.ImageRecord(p, os.path.basename(p), (i,))
               for i, p in enumerate(photos)]
    shard_writer.write_split(records, str(tmp_path / "records"), "test", CLASS_NAMES,
                             num_shards=1, num_workers=1)
    return str(tmp_path / "records" / "test-*.tfrecord")


def test_damaged_checkpoint_is_one_error_naming_it(damaged_run, eval_files, tmp_path):
    with pytest.raises(ValueError, match=r"checkpoint '.*damaged/ckpt-1' cannot be read"):
        export_lib.export_from_model_dir(damaged_run, str(tmp_path / "e"))
    for module, args in [
            ("mlcrl_tf.export", [f"--model_dir={damaged_run}",
                                 f"--export_dir={tmp_path / 'e'}"]),
            ("mlcrl_tf.evaluate", [f"--model_dir={damaged_run}",
                                   f"--eval_files={eval_files}"]),
            ("mlcrl_tf.visualize", [f"--model_dir={damaged_run}",
                                    f"--output_dir={tmp_path / 'v'}", "x.jpg"])]:
        proc = run_module(module, args, check=False, timeout=300)
        assert proc.returncode == 1, (module, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: checkpoint '{damaged_run}/ckpt-1' cannot be read"), (
            module, last)
        assert "Traceback" not in proc.stderr, module


def test_unusable_output_locations_are_one_error(run_dir, model, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="export_dir=.*cannot create the directory"):
        export_lib.export_model(model, str(blocker / "e"), CLASS_NAMES)

    def full(*unused_args, **unused_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tf.saved_model, "save", full)
    with pytest.raises(ValueError, match="cannot write the export.*No space left"):
        export_lib.export_model(model, str(tmp_path / "e"), CLASS_NAMES)
    assert os.listdir(tmp_path / "e") == []
    for flag in ("output_json", "output_scores"):
        proc = run_module("mlcrl_tf.evaluate", [f"--model_dir={run_dir}",
                                                "--eval_files=unused",
                                                f"--{flag}={blocker / 'x' / 'm.json'}"],
                          check=False, timeout=300)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(
            f"error: --{flag}='{blocker}/x/m.json': cannot create the directory: ")


def test_predict_cli_refuses_a_glob_expanded_output(export, tmp_path):
    photos = _photos(str(tmp_path / "photos"), 3)
    before = open(photos[0], "rb").read()
    # What `predict --output photos/*.jpg` gives after the shell's expansion.
    proc = run_module("mlcrl_tf.predict", [f"--saved_model={export['path']}", "--output",
                                           *photos], check=False, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has an image file extension" in proc.stderr.strip().splitlines()[-1]
    assert open(photos[0], "rb").read() == before
    out = tmp_path / "preds.jsonl"
    proc = run_module("mlcrl_tf.predict", [f"--saved_model={export['path']}",
                                           f"--output={out}", *photos], timeout=300)
    assert [json.loads(line)["filename"] for line in out.read_text().splitlines()] == photos

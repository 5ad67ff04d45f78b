"""Data integrity of the input pipeline (pipelines.record_stream), on the real
demo shards written by the real converter (with its per-shard counts):
truncated and corrupt shards are named, never silently shortened; a training
set where nothing decodes stops instead of hanging; undecodable records are
reported once per file (evaluation) or per pass (training)."""

import glob
import os
import shutil

import pytest
import tensorflow as tf

from mlcrl_tf.evaluation import evaluator
from pipelines.records import schema
from pipelines.tfdata import input_pipeline
from pipelines.tfdata import record_stream
from pipelines.tfdata import skip_counts

from conftest import run_module


@pytest.fixture()
def shards(demo_data, tmp_path):
    """A private copy of the demo test split (4 shards, 32 records, report)."""
    source = os.path.dirname(demo_data["test_files"])
    for path in glob.glob(os.path.join(source, "test*")) + [demo_data["labels_file"]]:
        shutil.copy(path, tmp_path)
    return str(tmp_path / "test-*.tfrecord")


def _collect(ds):
    return [n.decode() for b in ds.as_numpy_iterator() for n in b["filename"]]


def _damage(pattern, how):
    """Truncates the first shard mid-record, or flips a byte in a record."""
    path = sorted(glob.glob(pattern))[0]
    data = open(path, "rb").read()
    if how == "truncate":
        data = data[:len(data) // 2]
    else:
        middle = len(data) // 2
        data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
    with open(path, "wb") as f:
        f.write(data)
    return os.path.basename(path)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_shard_is_named_in_evaluation(shards, how):
    name = _damage(shards, how)
    ds = input_pipeline.make_dataset(shards, 8, 48, 10, training=False)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        _collect(ds)
    message = record_stream.input_error_message(error.value)
    assert name in message and "converter report says 8" in message, message
    assert "truncated or corrupt" in message


def test_a_damaged_shard_stops_training_too(shards):
    name = _damage(shards, "truncate")
    ds = input_pipeline.make_dataset(shards, 4, 48, 10, training=True, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        for _ in ds.take(40):
            pass
    assert name in record_stream.input_error_message(error.value)


def test_evaluate_model_reports_an_incomplete_set_as_an_error(shards, demo_data):
    """No metric is printed for an incomplete evaluation set."""
    _damage(shards, "truncate")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        evaluator.evaluate_model(
            _Model(), input_pipeline.make_dataset(shards, 8, 48, 10, training=False), 10)


class _Model:
    """Stands in for an MLCRLModel: logits from the mean pixel."""

    def inference_model(self, images, training=False):
        del training
        return tf.tile(tf.reduce_mean(images, axis=(1, 2, 3))[:, None], [1, 10])


def _rewrite(pattern, broken):
    """Replaces the image bytes of every record with `broken` (same counts)."""
    for path in glob.glob(pattern):
        records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
        with tf.io.TFRecordWriter(path) as writer:
            for record in records:
                example = tf.train.Example.FromString(record)
                example.features.feature[schema.ENCODED_KEY].bytes_list.value[0] = (
                    broken)
                writer.write(example.SerializeToString())


def test_training_where_nothing_decodes_stops_instead_of_hanging(shards):
    _rewrite(shards, b"random bytes, another tool's data")
    ds = input_pipeline.make_dataset(shards, 4, 48, 10, training=True, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        next(iter(ds))
    message = record_stream.input_error_message(error.value)
    assert "no image could be decoded in two whole passes" in message
    assert "test-00000-of-00004.tfrecord" in message


def test_undecodable_records_are_counted_and_reported_once_per_file(shards, capfd, tmp_path):
    path = sorted(glob.glob(shards))[1]
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    with tf.io.TFRecordWriter(path) as writer:
        for i, record in enumerate(records):
            if i in (2, 5):
                example = tf.train.Example.FromString(record)
                example.features.feature[schema.ENCODED_KEY].bytes_list.value[0] = (
                    b"\xff\xd8\xff broken JPEG")
                record = example.SerializeToString()
            writer.write(record)
    counter = skip_counts.SkipCounter()
    names = _collect(input_pipeline.make_dataset(shards, 8, 48, 10, training=False,
                                                 skip_counter=counter))
    assert (len(names), counter.read, counter.delivered, counter.skipped) == (30, 32, 30, 2)
    lines = [line for line in capfd.readouterr().err.splitlines()
             if "could not be decoded" in line and str(tmp_path) in line]
    assert len(lines) == 1, lines  # one line for the file, not one per record
    assert "2 of 8 records of" in lines[0] and os.path.basename(path) in lines[0]


def test_the_error_message_is_extracted():
    error = tf.errors.InvalidArgumentError(
        None, None, f"assertion failed: [{record_stream.ERROR_TAG}] [a.tfrecord] [holds] "
        "[3] [readable records]\n\t [[{{node x}}]]")
    assert record_stream.input_error_message(error) == "a.tfrecord holds 3 readable records"
    assert record_stream.input_error_message(ValueError("other")) is None


def test_train_cli_stops_with_one_line_when_nothing_decodes(shards, tmp_path):
    _rewrite(shards, b"II*\x00 TIFF data the pipeline cannot decode")
    proc = run_module("mlcrl_tf.train", [
        f"--model_dir={tmp_path / 'run'}", f"--train_files={shards}", "--backbone=small_cnn",
        "--backbone_weights=", "--lr_decay_epochs=", "--image_size=48", "--batch_size=4",
        "--epochs=1"], check=False, timeout=300)
    assert proc.returncode != 0
    assert "error: training data: no image could be decoded" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr) < 20_000, "warnings must be rate-limited"


def test_images_above_the_pixel_budget_are_skipped_undecoded(shards):
    """The budget is read from the header before decoding (issue 13 item 13):
    the 48x48 demo canvases (2,304 px) are all above a 2,000 px budget."""
    counter = skip_counts.SkipCounter()
    ds = input_pipeline.make_dataset(shards, 8, 48, 10, training=False, max_pixels=2000,
                                     skip_counter=counter)
    assert _collect(ds) == [] and counter.skipped == 32
    assert len(_collect(input_pipeline.make_dataset(shards, 8, 48, 10, training=False,
                                                    max_pixels=2304))) == 32


def _skip_warnings(capfd, shards):
    """Skip warnings about `shards` (ordered) or about any training pass: an
    earlier test's pipeline may still be printing about its own files."""
    return [line for line in capfd.readouterr().err.splitlines()
            if "could not be decoded" in line
            and (os.path.dirname(shards) in line or "training input" in line)]


def _worker_names(shards, num_workers, training, **kwargs):
    """Filenames each of `num_workers` input pipelines delivers, and its counter."""
    out = []
    for worker in range(num_workers):
        context = tf.distribute.InputContext(num_input_pipelines=num_workers,
                                             input_pipeline_id=worker,
                                             num_replicas_in_sync=num_workers)
        counter = skip_counts.SkipCounter()
        ds = input_pipeline.make_dataset(shards, 2 * num_workers, 48, 10, training=training,
                                         input_context=context, skip_counter=counter,
                                         seed=0, **kwargs)
        if training:
            ds = ds.take(8)  # batches of 2: 4 passes over 4 records
        out.append((_collect(ds), counter))
    return out


@pytest.mark.parametrize("num_workers", [2, 3, 8])
def test_workers_split_the_records_without_false_skips(shards, capfd, num_workers):
    """4 shard files of 8 records: 2 and 3 workers split the files, 8 workers
    (more than the files) the records. Each record goes to one worker, and
    no worker reports skips for records another worker got."""
    workers = _worker_names(shards, num_workers, training=False)
    names = [name for got, _ in workers for name in got]
    assert len(names) == 32 and len(set(names)) == 32
    for got, counter in workers:
        assert (counter.read, counter.delivered, counter.skipped) == (len(got), len(got), 0)
    assert not _skip_warnings(capfd, shards)


def test_workers_sharing_records_report_no_false_skips_in_training(shards, capfd):
    for got, counter in _worker_names(shards, 8, training=True):
        assert len(got) == 16 and counter.skipped == 0
    assert not _skip_warnings(capfd, shards)


@pytest.mark.parametrize("num_workers", [2, 8])
def test_a_damaged_shard_is_named_by_every_worker(shards, num_workers):
    """Whether the workers split the files or the records, the worker(s)
    reading the damaged file name it."""
    name = _damage(shards, "truncate")
    failed = 0
    for worker in range(num_workers):
        context = tf.distribute.InputContext(num_input_pipelines=num_workers,
                                             input_pipeline_id=worker)
        ds = input_pipeline.make_dataset(shards, 2 * num_workers, 48, 10, training=False,
                                         input_context=context)
        try:
            _collect(ds)
        except tf.errors.InvalidArgumentError as error:
            failed += 1
            assert name in record_stream.input_error_message(error)
    assert failed == (1 if num_workers == 2 else num_workers)

"""Label embeddings in TensorBoard: the training labels' co-occurrence
(pipelines.label_stats), the closeness-vs-PMI analysis (mlcrl_tf.label_space)
and what TrainingSummaries writes for the Projector tab, checked against
plain-Python references and after a real (tiny) training run."""

import functools
import glob
import itertools
import math
import os

from google.protobuf import text_format
import numpy as np
import pytest
from tensorboard.plugins import projector
import tensorflow as tf

from mlcrl_tf.evaluation import label_space
from mlcrl_tf.modeling.model import build_model
from mlcrl_tf.run_dir import restore
from mlcrl_tf.training import summaries
from pipelines.records import schema
from pipelines.tfdata import label_stats
from pipelines.tfdata import tfds_source

# (label ids, difficult ids) per image: repeats, an empty image, difficult ids.
RECORDS = [([0, 2], []), ([2, 0, 2], [2]), ([], []), ([1], [1]), ([0, 1, 3], []),
           ([3], []), ([0, 2, 3], [3])]
NUM_CLASSES = 5  # class 4 never occurs


def _loop_pairs(label_lists, num_classes):
    pairs = [[0] * num_classes for _ in range(num_classes)]
    for labels in label_lists:
        for i in set(labels):
            for j in set(labels):
                pairs[i][j] += 1
    return np.array(pairs)


def _write_shards(directory, records, num_shards=2):
    os.makedirs(directory, exist_ok=True)
    for shard in range(num_shards):
        path = os.path.join(directory, f"train-{shard:05d}-of-{num_shards:05d}.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for k, (labels, difficult) in enumerate(records[shard::num_shards]):
                writer.write(schema.make_example(
                    b"\xff\xd8 not decoded", f"{shard}_{k}.jpg", labels,
                    difficult).SerializeToString())
    return os.path.join(directory, "train-*.tfrecord")


# ---------------------------------------------------------------------------
# Counting the training labels.
# ---------------------------------------------------------------------------

def test_count_labels_equals_a_loop_reference(tmp_path):
    pattern = _write_shards(str(tmp_path), RECORDS)
    counts = label_stats.count_labels(pattern, NUM_CLASSES)
    expected = _loop_pairs([labels for labels, _ in RECORDS], NUM_CLASSES)
    np.testing.assert_array_equal(counts.pairs, expected)
    assert counts.num_records == len(RECORDS)
    np.testing.assert_array_equal(counts.classes, [4, 2, 3, 3, 0])


def test_count_labels_across_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(label_stats, "BATCH_SIZE", 2)
    pattern = _write_shards(str(tmp_path), RECORDS * 3, num_shards=3)
    expected = _loop_pairs([labels for labels, _ in RECORDS * 3], NUM_CLASSES)
    np.testing.assert_array_equal(label_stats.count_labels(pattern, NUM_CLASSES).pairs,
                                  expected)


def test_count_labels_errors_name_the_source(tmp_path):
    pattern = _write_shards(str(tmp_path), [([0, 7], [])], num_shards=1)
    with pytest.raises(ValueError, match=r"train-\*\.tfrecord: class id 7 is outside"):
        label_stats.count_labels(pattern, NUM_CLASSES)
    with pytest.raises(ValueError, match="nothing-.* matches no file"):
        label_stats.count_labels(str(tmp_path / "nothing-*.tfrecord"), NUM_CLASSES)
    (tmp_path / "bad-00000-of-00001.tfrecord").write_bytes(b"not a record" * 4)
    with pytest.raises(ValueError, match=r"^\S*bad-\*\.tfrecord: cannot read the labels: "
                       r"corrupted record at 0[^\[{]*$"):
        label_stats.count_labels(str(tmp_path / "bad-*.tfrecord"), NUM_CLASSES)


def test_count_labels_of_a_tfds_split(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    labels = [[0, 5, 9], [2], [5, 9], [9]]
    examples = [{"image": b"jpeg", "image/filename": f"{i}.jpg", "labels": ids,
                 "labels_no_difficult": ids} for i, ids in enumerate(labels)]
    signature = {"image": tf.TensorSpec([], tf.string),
                 "image/filename": tf.TensorSpec([], tf.string),
                 "labels": tf.TensorSpec([None], tf.int64),
                 "labels_no_difficult": tf.TensorSpec([None], tf.int64)}

    def as_dataset(*unused_args, **unused_kwargs):
        return tf.data.Dataset.from_generator(lambda: iter(examples),
                                              output_signature=signature)

    # Under mock_data nothing is "prepared": open the split as if downloaded.
    monkeypatch.setattr(tfds_source, "open_split",
                        functools.partial(tfds_source.open_split, download=True))
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        counts = label_stats.count_labels("tfds:voc/2007:train", 20)
    np.testing.assert_array_equal(counts.pairs, _loop_pairs(labels, 20))
    assert counts.num_records == 4


def test_pmi_equals_a_loop_reference():
    pairs = _loop_pairs([labels for labels, _ in RECORDS], NUM_CLASSES)
    counts = label_stats.LabelCounts(pairs=pairs, num_records=len(RECORDS))
    pmi = label_stats.pmi(counts)
    n = len(RECORDS)
    for i, j in itertools.product(range(NUM_CLASSES), repeat=2):
        if pairs[i][j] == 0:
            assert pmi[i, j] == -math.inf
        else:
            expected = math.log((pairs[i][j] / n) / ((pairs[i][i] / n) * (pairs[j][j] / n)))
            assert pmi[i, j] == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------
# The analysis.
# ---------------------------------------------------------------------------

def _loop_ranks(values):
    return [1 + sum(v < x for v in values) + (sum(v == x for v in values) - 1) / 2
            for x in values]


def _loop_pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_spearman_with_ties_and_infinities_equals_a_loop_reference():
    x = [3.0, -math.inf, 1.0, 1.0, 7.5, -math.inf, 2.0]
    y = [0.5, 0.1, 0.1, 2.0, 3.0, -1.0, 0.1]
    assert label_space.average_ranks(x).tolist() == _loop_ranks(x)
    assert label_space.spearman(x, y) == pytest.approx(
        _loop_pearson(_loop_ranks(x), _loop_ranks(y)), abs=1e-12)
    assert math.isnan(label_space.spearman([1.0, 1.0, 1.0], y[:3]))


def test_cooccurrence_correlation_equals_a_loop_reference():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(NUM_CLASSES, 3))
    pairs = _loop_pairs([labels for labels, _ in RECORDS], NUM_CLASSES)
    pmi = label_stats.pmi(label_stats.LabelCounts(pairs, len(RECORDS)))
    closeness, together = [], []
    for i in range(NUM_CLASSES):
        for j in range(i + 1, NUM_CLASSES):
            closeness.append(-math.dist(embeddings[i], embeddings[j]))
            together.append(pmi[i, j])
    rho, num_pairs = label_space.cooccurrence_correlation(embeddings, pmi)
    assert num_pairs == 10
    assert rho == pytest.approx(
        _loop_pearson(_loop_ranks(closeness), _loop_ranks(together)), abs=1e-12)


def test_comparison_image_colours():
    names = ["a", "b", "c"]
    pmi = np.array([[1.0, 0.0, -np.inf], [0.0, 1.0, 2.0], [-np.inf, 2.0, 1.0]])
    collapsed = np.ones((3, 3))
    image = label_space.comparison_image(collapsed, pmi, names, caption="rho")
    assert image.dtype == np.uint8 and image.ndim == 3
    shown = label_space.pmi_display(pmi)
    assert shown[0, 2] == 0.0 and shown[0, 1] == 0.5 and shown[1, 2] == 1.0
    assert np.all(np.diagonal(shown) == 1.0)
    assert np.all(label_space.closeness_matrix(np.zeros((3, 3))) == 1.0)


# ---------------------------------------------------------------------------
# What TensorBoard gets.
# ---------------------------------------------------------------------------

def _projector_files(directory):
    """(ProjectorConfig, (C, D) embeddings, metadata rows) as TensorBoard reads them."""
    config = projector.ProjectorConfig()
    with open(os.path.join(directory, "projector_config.pbtxt")) as f:
        text_format.Parse(f.read(), config)
    (embedding,) = config.embeddings
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(directory))
    values = reader.get_tensor(embedding.tensor_name)
    with open(os.path.join(directory, embedding.metadata_path)) as f:
        rows = [line.rstrip("\n").split("\t") for line in f]
    return config, values, rows


def _summaries(directory, tag):
    """[(step, tensor)] of one tag in the event files of a directory."""
    found = []
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            found += [(event.step, tf.make_ndarray(v.tensor))
                      for v in event.summary.value if v.tag == tag]
    return sorted(found, key=lambda item: item[0])


def test_training_writes_the_projector_files(crl_run, demo_data):
    eval_dir = os.path.join(crl_run.model_dir, "eval")
    config, values, rows = _projector_files(eval_dir)
    assert config.embeddings[0].tensor_name == summaries.TENSOR_NAME
    model, _, class_names, _ = restore.restore_model(crl_run.model_dir, use_ema=False)
    assert values.shape == (10, 10)  # C rows, the last evaluation's (step 4)
    np.testing.assert_allclose(values, model.label_embeddings().numpy(), atol=1e-6)
    assert [r[0] for r in rows[1:]] == class_names and rows[0] == [
        "class", "id", "train_images"]
    counts = label_stats.count_labels(demo_data["train_files"], 10)
    assert [int(r[2]) for r in rows[1:]] == counts.classes.tolist()
    assert tf.train.latest_checkpoint(eval_dir).endswith("label_embeddings-4")
    assert len(glob.glob(os.path.join(eval_dir, "label_embeddings-*.index"))) == 1


def test_training_writes_closeness_vs_cooccurrence(crl_run):
    eval_dir = os.path.join(crl_run.model_dir, "eval")
    images = _summaries(eval_dir, summaries.IMAGE_TAG)
    assert [step for step, _ in images] == [2, 4]
    width, height = (int(v) for v in images[-1][1][:2])
    assert tf.io.decode_png(images[-1][1][2]).shape == (height, width, 3)
    rhos = _summaries(eval_dir, summaries.SPEARMAN_TAG)
    assert [step for step, _ in rhos] == [2, 4]
    # Each logged rho is the correlation of that step's label embeddings (the
    # checkpoint saved at the end of the epoch, just before its evaluation)
    # with the PMI of the training labels, recomputed here: by label_space
    # and by the plain loop reference.
    counts = label_stats.count_labels(crl_run.train_files, 10)
    pmi = label_stats.pmi(counts)
    upper = list(itertools.combinations(range(10), 2))
    for step, rho in rhos:
        model, _, _, _ = restore.restore_model(
            crl_run.model_dir, checkpoint=os.path.join(crl_run.model_dir, f"ckpt-{step}"),
            use_ema=False)
        embeddings = model.label_embeddings().numpy()
        expected, num_pairs = label_space.cooccurrence_correlation(embeddings, pmi)
        assert num_pairs == len(upper) == 45
        closeness = [-math.dist(embeddings[i].astype(np.float64),
                                embeddings[j].astype(np.float64)) for i, j in upper]
        together = [float(pmi[i, j]) for i, j in upper]
        by_loops = _loop_pearson(_loop_ranks(closeness), _loop_ranks(together))
        assert expected == pytest.approx(by_loops, abs=1e-9)
        assert np.isfinite(expected)
        assert float(rho) == pytest.approx(expected, abs=1e-6), step  # float32 scalar


def test_nothing_for_a_variant_without_a_label_projector(tmp_path):
    writer = summaries.TrainingSummaries(str(tmp_path))
    model = build_model(3, backbone="small_cnn", image_size=32, variant="baseline")
    assert not writer.write_label_embeddings(1, model, ["a", "b", "c"], "unused-*")
    assert not os.path.exists(tmp_path / "eval" / "projector_config.pbtxt")


def test_unreadable_training_labels_still_write_the_projector(tmp_path, caplog):
    writer = summaries.TrainingSummaries(str(tmp_path))
    model = build_model(3, backbone="small_cnn", image_size=32, variant="crl")
    assert writer.write_label_embeddings(1, model, ["a", "b\tc", "d"],
                                         str(tmp_path / "missing-*.tfrecord"))
    writer.flush()
    _, values, rows = _projector_files(str(tmp_path / "eval"))
    assert values.shape == (3, 3) and rows[2] == ["b c", "1", ""]
    assert "No label co-occurrence in TensorBoard" in caplog.text
    assert not _summaries(str(tmp_path / "eval"), summaries.IMAGE_TAG)

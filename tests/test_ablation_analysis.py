"""Tests of the ablation's analyses (benchmarks/ablation/ablation_analysis.py) against
plain-Python loop references, and of the pretraining stage
(benchmarks/ablation/pretrain_backbone.py): pretrain -> save -> build_model loads the
same backbone weights bit for bit."""

import math
import os
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks", "ablation"))

# pylint: disable=wrong-import-position
import ablation_analysis as analysis  # noqa: E402
import pretrain_backbone  # noqa: E402

from mlcrl_tf.modeling import model as model_lib
from pipelines.demo import fashion_mnist  # noqa: E402

# pylint: enable=wrong-import-position


# ---------------------------------------------------------------------------
# Plain-Python references.
# ---------------------------------------------------------------------------

def _loop_ap(scores, positive):
    """AP of one class, distinct scores: mean precision at each positive."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if positive[i]:
            hits += 1
            total += hits / rank
    return total / hits


def _loop_ranks(values):
    return [1 + sum(v < x for v in values) + (sum(v == x for v in values) - 1) / 2
            for x in values]


def _loop_pearson(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy)


def _coco(items):
    """items: {file_name: [(class_id, visible_fraction), ...]}."""
    images, annotations = [], []
    for image_id, (name, pasted) in enumerate(items.items(), start=1):
        images.append({"id": image_id, "file_name": name})
        for class_id, fraction in pasted:
            annotations.append({"image_id": image_id, "category_id": class_id + 1,
                                "visible_fraction": fraction})
    return {"images": images, "annotations": annotations}


# ---------------------------------------------------------------------------
# Hidden-label AP.
# ---------------------------------------------------------------------------

def test_hidden_label_masks_match_a_loop_reference():
    rng = np.random.default_rng(0)
    items = {f"test_{i:06d}.jpg": [(int(rng.integers(4)), float(rng.uniform(0.25, 1)))
                                   for _ in range(int(rng.integers(1, 5)))]
             for i in range(60)}
    filenames = list(items)[::-1]  # the scores' order need not be the file order
    best = analysis.max_visible_fraction(_coco(items), filenames, 4)
    positives, ignore = analysis.hidden_label_masks(best, 0.5)
    for row, name in enumerate(filenames):
        for c in range(4):
            fractions = [f for k, f in items[name] if k == c]
            hidden = bool(fractions) and all(f < 0.5 for f in fractions)
            assert positives[row, c] == hidden
            assert ignore[row, c] == (bool(fractions) and not hidden)
            assert (math.isnan(best[row, c]) if not fractions
                    else best[row, c] == max(fractions))
    assert positives.sum() > 5 and ignore.sum() > 5


def test_hidden_label_masks_one_visible_item_is_not_hidden():
    items = {"a.jpg": [(0, 0.3), (0, 0.9)], "b.jpg": [(0, 0.3), (0, 0.49)],
             "c.jpg": [(1, 0.2)]}
    best = analysis.max_visible_fraction(_coco(items), ["a.jpg", "b.jpg", "c.jpg"], 2)
    positives, ignore = analysis.hidden_label_masks(best)
    np.testing.assert_array_equal(positives, [[0, 0], [1, 0], [0, 1]])
    np.testing.assert_array_equal(ignore, [[1, 0], [0, 0], [0, 0]])


def test_max_visible_fraction_names_an_unknown_file():
    with pytest.raises(ValueError, match="'zzz.jpg'"):
        analysis.max_visible_fraction(_coco({"a.jpg": [(0, 1.0)]}), ["a.jpg", "zzz.jpg"], 2)


def test_hidden_label_ap_matches_a_loop_reference():
    rng = np.random.default_rng(1)
    n, c = 200, 3
    logits = rng.normal(0, 8, (n, c))  # large logits: sigmoids would tie
    present = rng.random((n, c)) < 0.5
    positives = present & (rng.random((n, c)) < 0.4)
    ignore = present & ~positives
    logits[positives] += 2.0
    result = analysis.hidden_label_ap(logits, positives, ignore, min_positives=10)
    for k in range(c):
        keep = [i for i in range(n) if not ignore[i, k]]
        expected = _loop_ap([logits[i, k] for i in keep], [positives[i, k] for i in keep])
        assert result["per_class"][k] == pytest.approx(expected, abs=1e-12)
        assert result["num_positives"][k] == positives[:, k].sum()
    assert result["mean"] == pytest.approx(np.mean(result["per_class"]))
    assert result["classes"] == [0, 1, 2]


def test_hidden_label_ap_skips_classes_with_few_positives():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(50, 2))
    positives = np.zeros((50, 2), bool)
    positives[:20, 0] = True
    positives[:3, 1] = True
    result = analysis.hidden_label_ap(logits, positives, np.zeros_like(positives), 5)
    assert result["classes"] == [0]
    assert math.isnan(result["per_class"][1])
    assert result["mean"] == result["per_class"][0]
    assert result["num_positives"].tolist() == [20, 3]


# ---------------------------------------------------------------------------
# Label projector analysis.
# ---------------------------------------------------------------------------

def test_pmi_matches_a_loop_reference():
    rng = np.random.default_rng(3)
    labels = (rng.random((300, 5)) < [0.5, 0.3, 0.2, 0.4, 0.0]).astype(np.float32)
    labels[:, 2] = np.maximum(labels[:, 2], labels[:, 1])  # correlated pair
    pmi = analysis.pmi_matrix(labels)
    n = len(labels)
    for i in range(5):
        for j in range(5):
            both = sum(1 for row in labels if row[i] and row[j]) / n
            pi = sum(1 for row in labels if row[i]) / n
            pj = sum(1 for row in labels if row[j]) / n
            expected = math.log(both / (pi * pj)) if both else -math.inf
            assert pmi[i, j] == pytest.approx(expected, abs=1e-12)
    assert pmi[1, 2] > 0 and np.isneginf(pmi[4, 0])


def test_spearman_matches_a_loop_reference_with_ties():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 6, 40).astype(float)  # many ties
    y = x + rng.normal(0, 2, 40)
    y[:5] = -np.inf
    expected = _loop_pearson(_loop_ranks(list(x)), _loop_ranks(list(y)))
    assert analysis.spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert analysis.average_ranks(x).tolist() == _loop_ranks(list(x))
    scipy_stats = pytest.importorskip("scipy.stats")
    assert analysis.spearman(x, y) == pytest.approx(
        scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


def test_pairwise_distances_match_a_loop_reference():
    e = np.random.default_rng(5).normal(size=(4, 3))
    d = analysis.pairwise_distances(e)
    for i in range(4):
        for j in range(4):
            assert d[i, j] == pytest.approx(
                math.sqrt(sum((e[i, k] - e[j, k]) ** 2 for k in range(3))), abs=1e-12)


def test_embedding_correlation_matches_a_loop_reference():
    rng = np.random.default_rng(6)
    labels = (rng.random((500, 4)) < 0.4).astype(np.float32)
    labels[:, 1] = np.maximum(labels[:, 1], labels[:, 0] * (rng.random(500) < 0.8))
    embeddings = rng.normal(size=(4, 4))
    pmi = analysis.pmi_matrix(labels)
    closeness, cooccurrence = [], []
    for i in range(4):
        for j in range(i + 1, 4):
            closeness.append(-math.dist(embeddings[i], embeddings[j]))
            cooccurrence.append(pmi[i, j])
    rho, pairs = analysis.embedding_pmi_correlation(embeddings, labels)
    assert pairs == 6
    assert rho == pytest.approx(
        _loop_pearson(_loop_ranks(closeness), _loop_ranks(cooccurrence)), abs=1e-12)


# ---------------------------------------------------------------------------
# Verdicts and convergence.
# ---------------------------------------------------------------------------

def test_active_relu_units_match_a_loop_reference():
    rng = np.random.default_rng(5)
    c = 6
    widths = [c, 3, 2, 3, c]
    weights = [(rng.normal(size=(a, b)), rng.normal(size=b))
               for a, b in zip(widths[:-1], widths[1:])]
    weights[2] = (weights[2][0], np.full(3, -100.0))  # third layer dead for every class
    expected = []
    activations = [[1.0 if i == k else 0.0 for i in range(c)] for k in range(c)]
    for kernel, bias in weights[:-1]:
        activations = [[max(0.0, sum(row[i] * kernel[i][j] for i in range(len(row)))
                            + bias[j]) for j in range(len(bias))] for row in activations]
        expected.append((sum(any(row[j] > 0 for row in activations)
                             for j in range(len(bias))), len(bias)))
    assert analysis.active_relu_units(weights) == expected
    assert expected[2] == (0, 3)


def test_paired_t_interval_matches_a_loop_reference():
    a = {0: 60.0, 1: 62.5, 2: 59.0, 3: 61.0, 4: 63.0, 7: 99.0}
    b = {0: 59.0, 1: 61.0, 2: 59.5, 3: 60.0, 4: 61.5, 8: 0.0}
    result = analysis.paired_t_interval(a, b)
    diffs = [a[s] - b[s] for s in (0, 1, 2, 3, 4)]
    mean = sum(diffs) / 5
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    half = 2.7764 * sd / math.sqrt(5)
    assert result["seeds"] == [0, 1, 2, 3, 4]
    assert result["diffs"] == diffs
    assert result["mean"] == pytest.approx(mean)
    assert result["low"] == pytest.approx(mean - half)
    assert result["high"] == pytest.approx(mean + half)
    one = analysis.paired_t_interval({0: 1.0}, {0: 0.5})
    assert one["mean"] == 0.5 and math.isnan(one["half_width"])


def test_t_critical_values_agree_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in list(range(1, 31)) + [31, 40, 60, 200]:
        assert analysis.t_critical_95(df) == pytest.approx(
            scipy_stats.t.ppf(0.975, df), abs=2e-4)
    with pytest.raises(ValueError, match="df=0"):
        analysis.t_critical_95(0)


def test_verdict_sentence_reads_the_interval():
    helps = analysis.verdict_sentence(
        {"mean": 1.0, "low": 0.2, "high": 1.8, "diffs": [1, 1]}, "baseline", "mAP")
    hurts = analysis.verdict_sentence(
        {"mean": -1.0, "low": -1.8, "high": -0.2, "diffs": [-1, -1]}, "mse", "mAP")
    null = analysis.verdict_sentence(
        {"mean": 0.3, "low": -0.4, "high": 1.0, "diffs": [0.3, 0.3]}, "tbc", "mAP")
    assert "crl helps" in helps and "crl hurts" in hurts
    assert "crl helps" not in null and "crl hurts" not in null
    assert "a gain larger than +1.00 mAP" in null
    assert "a loss larger than 0.40 mAP" in null
    # An end that rounds to 0.0 at one decimal still reads as above 0.
    barely = analysis.verdict_sentence(
        {"mean": 0.4, "low": 0.02, "high": 0.78, "diffs": [0.3, 0.5]}, "mse", "mAP")
    assert "[+0.02, +0.78]" in barely and "crl helps" in barely


@pytest.mark.parametrize("maps,decay,expected", [
    ([0.50, 0.55, 0.60, 0.601, 0.602], 3, True),    # flat after the decay
    ([0.50, 0.55, 0.60, 0.601, 0.605], 3, False),   # +0.4 points
    ([0.50, 0.55, 0.60, 0.60, 0.598], 3, True),     # falling counts as stopped
    ([0.50, 0.55, 0.60, 0.601, 0.602], 4, False),   # only one eval after the decay
    ([0.50, 0.501], 0, True),                        # no decay
    ([0.50], 0, False),
])
def test_convergence_rule(maps, decay, expected):
    converged, rise = analysis.convergence(maps, decay)
    assert converged == expected
    if len(maps) >= 2:
        assert rise == pytest.approx(100 * (maps[-1] - maps[-2]))


def test_heatmap_shape_and_colours():
    m = np.array([[0.0, 1.0], [-np.inf, 0.5]])
    image = analysis.heatmap(m, cell=3)
    assert image.shape == (6, 6, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [33, 102, 172]      # min: blue
    assert image[0, 3].tolist() == [178, 24, 43]       # max: red
    assert image[3, 0].tolist() == [160, 160, 160]     # -inf: gray
    assert image[3, 3].tolist() == [247, 247, 247]     # middle: white


# ---------------------------------------------------------------------------
# The pretraining stage: pretrain -> save -> build_model(backbone_weights=).
# ---------------------------------------------------------------------------

def test_pretrain_save_load_round_trip(tmp_path):
    images, labels = pretrain_backbone.make_canvases("train", 48, 32, seed=0)
    assert images.shape == (48, 32, 32, 3) and images.dtype == np.uint8
    assert set(labels.tolist()) <= set(range(10)) and len(set(labels.tolist())) > 5
    classifier, backbone = pretrain_backbone.build_classifier(32)
    initial = [w.copy() for w in backbone.get_weights()]
    pretrain_backbone.train_classifier(classifier, images, labels, epochs=1,
                                       batch_size=16, learning_rate=0.05, seed=0)
    trained = backbone.get_weights()
    path = str(tmp_path / "small_cnn.weights.h5")
    pretrain_backbone.save_backbone(backbone, path)
    # Kernels and the batch-norm moving statistics both moved.
    assert sum(not np.array_equal(a, b) for a, b in zip(initial, trained)) == len(trained)
    for size, variant in ((32, "crl"), (48, "baseline")):  # any input size loads
        model = model_lib.build_model(10, backbone="small_cnn", image_size=size,
                                      variant=variant, backbone_weights=path)
        loaded = model.backbone.get_weights()
        assert len(loaded) == len(trained)
        for a, b in zip(loaded, trained):
            assert a.dtype == b.dtype and np.array_equal(a, b)


def test_pretrain_is_cached_and_checks_the_file_name(tmp_path):
    path = str(tmp_path / "bb.weights.h5")
    settings = dict(canvas_size=32, num_train=32, num_test=16, epochs=1, batch_size=16)
    report = pretrain_backbone.pretrain(path, **settings)
    assert report["settings"]["num_test"] == 16
    stamp = os.path.getmtime(path)
    assert pretrain_backbone.pretrain(path, **settings) == report
    assert os.path.getmtime(path) == stamp  # reused, not retrained
    with pytest.raises(ValueError, match="must end with .weights.h5"):
        pretrain_backbone.pretrain(str(tmp_path / "bb.h5"), **settings)


def test_single_item_canvases_are_deterministic_and_split_pure():
    a = pretrain_backbone.make_canvases("test", 12, 32, seed=0)
    b = pretrain_backbone.make_canvases("test", 12, 32, seed=0)
    c = pretrain_backbone.make_canvases("test", 12, 32, seed=1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    _, test_labels = fashion_mnist.load_fashion_mnist("test")
    order = np.random.default_rng([pretrain_backbone.STREAM, 0, 1]).permutation(
        len(test_labels))
    assert a[1].tolist() == test_labels[order[:12]].tolist()

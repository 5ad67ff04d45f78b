"""Tests for mlcrl_tf.metrics against plain-loop references, sklearn and hand-computed examples."""

import ast
import math
import pathlib

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mlcrl_tf.evaluation import metrics
from mlcrl_tf.evaluation.metrics import MetricAccumulator
from mlcrl_tf.evaluation.metrics import average_precision
from mlcrl_tf.evaluation.metrics import multilabel_metrics
from mlcrl_tf.evaluation.tables import format_per_class_ap
from mlcrl_tf.evaluation.tables import format_table

SCALAR_KEYS = ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1",
               "CP_top3", "CR_top3", "CF1_top3", "OP_top3", "OR_top3", "OF1_top3")


# --------------------------------------------------------------------------
# Plain, obviously-correct references (Python loops)
# --------------------------------------------------------------------------

def ref_average_precision(scores, labels, ignore=None):
    """Per class: AP = mean over positives of (#positives scoring >= s) / (#items scoring >= s)."""
    n, c = len(scores), len(scores[0])
    result = []
    for j in range(c):
        items = [(float(scores[i][j]), bool(labels[i][j])) for i in range(n)
                 if ignore is None or not ignore[i][j]]
        precisions = []
        for s, is_pos in items:
            if not is_pos:
                continue
            at_or_above = [lab for t, lab in items if t >= s]
            precisions.append(sum(at_or_above) / len(at_or_above))
        result.append(sum(precisions) / len(precisions) if precisions else math.nan)
    return result


def _ref_f1(p, r):
    if math.isnan(p) or math.isnan(r):
        return math.nan
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _ref_prf(predicted, scores, labels, ignore):
    n, c = len(scores), len(scores[0])
    tp, fp, fn = [0] * c, [0] * c, [0] * c
    for i in range(n):
        for j in range(c):
            if ignore is not None and ignore[i][j]:
                continue
            pred, pos = predicted(i, j), bool(labels[i][j])
            if pred and pos:
                tp[j] += 1
            elif pred:
                fp[j] += 1
            elif pos:
                fn[j] += 1
    precisions = [tp[j] / (tp[j] + fp[j]) if tp[j] + fp[j] else 0.0 for j in range(c)]
    recalls = [tp[j] / (tp[j] + fn[j]) for j in range(c) if tp[j] + fn[j]]
    cp = sum(precisions) / c
    cr = sum(recalls) / len(recalls) if recalls else math.nan
    op = sum(tp) / (sum(tp) + sum(fp)) if sum(tp) + sum(fp) else 0.0
    or_ = sum(tp) / (sum(tp) + sum(fn)) if sum(tp) + sum(fn) else math.nan
    return {"CP": cp, "CR": cr, "CF1": _ref_f1(cp, cr),
            "OP": op, "OR": or_, "OF1": _ref_f1(op, or_)}


def ref_metrics(scores, labels, threshold=0.5, top_k=3, ignore=None):
    c = len(scores[0])
    ap = ref_average_precision(scores, labels, ignore)
    valid = [a for a in ap if not math.isnan(a)]
    out = {"mAP": sum(valid) / len(valid) if valid else math.nan}
    out.update(_ref_prf(lambda i, j: scores[i][j] >= threshold, scores, labels, ignore))
    tops = [set(sorted(range(c), key=lambda j: (-scores[i][j], j))[:top_k])
            for i in range(len(scores))]
    top = _ref_prf(lambda i, j: j in tops[i] and scores[i][j] >= threshold,
                   scores, labels, ignore)
    out.update({f"{k}_top{top_k}": v for k, v in top.items()})
    out["AP"] = ap
    return out


def assert_metrics_close(got, expected, tol=1e-12):
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=0, atol=tol, equal_nan=True,
                                   err_msg=key)


def random_case(rng, n, c, ties=False, with_ignore=False, pos_rate=0.3):
    scores = rng.random((n, c))
    if ties:
        scores = np.round(scores * 8) / 8  # few distinct values -> many ties
    labels = (rng.random((n, c)) < pos_rate).astype(np.int64)
    ignore = (rng.random((n, c)) < 0.15) if with_ignore else None
    return scores, labels, ignore


CASES = [(n, c, ties, ign) for n, c in [(1, 1), (4, 3), (30, 6), (90, 9)]
         for ties in (False, True) for ign in (False, True)]


# --------------------------------------------------------------------------
# Against the loop references
# --------------------------------------------------------------------------

@pytest.mark.parametrize("n,c,ties,with_ignore", CASES)
def test_matches_loop_reference(n, c, ties, with_ignore):
    rng = np.random.default_rng(1000 * n + 10 * c + 2 * ties + with_ignore)
    scores, labels, ignore = random_case(rng, n, c, ties, with_ignore)
    for threshold, top_k in [(0.5, 3), (0.3, 1), (0.75, 5), (1.0, 2)]:
        got = multilabel_metrics(scores, labels, threshold=threshold, top_k=top_k,
                                 ignore=ignore)
        expected = ref_metrics(scores.tolist(), labels.tolist(), threshold, top_k,
                               None if ignore is None else ignore.tolist())
        assert_metrics_close(got, expected)
        np.testing.assert_allclose(average_precision(scores, labels, ignore), expected["AP"],
                                   rtol=0, atol=1e-12, equal_nan=True)


# --------------------------------------------------------------------------
# Against sklearn
# --------------------------------------------------------------------------

@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_matches_sklearn(ties, seed):
    rng = np.random.default_rng(seed)
    n, c = 200, 12
    scores, labels, _ = random_case(rng, n, c, ties=ties)
    if not ties:
        assert all(len(np.unique(scores[:, j])) == n for j in range(c))
    ap = average_precision(scores, labels)
    for j in range(c):
        if labels[:, j].any():
            assert ap[j] == pytest.approx(
                average_precision_score(labels[:, j], scores[:, j]), abs=1e-12)


def test_ap_with_ignore_matches_sklearn_on_kept_rows():
    rng = np.random.default_rng(7)
    scores, labels, ignore = random_case(rng, 150, 8, ties=True, with_ignore=True)
    ap = average_precision(scores, labels, ignore)
    for j in range(8):
        keep = ~ignore[:, j]
        assert ap[j] == pytest.approx(
            average_precision_score(labels[keep, j], scores[keep, j]), abs=1e-12)


# --------------------------------------------------------------------------
# Hand-computed examples
# --------------------------------------------------------------------------

def test_hand_example_3x3():
    scores = np.array([[0.9, 0.6, 0.1],
                       [0.8, 0.3, 0.7],
                       [0.2, 0.4, 0.55]])
    labels = np.array([[1, 0, 0],
                       [1, 1, 0],
                       [0, 1, 1]])
    # class 0: ranks 0.9(+) 0.8(+) 0.2(-)  -> AP 1;      TP 2 FP 0 FN 0
    # class 1: ranks 0.6(-) 0.4(+) 0.3(+)  -> AP (1/2 + 2/3)/2 = 7/12; TP 0 FP 1 FN 2
    # class 2: ranks 0.7(-) 0.55(+) 0.1(-) -> AP 1/2;    TP 1 FP 1 FN 0
    m = multilabel_metrics(scores, labels)
    np.testing.assert_allclose(m["AP"], [1.0, 7 / 12, 0.5], atol=1e-15)
    expected = {
        "mAP": 25 / 36,
        "CP": (1 + 0 + 0.5) / 3, "CR": (1 + 0 + 1) / 3, "CF1": 4 / 7,
        "OP": 3 / 5, "OR": 3 / 5, "OF1": 3 / 5,
        # 3 classes: top-3 keeps every class.
        "CP_top3": 0.5, "CR_top3": 2 / 3, "CF1_top3": 4 / 7,
        "OP_top3": 0.6, "OR_top3": 0.6, "OF1_top3": 0.6,
    }
    assert_metrics_close(m, expected, tol=1e-15)
    assert set(SCALAR_KEYS) | {"AP"} == set(m)
    assert all(type(m[k]) is float for k in SCALAR_KEYS)


def test_hand_example_top3_with_five_classes():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.1],
                       [0.3, 0.95, 0.2, 0.85, 0.45]])
    labels = np.array([[1, 0, 0, 1, 0],
                       [0, 1, 0, 0, 1]])
    # All labels: image 0 predicts {0,1,2,3}, image 1 predicts {1,3}.
    #   per class (TP,FP,FN): c0 (1,0,0) c1 (1,1,0) c2 (0,1,0; no positives)
    #                         c3 (1,1,0) c4 (0,0,1; never predicted)
    #   CP = (1 + .5 + 0 + .5 + 0)/5 = .4 ; CR over c0,c1,c3,c4 = (1+1+1+0)/4 = .75
    #   OP = 3/6, OR = 3/4
    # Top-3: image 0 -> {0,1,2} (class 3 drops out), image 1 -> top {1,3,4} but
    #   class 4 has 0.45 < 0.5, so {1,3}.
    #   c0 (1,0,0) c1 (1,1,0) c2 (0,1,0) c3 (0,1,1) c4 (0,0,1)
    #   CP = (1 + .5)/5 = .3 ; CR = (1+1+0+0)/4 = .5 ; OP = 2/5 ; OR = 2/4
    # AP: c0 1, c1 1, c2 NaN, c3 (0.85-, 0.6+) 1/2, c4 1 -> mAP 3.5/4
    m = multilabel_metrics(scores, labels)
    expected = {
        "mAP": 0.875, "CP": 0.4, "CR": 0.75, "CF1": 12 / 23,
        "OP": 0.5, "OR": 0.75, "OF1": 0.6,
        "CP_top3": 0.3, "CR_top3": 0.5, "CF1_top3": 0.375,
        "OP_top3": 0.4, "OR_top3": 0.5, "OF1_top3": 4 / 9,
    }
    assert_metrics_close(m, expected, tol=1e-15)
    assert math.isnan(m["AP"][2])
    np.testing.assert_allclose(np.array(m["AP"])[[0, 1, 3, 4]], [1, 1, 0.5, 1])


def test_top_k_suffix_follows_top_k():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.1]])
    labels = np.array([[1, 0, 0, 1, 0]])
    m = multilabel_metrics(scores, labels, top_k=1)
    assert {"CP_top1", "OF1_top1"} <= set(m) and "CP_top3" not in m
    # top-1 keeps class 0 only: TP 1, FP 0, FN 1 (class 3).
    assert m["OP_top1"] == 1.0 and m["OR_top1"] == 0.5
    assert "CF1_top5" in multilabel_metrics(scores, labels, top_k=5)


def test_top_k_ties_go_to_lower_class_id():
    scores = np.full((1, 5), 0.6)
    labels = np.array([[0, 0, 1, 1, 1]])
    m = multilabel_metrics(scores, labels, top_k=3)
    # Classes 0, 1, 2 are selected: TP 1 (class 2), FP 2, FN 2.
    assert m["OP_top3"] == pytest.approx(1 / 3)
    assert m["OR_top3"] == pytest.approx(1 / 3)
    # Labels reversed to [1, 1, 1, 0, 0]: the lowest ids {0, 1, 2} are all positives.
    m2 = multilabel_metrics(scores, labels[:, ::-1], top_k=3)
    assert m2["OP_top3"] == 1.0 and m2["OR_top3"] == 1.0


def test_ap_ties_hand_example():
    # Tie group {0.5, 0.5, 0.5} holds one positive: its precision is 1/3 whatever the
    # order; the positive at 0.2 has precision 2/4. AP = (1/3 + 1/2)/2 = 5/12.
    scores = np.array([[0.5], [0.5], [0.5], [0.2]])
    for labels in ([[1], [0], [0], [1]], [[0], [0], [1], [1]]):
        assert average_precision(scores, np.array(labels))[0] == pytest.approx(5 / 12)


def test_ignore_hand_example():
    scores = np.array([[0.3], [0.9], [0.8]])
    labels = np.array([[1], [0], [1]])
    assert average_precision(scores, labels)[0] == pytest.approx(7 / 12)
    ignore = np.array([[False], [True], [False]])
    assert average_precision(scores, labels, ignore)[0] == pytest.approx(1.0)
    m = multilabel_metrics(scores, labels, ignore=ignore)
    # Without the ignored FP at 0.9: predicted {0.8 +}, missed {0.3 +}.
    assert (m["OP"], m["OR"], m["CP"], m["CR"]) == (1.0, 0.5, 1.0, 0.5)


def test_ignore_still_takes_a_top_k_slot():
    scores = np.array([[0.9, 0.8, 0.7]])
    labels = np.array([[0, 1, 1]])
    ignore = np.array([[True, False, False]])
    m = multilabel_metrics(scores, labels, top_k=1, ignore=ignore)
    # Class 0 (ignored) is the top-1: it is not counted, classes 1 and 2 are FN.
    assert m["OP_top1"] == 0.0 and m["OR_top1"] == 0.0
    assert m["OR"] == 1.0 and m["OP"] == 1.0


# --------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------

def test_class_without_positives():
    scores = np.array([[0.9, 0.8, 0.2], [0.1, 0.7, 0.1]])
    labels = np.array([[1, 0, 0], [0, 1, 0]])  # class 2: no positive, never predicted
    m = multilabel_metrics(scores, labels)
    assert math.isnan(average_precision(scores, labels)[2])
    assert math.isnan(m["AP"][2])
    assert m["mAP"] == pytest.approx((1 + 0.5) / 2)  # class 1: 0.8(-) 0.7(+) -> 1/2
    assert m["CR"] == 1.0  # mean over classes 0 and 1 only
    assert m["CP"] == pytest.approx((1 + 0.5 + 0) / 3)  # class 2 counts, precision 0


def test_class_never_predicted_counts_as_precision_zero():
    scores = np.array([[0.9, 0.4], [0.8, 0.3]])
    labels = np.array([[1, 1], [1, 0]])
    m = multilabel_metrics(scores, labels)
    assert m["CP"] == 0.5 and m["CR"] == 0.5 and m["OP"] == 1.0


def test_no_positive_anywhere_gives_nan_where_undefined():
    scores = np.array([[0.9, 0.1], [0.2, 0.3]])
    m = multilabel_metrics(scores, np.zeros((2, 2)))
    for key in ("mAP", "CR", "CF1", "OR", "OF1", "CR_top3", "OR_top3"):
        assert math.isnan(m[key]), key
    assert m["CP"] == 0.0 and m["OP"] == 0.0


def test_all_correct_and_all_wrong():
    rng = np.random.default_rng(3)
    n, c = 40, 6
    labels = np.zeros((n, c), dtype=np.int64)
    for i in range(n):  # 1 to 3 positives per image
        labels[i, rng.choice(c, size=rng.integers(1, 4), replace=False)] = 1
    labels[:c] = np.eye(c, dtype=np.int64)  # every class has a positive
    correct = multilabel_metrics(labels.astype(np.float64), labels)
    for key in SCALAR_KEYS:
        assert correct[key] == 1.0, key
    wrong = multilabel_metrics(1.0 - labels, labels)
    for key in SCALAR_KEYS[1:]:
        assert wrong[key] == 0.0, key
    # Positives all tied at the bottom: AP of class j = (#positives) / N.
    np.testing.assert_allclose(wrong["AP"], labels.sum(0) / n, atol=1e-15)


def test_ignore_equals_removal():
    rng = np.random.default_rng(11)
    scores, labels, ignore = random_case(rng, 60, 7, ties=True, with_ignore=True)
    ap = average_precision(scores, labels, ignore)
    for j in range(7):
        keep = ~ignore[:, j]
        expected = average_precision(scores[keep, j:j + 1], labels[keep, j:j + 1])[0]
        np.testing.assert_allclose(ap[j], expected, atol=1e-15, equal_nan=True)
    # For the all-label metrics, an ignored entry is like a true negative that is
    # not predicted (score 0, label 0): it adds no TP, FP or FN.
    m = multilabel_metrics(scores, labels, ignore=ignore)
    neutral = multilabel_metrics(np.where(ignore, 0.0, scores), np.where(ignore, 0, labels))
    for key in ("CP", "CR", "CF1", "OP", "OR", "OF1"):
        assert m[key] == pytest.approx(neutral[key], abs=1e-15), key
    assert m["CP"] != multilabel_metrics(scores, labels)["CP"]


def test_order_invariance():
    rng = np.random.default_rng(5)
    scores, labels, ignore = random_case(rng, 80, 8, ties=True, with_ignore=True)
    base = multilabel_metrics(scores, labels, ignore=ignore)
    for _ in range(3):
        perm = rng.permutation(80)
        shuffled = multilabel_metrics(scores[perm], labels[perm], ignore=ignore[perm])
        assert_metrics_close(shuffled, base, tol=1e-14)


def test_label_and_ignore_dtypes():
    rng = np.random.default_rng(2)
    scores, labels, ignore = random_case(rng, 20, 4, with_ignore=True)
    base = multilabel_metrics(scores, labels.astype(bool), ignore=ignore)
    for lab in (labels, labels.astype(np.float32), labels.astype(np.uint8)):
        for ign in (ignore, ignore.astype(np.int32), ignore.astype(np.float64)):
            assert_metrics_close(multilabel_metrics(scores, lab, ignore=ign), base, tol=0)
    assert_metrics_close(multilabel_metrics(scores.astype(np.float32).tolist(),
                                            labels.tolist(), ignore=ignore.tolist()),
                         multilabel_metrics(scores.astype(np.float32), labels, ignore=ignore),
                         tol=0)


def test_chunked_computation_matches(monkeypatch):
    rng = np.random.default_rng(9)
    scores, labels, ignore = random_case(rng, 50, 7, ties=True, with_ignore=True)
    whole = multilabel_metrics(scores, labels, ignore=ignore)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 13)  # several rows / columns per chunk
    assert_metrics_close(multilabel_metrics(scores, labels, ignore=ignore), whole, tol=1e-14)


def test_module_does_not_import_tensorflow():
    tree = ast.parse(pathlib.Path(metrics.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"math", "re", "collections", "numpy"}, imported


# --------------------------------------------------------------------------
# MetricAccumulator
# --------------------------------------------------------------------------

def _feed(acc, scores, labels, ignore, rng, max_batch):
    start = 0
    while start < len(scores):
        size = int(rng.integers(0, max_batch + 1))
        rows = slice(start, start + size)
        acc.update(scores[rows], labels[rows], None if ignore is None else ignore[rows])
        start += size


@pytest.mark.parametrize("with_ignore", [False, True])
def test_accumulator_equals_one_shot(with_ignore):
    rng = np.random.default_rng(21)
    scores, labels, ignore = random_case(rng, 500, 10, ties=True, with_ignore=with_ignore)
    scores = scores.astype(np.float32)
    acc = MetricAccumulator(10, initial_capacity=4)
    _feed(acc, scores, labels, ignore, rng, max_batch=37)
    assert acc.num_examples == 500
    for threshold, top_k in [(0.5, 3), (0.25, 2)]:
        got = acc.result(threshold=threshold, top_k=top_k)
        want = multilabel_metrics(scores, labels, threshold, top_k, ignore=ignore)
        assert_metrics_close(got, want, tol=0)


def test_accumulator_ignore_given_for_some_batches_only():
    rng = np.random.default_rng(4)
    scores, labels, ignore = random_case(rng, 30, 5, with_ignore=True)
    scores = scores.astype(np.float32)
    ignore[:10] = False
    acc = MetricAccumulator(5)
    acc.update(scores[:10], labels[:10])  # no mask for the first batch
    acc.update(scores[10:], labels[10:], ignore[10:])
    assert_metrics_close(acc.result(), multilabel_metrics(scores, labels, ignore=ignore), tol=0)


def test_accumulator_growth_many_small_batches():
    rng = np.random.default_rng(8)
    scores, labels, _ = random_case(rng, 7000, 6)
    scores = scores.astype(np.float32)
    acc = MetricAccumulator(6, initial_capacity=1)
    reallocations, previous = 0, acc._scores
    for b in range(1000):
        acc.update(scores[7 * b:7 * b + 7], labels[7 * b:7 * b + 7])
        reallocations += acc._scores is not previous
        previous = acc._scores
        assert acc.capacity >= acc.num_examples
    assert acc.num_examples == 7000
    assert 7000 <= acc.capacity < 2 * 7000  # amortised doubling, no over-allocation
    assert reallocations <= 14  # ~log2(7000) reallocations, not one per batch
    # Data held once, in NumPy buffers: no Python list of batches anywhere.
    assert not any(isinstance(v, (list, tuple, dict)) for v in vars(acc).values())
    assert acc._scores.dtype == np.float32 and acc._labels.dtype in (np.bool_, np.uint8)
    assert_metrics_close(acc.result(), multilabel_metrics(scores, labels), tol=0)


def test_accumulator_reset():
    rng = np.random.default_rng(6)
    scores, labels, ignore = random_case(rng, 20, 3, with_ignore=True)
    scores = scores.astype(np.float32)
    acc = MetricAccumulator(3)
    acc.update(scores, labels, ignore)
    acc.reset()
    assert acc.num_examples == 0
    with pytest.raises(ValueError, match="update"):
        acc.result()
    acc.update(scores[:12], labels[:12])  # no mask now: stale ignore rows must not leak
    assert_metrics_close(acc.result(), multilabel_metrics(scores[:12], labels[:12]), tol=0)


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------

HEADER = ("| method | mAP | CF1 | CP | CR | OF1 | OP | OR | CF1_top3 | CP_top3 | CR_top3 "
          "| OF1_top3 | OP_top3 | OR_top3 |")


def test_format_table_layout_and_values():
    scores = np.array([[0.9, 0.6, 0.1], [0.8, 0.3, 0.7], [0.2, 0.4, 0.55]])
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]])
    m = multilabel_metrics(scores, labels)
    text = format_table({"ours": m, "paper": {"mAP": 0.811, "CF1": 0.758}})
    lines = text.splitlines()
    assert lines[0] == HEADER
    assert len(lines) == 4
    # mAP 25/36 = 69.4 %, CF1 4/7 = 57.1 %, CP 50.0, CR 66.7, OF1 = OP = OR = 60.0
    assert lines[2] == ("| ours | 69.4 | 57.1 | 50.0 | 66.7 | 60.0 | 60.0 | 60.0 "
                        "| 57.1 | 50.0 | 66.7 | 60.0 | 60.0 | 60.0 |")
    assert lines[3].startswith("| paper | 81.1 | 75.8 | - | - |")


def test_format_table_mean_std_and_top5():
    rows = {"CRL": {"mAP": (0.8114, 0.0031), "CF1_top5": (0.5, 0.0)}}
    text = format_table(rows)
    assert "| CRL | 81.1 ± 0.3 |" in text
    assert "CF1_top5" in text.splitlines()[0] and "_top3" not in text
    assert "50.0 ± 0.0" in text


def test_format_table_per_class():
    scores = np.array([[0.9, 0.6, 0.1], [0.8, 0.3, 0.7], [0.2, 0.4, 0.55]])
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]])
    m = multilabel_metrics(scores, labels)
    text = format_table({"ours": m}, per_class=True, class_names=["aero", "bike", "bird"])
    assert "| method | aero | bike | bird | mAP |" in text
    assert "| ours | 100.0 | 58.3 | 50.0 | 69.4 |" in text


def test_format_per_class_ap():
    text = format_per_class_ap([1.0, 0.5, math.nan], ["a", "b", "c"], method="x")
    lines = text.splitlines()
    assert lines[0] == "| method | a | b | c | mAP |"
    assert lines[2] == "| x | 100.0 | 50.0 | nan | 75.0 |"
    text = format_per_class_ap({"s": [(0.9, 0.01), (0.7, 0.02)]})
    assert "| method | 0 | 1 | mAP |" in text
    assert "| s | 90.0 ± 1.0 | 70.0 ± 2.0 | 80.0 |" in text
    with pytest.raises(ValueError, match="class_names"):
        format_per_class_ap([0.5, 0.5], ["a"])


# --------------------------------------------------------------------------
# Ranking on logits (float32 probabilities saturate at 1.0 for logits >= 16.6)
# --------------------------------------------------------------------------

def _saturating_case(seed=0, n=60, c=5):
    """Logits in [17, 40]: every float32 sigmoid of them is exactly 1.0."""
    rng = np.random.default_rng(seed)
    logits = rng.uniform(17.0, 40.0, (n, c)).astype(np.float32)
    labels = (rng.random((n, c)) < 0.4).astype(np.int64)
    labels[0] = 1  # every class has a positive
    return logits, labels


def test_logits_17_to_40_give_the_exact_ap_of_the_logit_ranking():
    logits, labels = _saturating_case()
    probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))
    assert np.all(probabilities == 1.0)  # the trap: float32 flattens the ranking
    expected = ref_average_precision(logits.tolist(), labels.tolist())
    np.testing.assert_allclose(average_precision(logits, labels, from_logits=True),
                               expected, rtol=0, atol=1e-12)
    got = multilabel_metrics(logits, labels, from_logits=True)
    # Logit >= 0 <=> probability >= 0.5: every label is predicted; top-3 by logit.
    assert_metrics_close(got, ref_metrics(logits.tolist(), labels.tolist(), threshold=0.0))
    flat = multilabel_metrics(probabilities, labels)
    assert abs(flat["mAP"] - got["mAP"]) > 0.01, "ranking probabilities must lose here"


def test_accumulator_from_logits_equals_one_shot():
    logits, labels = _saturating_case(seed=1, n=50, c=4)
    ignore = np.random.default_rng(2).random(logits.shape) < 0.1
    acc = MetricAccumulator(4, initial_capacity=8, from_logits=True)
    for start in range(0, 50, 7):
        acc.update(logits[start:start + 7], labels[start:start + 7],
                   ignore=ignore[start:start + 7])
    assert_metrics_close(acc.result(), multilabel_metrics(logits, labels, ignore=ignore,
                                                          from_logits=True))


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.9])
def test_logit_threshold_is_the_probability_threshold(threshold):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (40, 6))
    labels = (rng.random((40, 6)) < 0.3).astype(int)
    probabilities = 1.0 / (1.0 + np.exp(-logits))  # float64: no saturation here
    assert_metrics_close(multilabel_metrics(logits, labels, threshold, from_logits=True),
                         multilabel_metrics(probabilities, labels, threshold), tol=1e-12)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

S = np.array([[0.2, 0.8], [0.6, 0.4]])
L = np.array([[0, 1], [1, 0]])

BAD_CALLS = [
    ("1-D scores", lambda: multilabel_metrics(S[0], L[0]), "scores"),
    ("3-D scores", lambda: average_precision(S[None], L[None]), "scores"),
    ("1-D labels", lambda: multilabel_metrics(S, L[0]), "labels"),
    ("shape mismatch", lambda: multilabel_metrics(S, L[:1]), "labels"),
    ("ignore shape", lambda: multilabel_metrics(S, L, ignore=np.zeros((2, 3), bool)), "ignore"),
    ("ragged scores", lambda: average_precision([[0.1, 0.2], [0.3]], L), "scores"),
    ("labels 2", lambda: multilabel_metrics(S, L * 2), "labels"),
    ("labels 0.5", lambda: average_precision(S, L * 0.5), "labels"),
    ("labels str", lambda: average_precision(S, np.array([["a", "b"], ["c", "d"]])), "labels"),
    ("nan scores", lambda: multilabel_metrics(np.where(L, np.nan, S), L), "scores.*non-finite"),
    ("inf scores", lambda: average_precision(np.where(L, np.inf, S), L), "scores.*non-finite"),
    ("logits", lambda: multilabel_metrics(S * 4 - 2, L), "scores.*probabilities.*from_logits"),
    ("str scores", lambda: average_precision(np.array([["a", "b"], ["c", "d"]]), L), "scores"),
    ("empty", lambda: multilabel_metrics(np.zeros((0, 2)), np.zeros((0, 2))), "scores"),
    ("threshold 0", lambda: multilabel_metrics(S, L, threshold=0.0), "threshold"),
    ("threshold >1", lambda: multilabel_metrics(S, L, threshold=1.5), "threshold"),
    ("threshold nan", lambda: multilabel_metrics(S, L, threshold=math.nan), "threshold"),
    ("threshold str", lambda: multilabel_metrics(S, L, threshold="half"), "threshold"),
    ("top_k 0", lambda: multilabel_metrics(S, L, top_k=0), "top_k"),
    ("top_k float", lambda: multilabel_metrics(S, L, top_k=2.5), "top_k"),
    ("top_k bool", lambda: multilabel_metrics(S, L, top_k=True), "top_k"),
    ("ignore 2", lambda: multilabel_metrics(S, L, ignore=L * 2), "ignore"),
    ("ignore str", lambda: average_precision(S, L, ignore=np.array([["y", "n"], ["n", "y"]])),
     "ignore"),
    ("num_classes 0", lambda: MetricAccumulator(0), "num_classes"),
    ("num_classes float", lambda: MetricAccumulator(2.0), "num_classes"),
    ("acc mismatch", lambda: MetricAccumulator(3).update(S, L), "num_classes"),
    ("acc bad labels", lambda: MetricAccumulator(2).update(S, L + 1), "labels"),
    ("acc threshold", lambda: MetricAccumulator(2).result(threshold=2), "threshold"),
    ("table empty", lambda: format_table({}), "rows"),
    ("table bad value", lambda: format_table({"a": {"mAP": "high"}}), "rows"),
    ("table mixed k", lambda: format_table({"a": {"CF1_top3": 1}, "b": {"CF1_top5": 1}}), "rows"),
]


@pytest.mark.parametrize("name,call,pattern", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_value_error(name, call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()

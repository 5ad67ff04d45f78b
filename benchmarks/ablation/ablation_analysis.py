"""The ablation's analyses (issue 14), as plain NumPy functions.

`benchmarks/ablation/ablation.py` reads the runs' files and calls these; they hold no
I/O and no TensorFlow, so tests compare them with loop references.

* Hidden-label AP (paper Fig. 1b): per class, the AP whose positives are only
  the images where EVERY item of the class is mostly hidden, against all
  images without the class; the class's other positives are ignored.
* The label projector: Spearman correlation between -distance of the label
  embeddings f_l(I_C) and the training labels' pointwise mutual information.
* Why a label projector collapsed: the ReLU units of each hidden layer of
  f_l that are active for at least one class (0 = a dead layer, a constant
  output).
* The pre-registered verdict: the paired-by-seed mean difference and its
  Student-t interval; "helps" only where the interval excludes 0.
* The convergence rule on the per-epoch eval mAP.
"""

import math

import numpy as np

from mlcrl_tf.evaluation import label_space
from mlcrl_tf.evaluation import metrics
from pipelines.tfdata import label_stats

HIDDEN_BELOW = 0.5     # an item is mostly hidden below this visible fraction
CONVERGED_RISE = 0.3   # mAP points over the last two evaluations

# Two-sided 95 % Student t critical values t_{0.975, df}, df = 1..30.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622,
         2.2281, 2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009,
         2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518,
         2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


# --------------------------------------------------------------------------
# Hidden-label AP.
# --------------------------------------------------------------------------

def max_visible_fraction(coco, filenames, num_classes):
    """Per image and class: the largest visible fraction of its items.

    Args:
        coco: a demo-set COCO dict (annotations carry `visible_fraction`;
            category ids are class id + 1).
        filenames: (N,) image file names, in the order of the scores.
        num_classes: C.

    Returns:
        float64 (N, C): the most visible item's fraction; NaN where the image
        has no item of the class.

    Raises:
        ValueError: a file name that is not in `coco`.
    """
    row_of = {}
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    index = {str(name): i for i, name in enumerate(filenames)}
    for image_id, name in names.items():
        if name in index:
            row_of[image_id] = index[name]
    missing = sorted(set(index) - set(names.values()))
    if missing:
        raise ValueError(f"filenames: {missing[0]!r} (and {len(missing) - 1} more) "
                         "not in the annotations.")
    best = np.full((len(filenames), num_classes), np.nan)
    for a in coco["annotations"]:
        row = row_of.get(a["image_id"])
        if row is None:
            continue
        column = a["category_id"] - 1
        current = best[row, column]
        if np.isnan(current) or a["visible_fraction"] > current:
            best[row, column] = a["visible_fraction"]
    return best


def hidden_label_masks(max_visible, hidden_below=HIDDEN_BELOW):
    """(positives, ignore) of the hidden-label AP.

    Args:
        max_visible: (N, C) from `max_visible_fraction` (NaN = class absent).
        hidden_below: every item of the class is below this visible fraction.

    Returns:
        Two bool (N, C) arrays: positives = present and mostly hidden;
        ignore = present but some item at least `hidden_below` visible.
        Negatives are the images without the class.
    """
    present = ~np.isnan(max_visible)
    filled = np.where(present, max_visible, 1.0)
    positives = present & (filled < hidden_below)
    return positives, present & ~positives


def hidden_label_ap(logits, positives, ignore, min_positives):
    """Hidden-label AP per class and its mean over the eligible classes.

    Args:
        logits: (N, C) logits, ranked as they are (no sigmoid: float32
            probabilities saturate and would tie).
        positives, ignore: from `hidden_label_masks`.
        min_positives: a class counts only with at least this many positives.

    Returns:
        dict: `per_class` (C,) AP (NaN for classes with too few positives),
        `num_positives` (C,) ints, `mean` over the eligible classes (NaN if
        none), `classes` the eligible class ids.
    """
    counts = positives.sum(axis=0)
    enough = counts >= max(min_positives, 1)
    ap = metrics.average_precision(logits, positives, ignore=ignore, from_logits=True)
    eligible = np.flatnonzero(enough)
    ap = np.where(enough, ap, np.nan)
    return {"per_class": ap, "num_positives": counts.astype(int),
            "mean": float(np.mean(ap[eligible])) if eligible.size else math.nan,
            "classes": eligible.tolist()}


# --------------------------------------------------------------------------
# The label projector against label co-occurrence.
# --------------------------------------------------------------------------

def pmi_matrix(labels):
    """Pointwise mutual information log p(i, j) / (p(i) p(j)) of label pairs.

    Args:
        labels: (N, C) multi-hot training labels.

    Returns:
        float64 (C, C); -inf for pairs that never co-occur (or classes that
        never occur). `pipelines.label_stats.pmi` on these labels' counts.
    """
    y = np.asarray(labels, np.int64)
    return label_stats.pmi(label_stats.LabelCounts(pairs=y.T @ y, num_records=len(y)))


# The same statistics TensorBoard shows during training (mlcrl_tf.label_space).
pairwise_distances = label_space.pairwise_distances
average_ranks = label_space.average_ranks
spearman = label_space.spearman


def embedding_pmi_correlation(embeddings, labels):
    """Spearman(-distance of label embeddings, PMI) over pairs i < j.

    Args:
        embeddings: (C, D) label embeddings E = f_l(I_C).
        labels: (N, C) multi-hot training labels.

    Returns:
        (rho, number of pairs).
    """
    return label_space.cooccurrence_correlation(embeddings, pmi_matrix(labels))


def active_relu_units(dense_weights):
    """Per hidden layer of f_l on the C one-hot inputs: (units active for at
    least one class, units).

    Args:
        dense_weights: [(kernel (n_in, n_out), bias (n_out,))] of f_l's Dense
            layers in order; ReLU follows every layer but the last.

    Returns:
        list of (active, width), one per hidden (ReLU) layer. A layer with 0
        active units sends the same vector for every class: the projector's
        output is then one constant embedding (it collapsed).
    """
    x = np.eye(np.asarray(dense_weights[0][0]).shape[0])
    out = []
    for kernel, bias in dense_weights[:-1]:
        x = np.maximum(x @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64), 0)
        out.append((int((x > 0).any(axis=0).sum()), int(x.shape[1])))
    return out


# --------------------------------------------------------------------------
# Verdicts and convergence.
# --------------------------------------------------------------------------

def t_critical_95(df):
    """Two-sided 95 % Student t critical value (Cornish-Fisher beyond df 30)."""
    if df < 1:
        raise ValueError(f"df={df}: need at least 1 degree of freedom.")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z ** 3 + z) / (4 * df)
            + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2))


def paired_t_interval(a_by_seed, b_by_seed):
    """Mean of a - b over the seeds both have, with its 95 % t interval.

    Args:
        a_by_seed, b_by_seed: dict seed -> value.

    Returns:
        dict with `seeds`, `diffs`, `mean`, `low`, `high`, `half_width`
        (interval NaN with fewer than 2 paired seeds).
    """
    seeds = sorted(set(a_by_seed) & set(b_by_seed))
    diffs = np.array([a_by_seed[s] - b_by_seed[s] for s in seeds], np.float64)
    mean = float(diffs.mean()) if len(diffs) else math.nan
    half = math.nan
    if len(diffs) >= 2:
        half = t_critical_95(len(diffs) - 1) * float(diffs.std(ddof=1)) / math.sqrt(
            len(diffs))
    return {"seeds": seeds, "diffs": diffs.tolist(), "mean": mean,
            "low": mean - half, "high": mean + half, "half_width": half}


def verdict_sentence(interval, other, unit):
    """The pre-registered reading of one crl-vs-other interval (in points).

    "crl helps" only if the whole interval is above 0, "crl hurts" only if it
    is below 0; otherwise no demonstrated difference, with what it excludes.
    """
    mean, low, high = interval["mean"], interval["low"], interval["high"]
    # Two decimals: an end near 0 must not print as "+0.0" next to "excludes 0".
    per_seed = ", ".join(f"{d:+.2f}" for d in interval["diffs"])
    head = (f"crl − {other}: mean {mean:+.2f} {unit}, 95 % t interval "
            f"[{low:+.2f}, {high:+.2f}] (per seed {per_seed})")
    if math.isnan(low):
        return head + ": fewer than 2 paired seeds, no verdict."
    if low > 0:
        return head + ": **crl helps** (excludes 0)."
    if high < 0:
        return head + ": **crl hurts** (excludes 0)."
    return (head + f": no demonstrated difference; a gain larger than {high:+.2f} "
            f"{unit} and a loss larger than {-low:.2f} {unit} are excluded.")


def convergence(maps, decay_epoch, rise_below=CONVERGED_RISE):
    """The convergence rule on the per-epoch eval mAP (fractions).

    Converged = the last two evaluations both come after the learning-rate
    decay (epochs > decay_epoch) and the last one is less than `rise_below`
    points above the one before.

    Args:
        maps: eval mAP after epochs 1, 2, ... (fractions in [0, 1]).
        decay_epoch: the last epoch before the (last) decay; 0 if none.
        rise_below: threshold in mAP points.

    Returns:
        (converged bool, last rise in points or NaN with fewer than 2 evals).
    """
    if len(maps) < 2:
        return False, math.nan
    rise = 100.0 * (maps[-1] - maps[-2])
    after_decay = len(maps) - 1 > decay_epoch
    return bool(after_decay and rise < rise_below), rise


def mean_std(values):
    """(mean, sample std) of a sequence; std 0 for one value."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), 0.0
    return float(values.mean()), float(values.std(ddof=1))


def heatmap(matrix, cell=24):
    """A (C, C) matrix as an RGB uint8 picture (blue low, white mid, red high).

    Values are scaled to their finite min..max; -inf/NaN cells are gray.
    """
    m = np.asarray(matrix, np.float64)
    finite = np.isfinite(m)
    low, high = (m[finite].min(), m[finite].max()) if finite.any() else (0.0, 1.0)
    t = np.clip((np.where(finite, m, low) - low) / max(high - low, 1e-12), 0, 1)
    blue, white, red = (np.array(c, np.float64) for c in
                        ((33, 102, 172), (247, 247, 247), (178, 24, 43)))
    lower = blue + (white - blue) * (2 * t)[..., None]
    upper = white + (red - white) * (2 * t - 1)[..., None]
    rgb = np.where((t < 0.5)[..., None], lower, upper)
    rgb[~finite] = 160
    return np.repeat(np.repeat(np.round(rgb).astype(np.uint8), cell, 0), cell, 1)

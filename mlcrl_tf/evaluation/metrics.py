"""Multi-label metrics (paper §5.2, Eq. 11-13) in plain NumPy.

AP, mAP, CP/CR/CF1, OP/OR/OF1 and their top-3 versions with ML-GCN's
conventions, ranked on logits (docs/design.md, Metrics).
"""

import math

import numpy as np

# Largest number of array elements processed at once (bounds the temporaries
# of the per-class sorts and of the top-k selection on large datasets).
_CHUNK_ELEMENTS = 1 << 22


def _as_array(value, name):
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} cannot be converted to an array: {e}") from e


def _as_binary(value, name, what):
    """Converts a {0, 1}-valued array (bool, int or float) to bool."""
    if value.dtype == np.bool_:
        return value
    if value.dtype.kind not in "iuf":
        raise ValueError(
            f"{name} must be {what} (bool or 0/1 numbers), got dtype {value.dtype}.")
    if not np.all((value == 0) | (value == 1)):
        bad = value[~((value == 0) | (value == 1))]
        raise ValueError(
            f"{name} must be {what} with values in {{0, 1}}; found e.g. {bad.flat[0]!r}.")
    return value != 0


def _check_inputs(scores, labels, ignore, num_classes=None, allow_empty=False,
                  from_logits=False):
    """Validates and converts (scores, labels, ignore).

    Returns:
        (scores float array, labels bool array, ignore bool array or None).

    Raises:
        ValueError: naming the offending argument.
    """
    scores = _as_array(scores, "scores")
    labels = _as_array(labels, "labels")
    if scores.ndim != 2:
        raise ValueError(
            f"scores must be 2-D (N images, C classes), got shape {scores.shape}.")
    if labels.ndim != 2:
        raise ValueError(
            f"labels must be 2-D (N images, C classes), got shape {labels.shape}.")
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels shape {labels.shape} differs from scores shape {scores.shape}.")
    if ignore is not None:
        ignore = _as_array(ignore, "ignore")
        if ignore.shape != scores.shape:
            raise ValueError(
                f"ignore shape {ignore.shape} differs from scores shape {scores.shape}.")
    if num_classes is not None and scores.shape[1] != num_classes:
        raise ValueError(
            f"scores has {scores.shape[1]} classes but the accumulator was built "
            f"with num_classes={num_classes}.")
    if scores.shape[1] == 0:
        raise ValueError("scores has no classes (C = 0).")
    if scores.shape[0] == 0 and not allow_empty:
        raise ValueError("scores has no rows (N = 0 images).")

    if scores.dtype.kind in "biu":
        scores = scores.astype(np.float64)
    elif scores.dtype.kind != "f":
        raise ValueError(f"scores must be a float array, got dtype {scores.dtype}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contains non-finite values (NaN or inf).")
    if not from_logits and scores.size and (scores.min() < 0 or scores.max() > 1):
        raise ValueError(
            f"scores must be probabilities in [0, 1], got values in "
            f"[{scores.min():g}, {scores.max():g}]; pass logits with "
            f"from_logits=True (ranking saturated float32 probabilities loses "
            f"information).")
    labels = _as_binary(labels, "labels", "multi-hot")
    if ignore is not None:
        ignore = _as_binary(ignore, "ignore", "a boolean mask")
    return scores, labels, ignore


def _check_threshold(threshold):
    if isinstance(threshold, (bool, np.bool_)):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}.")
    try:
        value = float(threshold)
    except (TypeError, ValueError) as e:
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}.") from e
    if not (0.0 < value <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
    return value


def _check_top_k(top_k):
    if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer)):
        raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}.")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}.")
    return int(top_k)


def _ap_columns(scores, labels, valid):
    """Per-class AP of a block of columns; see the module docstring."""
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0)
    s = np.take_along_axis(scores, order, axis=0)
    pos = np.take_along_axis(labels, order, axis=0)
    if valid is not None:
        v = np.take_along_axis(valid, order, axis=0)
        pos &= v
        cum_n = np.cumsum(v, axis=0, dtype=np.float64)
    cum_tp = np.cumsum(pos, axis=0, dtype=np.float64)

    # Index of the last element of each element's tie group.
    rows = np.arange(n)[:, None]
    is_end = np.ones(s.shape, dtype=bool)
    is_end[:-1] = s[:-1] != s[1:]
    end = np.where(is_end, rows, n)
    end = np.minimum.accumulate(end[::-1], axis=0)[::-1]

    tp_at = np.take_along_axis(cum_tp, end, axis=0)
    if valid is not None:
        n_at = np.take_along_axis(cum_n, end, axis=0)
    else:
        n_at = (end + 1).astype(np.float64)
    # n_at >= 1 wherever pos is True (the positive itself is counted).
    precision = np.divide(tp_at, n_at, out=np.zeros_like(tp_at), where=pos)
    num_pos = cum_tp[-1]
    total = precision.sum(axis=0)
    ap = np.full(scores.shape[1], np.nan)
    has_pos = num_pos > 0
    ap[has_pos] = total[has_pos] / num_pos[has_pos]
    return ap


def _average_precision(scores, labels, ignore):
    n, c = scores.shape
    width = max(1, _CHUNK_ELEMENTS // max(n, 1))
    ap = np.empty(c, dtype=np.float64)
    for start in range(0, c, width):
        cols = slice(start, start + width)
        valid = None if ignore is None else ~ignore[:, cols]
        ap[cols] = _ap_columns(scores[:, cols], labels[:, cols], valid)
    return ap


def _score_threshold(threshold, from_logits):
    """The probability threshold in score space: log(t / (1 - t)) for logits."""
    if not from_logits:
        return threshold
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold) - math.log1p(-threshold)


def _counts(scores, labels, ignore, threshold, top_k):
    """TP, #predicted and #positive per class, for all labels and top-k.

    `threshold` is in score space (see `_score_threshold`).
    """
    n, c = scores.shape
    k = min(top_k, c)
    tp = np.zeros(c, np.int64)
    npred = np.zeros(c, np.int64)
    tp_k = np.zeros(c, np.int64)
    npred_k = np.zeros(c, np.int64)
    npos = np.zeros(c, np.int64)
    height = max(1, _CHUNK_ELEMENTS // c)
    for start in range(0, n, height):
        rows = slice(start, start + height)
        s = scores[rows]
        pos = labels[rows]
        pred = s >= threshold
        # Stable sort on the negated scores: ties go to the lower class id.
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        in_top = np.zeros(s.shape, dtype=bool)
        np.put_along_axis(in_top, top, True, axis=1)
        pred_k = pred & in_top
        if ignore is not None:
            valid = ~ignore[rows]
            pos = pos & valid
            pred &= valid
            pred_k &= valid
        npos += np.count_nonzero(pos, axis=0)
        npred += np.count_nonzero(pred, axis=0)
        tp += np.count_nonzero(pred & pos, axis=0)
        npred_k += np.count_nonzero(pred_k, axis=0)
        tp_k += np.count_nonzero(pred_k & pos, axis=0)
    return (tp, npred, npos), (tp_k, npred_k, npos)


def _f1(p, r):
    if math.isnan(p) or math.isnan(r):
        return math.nan
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def _scores_from_counts(tp, npred, npos):
    per_class_p = np.divide(tp, npred, out=np.zeros(tp.shape), where=npred > 0)
    cp = float(per_class_p.mean())
    has_pos = npos > 0
    cr = float(np.mean(tp[has_pos] / npos[has_pos])) if has_pos.any() else math.nan
    total_pred, total_pos, total_tp = npred.sum(), npos.sum(), tp.sum()
    op = float(total_tp / total_pred) if total_pred > 0 else 0.0
    or_ = float(total_tp / total_pos) if total_pos > 0 else math.nan
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr),
            "OP": op, "OR": or_, "OF1": _f1(op, or_)}


def _metrics(scores, labels, ignore, threshold, top_k, from_logits):
    ap = _average_precision(scores, labels, ignore)
    valid_ap = ap[~np.isnan(ap)]
    result = {"mAP": float(valid_ap.mean()) if valid_ap.size else math.nan}
    all_counts, top_counts = _counts(scores, labels, ignore,
                                     _score_threshold(threshold, from_logits), top_k)
    result.update(_scores_from_counts(*all_counts))
    for key, value in _scores_from_counts(*top_counts).items():
        result[f"{key}_top{top_k}"] = value
    result["AP"] = [float(x) for x in ap]
    return result


def average_precision(scores, labels, ignore=None, from_logits=False):
    """Per-class non-interpolated average precision.

    Images are ranked by descending score; AP is the mean over the class's
    positives of the precision at the positive's rank. Tied scores form one
    threshold (as in `sklearn.metrics.average_precision_score`): a positive in
    a tie group gets the precision computed over the whole group, so the
    result does not depend on the input order.

    Args:
        scores: (N, C) probabilities in [0, 1], or logits with from_logits.
        labels: (N, C) multi-hot labels in {0, 1} (bool, int or float).
        ignore: optional (N, C) boolean mask; ignored entries are removed from
            their class's ranking (neither positive nor negative).
        from_logits: scores are logits (any finite value); the ranking is
            theirs (see the module docstring).

    Returns:
        float64 array (C,); NaN for a class without any non-ignored positive.

    Raises:
        ValueError: on malformed input (the message names the argument).
    """
    scores, labels, ignore = _check_inputs(scores, labels, ignore,
                                           from_logits=from_logits)
    return _average_precision(scores, labels, ignore)


def multilabel_metrics(scores, labels, threshold=0.5, top_k=3, ignore=None,
                       from_logits=False):
    """mAP and the per-class / overall precision, recall and F1 (Eq. 11-13).

    Args:
        scores: (N, C) probabilities in [0, 1] (sigmoid of the logits), or
            the logits themselves with from_logits=True (what evaluation
            does: see the module docstring).
        labels: (N, C) multi-hot labels in {0, 1} (bool, int or float).
        threshold: a label is predicted iff its probability >= threshold;
            in (0, 1]. With logits: iff logit >= log(t / (1 - t)).
        top_k: for the ``_top{k}`` metrics a label must also be among the
            image's k highest scores (ties: lower class id wins).
        ignore: optional (N, C) boolean mask of entries that count neither way
            (VOC difficult). The top-k ranking still uses all classes.
        from_logits: scores are logits.

    Returns:
        dict with the Python floats ``mAP, CP, CR, CF1, OP, OR, OF1`` and
        ``CP_top{k}, CR_top{k}, CF1_top{k}, OP_top{k}, OR_top{k}, OF1_top{k}``
        (fractions in [0, 1]; NaN where undefined, see the module docstring),
        plus ``AP``: the per-class AP as a list of C Python floats.

    Raises:
        ValueError: on malformed input (the message names the argument).
    """
    threshold = _check_threshold(threshold)
    top_k = _check_top_k(top_k)
    scores, labels, ignore = _check_inputs(scores, labels, ignore,
                                           from_logits=from_logits)
    return _metrics(scores, labels, ignore, threshold, top_k, from_logits)


class MetricAccumulator:
    """Streams batches and computes `multilabel_metrics` on all of them.

    The data is held once, in preallocated NumPy buffers that grow
    geometrically (capacity doubles when full): scores as float32, labels as
    bool and, once some batch passes an `ignore` mask, the mask as bool.
    `result` computes on views of the filled part of the buffers.

    Args:
        num_classes: C, the number of columns of every batch.
        initial_capacity: rows allocated by the first `update`.
        from_logits: the scores are logits (what every evaluation in mlcrl_tf
            accumulates: float32 probabilities saturate at 1.0).

    Raises:
        ValueError: if num_classes or initial_capacity is not a positive int.

    Example:
    >>> accumulator = MetricAccumulator(num_classes=2, from_logits=True)
    >>> accumulator.update([[2.0, -1.0], [-3.0, 4.0]], [[1, 0], [0, 1]])
    >>> accumulator.update([[0.5, 0.1]], [[1, 1]])
    >>> round(float(accumulator.result()["mAP"]), 3), accumulator.num_examples
    (1.0, 3)
    """

    def __init__(self, num_classes, initial_capacity=1024, from_logits=False):
        for name, value in (("num_classes", num_classes),
                            ("initial_capacity", initial_capacity)):
            if (isinstance(value, (bool, np.bool_))
                    or not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self._num_classes = int(num_classes)
        self._initial_capacity = int(initial_capacity)
        self._from_logits = bool(from_logits)
        self._scores = np.empty((0, self._num_classes), dtype=np.float32)
        self._labels = np.empty((0, self._num_classes), dtype=bool)
        self._ignore = None
        self._size = 0

    @property
    def num_classes(self):
        """C, the number of classes."""
        return self._num_classes

    @property
    def num_examples(self):
        """Number of images accumulated since construction or `reset`."""
        return self._size

    @property
    def capacity(self):
        """Rows currently allocated in the buffers."""
        return self._scores.shape[0]

    def reset(self):
        """Forgets the accumulated examples (keeps the allocated buffers)."""
        self._size = 0

    def _grow(self, needed):
        capacity = self.capacity
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, self._initial_capacity)

        def grown(buffer):
            new = np.empty((new_capacity, self._num_classes), dtype=buffer.dtype)
            new[:self._size] = buffer[:self._size]
            return new

        self._scores = grown(self._scores)
        self._labels = grown(self._labels)
        if self._ignore is not None:
            self._ignore = grown(self._ignore)

    def update(self, scores, labels, ignore=None):
        """Appends a batch.

        Args:
            scores: (B, C) probabilities in [0, 1] (logits if the
                accumulator was built with from_logits=True).
            labels: (B, C) multi-hot labels in {0, 1}.
            ignore: optional (B, C) boolean mask (see `multilabel_metrics`).

        Raises:
            ValueError: on malformed input or C != num_classes.
        """
        scores, labels, ignore = _check_inputs(
            scores, labels, ignore, num_classes=self._num_classes, allow_empty=True,
            from_logits=self._from_logits)
        batch = scores.shape[0]
        if batch == 0:
            return
        self._grow(self._size + batch)
        if ignore is not None and self._ignore is None:
            self._ignore = np.zeros((self.capacity, self._num_classes), dtype=bool)
        rows = slice(self._size, self._size + batch)
        self._scores[rows] = scores
        self._labels[rows] = labels
        if self._ignore is not None:
            self._ignore[rows] = False if ignore is None else ignore
        self._size += batch

    def result(self, threshold=0.5, top_k=3):
        """The `multilabel_metrics` dict over every accumulated example.

        Raises:
            ValueError: on a bad threshold / top_k, or if nothing was accumulated.
        """
        threshold = _check_threshold(threshold)
        top_k = _check_top_k(top_k)
        if self._size == 0:
            raise ValueError("MetricAccumulator has no examples; call update() first.")
        n = self._size
        ignore = None if self._ignore is None else self._ignore[:n]
        return _metrics(self._scores[:n], self._labels[:n], ignore, threshold, top_k,
                        self._from_logits)

"""The paper's losses (§4, Eq. 6-9): soft margin, constrained ranking, MSE.

Each term's reduction, the vectorised O(C^3 + B*C^2) label term and the guarded
distances are decided in docs/design.md, Losses.
"""

import keras
import tensorflow as tf

DEFAULT_MARGIN = 0.5
DEFAULT_IMAGE_WEIGHT = 0.5
DEFAULT_LABEL_WEIGHT = 0.5
TRIPLET_REDUCTIONS = ("mean", "sum")


def _labels_to_float(labels, dtype, name="labels"):
    """Converts multi-hot labels (float, int or bool) to `dtype`."""
    if not isinstance(labels, str):
        labels = tf.convert_to_tensor(labels)
    if isinstance(labels, str) or labels.dtype == tf.string:
        raise ValueError(
            f"{name} must be a numeric or bool multi-hot tensor, got a string.")
    if labels.dtype == tf.bool:
        labels = tf.cast(labels, tf.int32)
    return tf.cast(labels, dtype)


def _compute_dtype(*tensors):
    """float64 when every input is float64, else float32."""
    if all(t.dtype == tf.float64 for t in tensors):
        return tf.float64
    return tf.float32


def _to_float_tensor(x, name):
    """Converts `x` to a float tensor (no cast yet); rejects strings."""
    if isinstance(x, str):
        raise ValueError(f"{name} must be a float tensor, got a string.")
    x = tf.convert_to_tensor(x)
    if x.dtype == tf.string or x.dtype == tf.bool:
        raise ValueError(f"{name} must be a float tensor, got dtype {x.dtype.name}.")
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    return x


def _check_rank2(x, name, meaning):
    """Raises ValueError unless the static rank of `x` is 2 (or unknown)."""
    rank = x.shape.rank
    if rank is not None and rank != 2:
        raise ValueError(
            f"{name} must have rank 2 {meaning}, got shape {x.shape}.")


def _check_dim(a, a_name, a_axis, b, b_name, b_axis, meaning):
    """Raises ValueError if two statically known dimensions differ."""
    da, db = a.shape[a_axis], b.shape[b_axis]
    if da is not None and db is not None and da != db:
        raise ValueError(
            f"{b_name} has {db} {meaning} (axis {b_axis}) but {a_name} has {da} "
            f"(axis {a_axis}); {a_name} shape {a.shape}, {b_name} shape {b.shape}.")


def _check_values_eagerly(labels, floats):
    """Value checks, eager mode only: labels in {0, 1}, floats finite.

    Args:
        labels: (name, tensor) of the float labels.
        floats: list of (name, tensor) that must be finite.
    """
    if not tf.executing_eagerly():
        return
    name, y = labels
    if not bool(tf.reduce_all((y == 0) | (y == 1))):
        raise ValueError(f"{name} must contain only 0 and 1 (multi-hot).")
    for name, x in floats:
        if not bool(tf.reduce_all(tf.math.is_finite(x))):
            raise ValueError(f"{name} contains NaN or Inf.")


def _check_reduction(reduction, name="reduction"):
    if reduction not in TRIPLET_REDUCTIONS:
        raise ValueError(
            f"{name}={reduction!r} is unknown; choose one of "
            f"{', '.join(TRIPLET_REDUCTIONS)}.")


def _prepare_classification(labels, logits):
    """Validates and converts (labels, logits) for the soft-margin loss."""
    logits = _to_float_tensor(logits, "logits")
    dtype = _compute_dtype(logits)
    logits = tf.cast(logits, dtype)
    labels = _labels_to_float(labels, dtype)
    _check_rank2(labels, "labels", "(batch, classes)")
    _check_rank2(logits, "logits", "(batch, classes)")
    _check_dim(labels, "labels", 0, logits, "logits", 0, "images")
    _check_dim(labels, "labels", 1, logits, "logits", 1, "classes")
    _check_values_eagerly(("labels", labels), [("logits", logits)])
    return labels, logits


def _prepare_crl(labels, image_embeddings, label_embeddings):
    """Validates and converts the three CRL inputs to one float dtype."""
    fe = _to_float_tensor(image_embeddings, "image_embeddings")
    emb = _to_float_tensor(label_embeddings, "label_embeddings")
    dtype = _compute_dtype(fe, emb)
    fe, emb = tf.cast(fe, dtype), tf.cast(emb, dtype)
    labels = _labels_to_float(labels, dtype)
    _check_rank2(labels, "labels", "(batch, classes)")
    _check_rank2(fe, "image_embeddings", "(batch, embedding_dim)")
    _check_rank2(emb, "label_embeddings", "(classes, embedding_dim)")
    _check_dim(labels, "labels", 0, fe, "image_embeddings", 0, "images")
    _check_dim(labels, "labels", 1, emb, "label_embeddings", 0, "classes")
    _check_dim(emb, "label_embeddings", 1, fe, "image_embeddings", 1,
               "embedding dims")
    _check_values_eagerly(
        ("labels", labels),
        [("image_embeddings", fe), ("label_embeddings", emb)])
    return labels, fe, emb


def multilabel_soft_margin_per_example(labels, logits):
    """Per-image multi-label soft margin loss (PyTorch's definition).

    Args:
        labels: (B, C) multi-hot in {0, 1}; float, int or bool.
        logits: (B, C) float logits.

    Returns:
        (B,) tensor: mean over classes of sigmoid binary cross-entropy.

    Raises:
        ValueError: bad ranks, mismatched shapes, string labels, labels not
            in {0, 1} or non-finite logits (the last two only eagerly).
    """
    labels, logits = _prepare_classification(labels, logits)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.reduce_mean(bce, axis=-1)


def multilabel_soft_margin_loss(labels, logits):
    """Multi-label soft margin loss averaged over the batch (scalar).

    Args:
        labels: (B, C) multi-hot in {0, 1}; float, int or bool.
        logits: (B, C) float logits.

    Returns:
        Scalar: `mean(multilabel_soft_margin_per_example(labels, logits))`.

    Raises:
        ValueError: see `multilabel_soft_margin_per_example`.
    """
    return tf.reduce_mean(multilabel_soft_margin_per_example(labels, logits))


def _safe_norm(diff):
    """Euclidean norm over the last axis; 0 with zero gradient at 0.

    The where-trick keeps `sqrt` away from 0 in both branches, so the
    gradient is finite (and exactly 0) where two embeddings coincide.
    """
    sq = tf.reduce_sum(tf.square(diff), axis=-1)
    positive = sq > 0
    safe_sq = tf.where(positive, sq, tf.ones_like(sq))
    return tf.where(positive, tf.sqrt(safe_sq), tf.zeros_like(sq))


def pairwise_distances(a, b):
    """Euclidean distances between the rows of `a` (N, E) and `b` (M, E).

    Uses explicit differences (exact to rounding; no ‖a‖²+‖b‖²−2ab
    cancellation) and a safe square root (finite gradients at d = 0).
    Memory is O(N·M·E).

    Args:
        a: (N, E) float tensor.
        b: (M, E) float tensor of the same dtype.

    Returns:
        (N, M) tensor of distances.
    """
    return _safe_norm(a[:, None, :] - b[None, :, :])


def crl_terms(labels, image_embeddings, label_embeddings, margin=DEFAULT_MARGIN):
    """Sums and valid-triplet counts of the two CRL terms over the batch.

    A distributed loop all-reduces the four values across replicas and
    divides sums by counts, so the mean is over the global batch's triplets.

    Args:
        labels: (B, C) multi-hot in {0, 1}; float, int or bool.
        image_embeddings: (B, E) float, `Fe`.
        label_embeddings: (C, E) float, `E` (label projector on one-hots).
        margin: the margin δ.

    Returns:
        Dict of scalars (float32, or float64 when both embeddings are
        float64): `image_sum`, `image_count` (Σ_b |P_b|·|N_b|), `label_sum`,
        `label_count` (Σ_b |P_b|·(|P_b|−1)·|N_b|).

    Raises:
        ValueError: bad ranks, mismatched B / C / E, string labels, labels
            not in {0, 1} or non-finite embeddings (the last two eagerly only).
    """
    labels, fe, emb = _prepare_crl(labels, image_embeddings, label_embeddings)
    dtype = fe.dtype
    margin = tf.cast(margin, dtype)
    pos = labels                     # (B, C)
    neg = 1.0 - labels               # (B, C)
    num_pos = tf.reduce_sum(pos, axis=1)
    num_neg = tf.reduce_sum(neg, axis=1)

    # Image term: H[b, j, k] = [δ + d(Fe_b, E_j) − d(Fe_b, E_k)]+,
    # kept where j is positive and k negative for image b. (B, C, C).
    d_img = pairwise_distances(fe, emb)                                  # (B, C)
    hinge_img = tf.nn.relu(margin + d_img[:, :, None] - d_img[:, None, :])
    image_sum = tf.reduce_sum(hinge_img * pos[:, :, None] * neg[:, None, :])
    image_count = tf.reduce_sum(num_pos * num_neg)

    # Label term: T[p, q, k] = [δ + d(E_p, E_q) − d(E_p, E_k)]+ does not
    # depend on the image; q == p is not a triplet. (C, C, C).
    d_lab = pairwise_distances(emb, emb)                                 # (C, C)
    num_classes = tf.shape(emb)[0]
    not_same = 1.0 - tf.eye(num_classes, dtype=dtype)
    hinge_lab = tf.nn.relu(margin + d_lab[:, :, None] - d_lab[:, None, :])
    hinge_lab = hinge_lab * not_same[:, :, None]
    # Σ_k Neg[b, k]·T[p, q, k] for every image: (C², C) @ (C, B) -> (C², B).
    per_pair = tf.matmul(
        tf.reshape(hinge_lab, [num_classes * num_classes, num_classes]),
        neg, transpose_b=True)
    # Keep (p, q) both positive for image b: Pos⊗Pos as (C², B).
    pos_pairs = tf.reshape(
        pos[:, :, None] * pos[:, None, :], [-1, num_classes * num_classes])
    label_sum = tf.reduce_sum(per_pair * tf.transpose(pos_pairs))
    label_count = tf.reduce_sum(num_pos * (num_pos - 1.0) * num_neg)
    return {
        "image_sum": image_sum,
        "image_count": image_count,
        "label_sum": label_sum,
        "label_count": label_count,
    }


def combine_crl_terms(terms, image_weight=DEFAULT_IMAGE_WEIGHT,
                      label_weight=DEFAULT_LABEL_WEIGHT, reduction="mean"):
    """Turns `crl_terms` output (possibly all-reduced) into the CRL scalar.

    Args:
        terms: dict from `crl_terms` (or the element-wise sum of several).
        image_weight: λ1.
        label_weight: λ2.
        reduction: "mean" (sum / count, 0 for an empty term) or "sum".

    Returns:
        Scalar λ1·image_term + λ2·label_term.

    Raises:
        ValueError: unknown `reduction`.
    """
    _check_reduction(reduction)
    if reduction == "mean":
        image_term = tf.math.divide_no_nan(terms["image_sum"], terms["image_count"])
        label_term = tf.math.divide_no_nan(terms["label_sum"], terms["label_count"])
    else:
        image_term, label_term = terms["image_sum"], terms["label_sum"]
    dtype = image_term.dtype
    return (tf.cast(image_weight, dtype) * image_term
            + tf.cast(label_weight, dtype) * label_term)


def constrained_ranking_loss(labels, image_embeddings, label_embeddings,
                             margin=DEFAULT_MARGIN,
                             image_weight=DEFAULT_IMAGE_WEIGHT,
                             label_weight=DEFAULT_LABEL_WEIGHT,
                             reduction="mean"):
    """Constrained ranking loss (paper Eq. 9), a scalar.

    Args:
        labels: (B, C) multi-hot in {0, 1}; float, int or bool.
        image_embeddings: (B, E) float, `Fe`.
        label_embeddings: (C, E) float, `E`.
        margin: the margin δ.
        image_weight: λ1, weight of the image term.
        label_weight: λ2, weight of the label term.
        reduction: "mean" (each term averaged over its valid triplets in the
            batch; 0 when there are none) or "sum" (the paper's plain sums).

    Returns:
        Scalar λ1·image_term + λ2·label_term.

    Raises:
        ValueError: unknown `reduction` or any input error of `crl_terms`.

    Example:

    >>> labels = [[1, 0, 1], [0, 1, 0]]
    >>> fe = [[0.1, 0.2], [0.3, -0.1]]
    >>> e = [[0.0, 0.1], [0.5, 0.5], [-0.2, 0.3]]
    >>> float(constrained_ranking_loss(labels, fe, e)) > 0
    True
    """
    _check_reduction(reduction)
    terms = crl_terms(labels, image_embeddings, label_embeddings, margin=margin)
    return combine_crl_terms(terms, image_weight, label_weight, reduction)


def _prepare_mse(image_embeddings, projected_labels):
    fe = _to_float_tensor(image_embeddings, "image_embeddings")
    fl = _to_float_tensor(projected_labels, "projected_labels")
    dtype = _compute_dtype(fe, fl)
    fe, fl = tf.cast(fe, dtype), tf.cast(fl, dtype)
    _check_rank2(fe, "image_embeddings", "(batch, embedding_dim)")
    _check_rank2(fl, "projected_labels", "(batch, embedding_dim)")
    _check_dim(fe, "image_embeddings", 0, fl, "projected_labels", 0, "images")
    _check_dim(fe, "image_embeddings", 1, fl, "projected_labels", 1,
               "embedding dims")
    if tf.executing_eagerly():
        for name, x in (("image_embeddings", fe), ("projected_labels", fl)):
            if not bool(tf.reduce_all(tf.math.is_finite(x))):
                raise ValueError(f"{name} contains NaN or Inf.")
    return fe, fl


def embedding_mse_per_example(image_embeddings, projected_labels):
    """Per-image MSE between `Fe` and `f_l(y)` (the `Ours(MSE)` ablation).

    Args:
        image_embeddings: (B, E) float, `Fe`.
        projected_labels: (B, E) float, the label projector applied to each
            image's multi-hot vector y.

    Returns:
        (B,) mean over the E dims of the squared difference.

    Raises:
        ValueError: bad ranks, mismatched shapes or (eagerly) non-finite values.
    """
    fe, fl = _prepare_mse(image_embeddings, projected_labels)
    return tf.reduce_mean(tf.square(fe - fl), axis=-1)


def embedding_mse_loss(image_embeddings, projected_labels):
    """MSE between `Fe` and `f_l(y)`, mean over batch and dims (scalar).

    Args:
        image_embeddings: (B, E) float, `Fe`.
        projected_labels: (B, E) float, `f_l(y)`.

    Returns:
        Scalar mean squared error.

    Raises:
        ValueError: see `embedding_mse_per_example`.
    """
    return tf.reduce_mean(embedding_mse_per_example(image_embeddings,
                                                    projected_labels))


def _reject_string_labels(y_true, name):
    """keras.losses.Loss casts y_true to float first: check dtype before."""
    if isinstance(y_true, str):
        raise ValueError(f"{name} must be numeric or bool, got a string.")
    dtype = getattr(y_true, "dtype", None)
    if dtype is None:
        dtype = tf.convert_to_tensor(y_true).dtype
    if tf.as_dtype(dtype) == tf.string:
        raise ValueError(f"{name} must be numeric or bool, got a string dtype.")


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class MultiLabelSoftMarginLoss(keras.losses.Loss):
    """Multi-label soft margin loss (PyTorch's `MultiLabelSoftMarginLoss`).

    `call` returns the per-image loss (B,); the Keras `reduction` (default
    "sum_over_batch_size") then averages it, so the default result equals
    `multilabel_soft_margin_loss`. `sample_weight` works as for any Keras
    loss.

    Args:
        reduction: Keras reduction of the per-image values.
        name: name of the loss.

    Example:

    >>> loss = MultiLabelSoftMarginLoss()
    >>> value = loss([[1.0, 0.0, 1.0]], [[2.0, -1.0, 0.5]])
    >>> round(float(value), 4)
    0.3048
    """

    def __init__(self, reduction="sum_over_batch_size",
                 name="multilabel_soft_margin"):
        super().__init__(name=name, reduction=reduction)

    def __call__(self, y_true, y_pred, sample_weight=None):
        _reject_string_labels(y_true, "y_true (labels)")
        return super().__call__(y_true, y_pred, sample_weight=sample_weight)

    def call(self, y_true, y_pred):
        return multilabel_soft_margin_per_example(y_true, y_pred)

    def get_config(self):
        return {"reduction": self.reduction, "name": self.name}


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class ConstrainedRankingLoss(keras.losses.Loss):
    """Constrained ranking loss (paper Eq. 9) as a Keras loss.

    `y_true` is the (B, C) multi-hot labels; `y_pred` is a dict with
    "image_embeddings" (B, E) and "label_embeddings" (C, E). `call` returns a
    scalar, which Keras' reduction leaves unchanged. The loss couples all
    images of the batch through its triplet mean, so `sample_weight` is not
    supported.

    Args:
        margin: the margin δ.
        image_weight: λ1.
        label_weight: λ2.
        triplet_reduction: "mean" (each term over its valid triplets) or
            "sum" (the paper's plain sums).
        name: name of the loss.

    Example:

    >>> loss = ConstrainedRankingLoss(margin=0.5)
    >>> value = loss(
    ...     y_true=[[1, 0, 1], [0, 1, 0]],
    ...     y_pred={"image_embeddings": [[0.1, 0.2], [0.3, -0.1]],
    ...             "label_embeddings": [[0.0, 0.1], [0.5, 0.5], [-0.2, 0.3]]})
    >>> value.shape
    TensorShape([])
    """

    def __init__(self, margin=DEFAULT_MARGIN, image_weight=DEFAULT_IMAGE_WEIGHT,
                 label_weight=DEFAULT_LABEL_WEIGHT, triplet_reduction="mean",
                 name="constrained_ranking"):
        _check_reduction(triplet_reduction, name="triplet_reduction")
        super().__init__(name=name, reduction="sum_over_batch_size")
        self.margin = margin
        self.image_weight = image_weight
        self.label_weight = label_weight
        self.triplet_reduction = triplet_reduction

    def __call__(self, y_true, y_pred, sample_weight=None):
        if sample_weight is not None:
            raise ValueError(
                "sample_weight is not supported by ConstrainedRankingLoss.")
        keys = ("image_embeddings", "label_embeddings")
        if not isinstance(y_pred, dict) or any(k not in y_pred for k in keys):
            raise ValueError(
                "y_pred must be a dict with keys 'image_embeddings' and "
                f"'label_embeddings', got {type(y_pred).__name__}.")
        _reject_string_labels(y_true, "y_true (labels)")
        return super().__call__(y_true, y_pred)

    def call(self, y_true, y_pred):
        return constrained_ranking_loss(
            y_true, y_pred["image_embeddings"], y_pred["label_embeddings"],
            margin=self.margin, image_weight=self.image_weight,
            label_weight=self.label_weight, reduction=self.triplet_reduction)

    def get_config(self):
        return {
            "margin": self.margin,
            "image_weight": self.image_weight,
            "label_weight": self.label_weight,
            "triplet_reduction": self.triplet_reduction,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class EmbeddingMSELoss(keras.losses.Loss):
    """The `Ours(MSE)` ablation: MSE between `f_l(y)` and `Fe`.

    `y_true` is `f_l(y)` (B, E), `y_pred` is `Fe` (B, E). `call` returns the
    per-image mean over dims (B,); the default Keras reduction averages it,
    so the result equals `embedding_mse_loss`.

    Args:
        reduction: Keras reduction of the per-image values.
        name: name of the loss.

    Example:

    >>> loss = EmbeddingMSELoss()
    >>> float(loss([[0.0, 1.0]], [[1.0, 1.0]]))
    0.5
    """

    def __init__(self, reduction="sum_over_batch_size", name="embedding_mse"):
        super().__init__(name=name, reduction=reduction)

    def call(self, y_true, y_pred):
        return embedding_mse_per_example(y_pred, y_true)

    def get_config(self):
        return {"reduction": self.reduction, "name": self.name}

"""The training objective (Eq. 10): one definition for `fit()` and the CLI loop.

Each replica computes its share of every term, scaled by the global batch, so
the replicas' gradients sum to one device's (docs/design.md, Training).
"""

import keras
import tensorflow as tf

from mlcrl_tf.modeling import losses

AUX_LOSSES = (None, "crl", "mse")


def _replica_sums(*values):
    """All-reduces (sums) scalars over the replicas of the current step.

    Outside a replica context (eager use, one device) the values are returned
    as they are.
    """
    stacked = tf.stop_gradient(tf.stack([tf.cast(v, tf.float32) for v in values]))
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        stacked = context.all_reduce(tf.distribute.ReduceOp.SUM, stacked)
    return tf.unstack(stacked)


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class Objective:
    """The paper's training objective: α·soft margin + β·(CRL or MSE) (Eq. 10).

    `terms(labels, outputs, aux, project_labels)` returns THIS REPLICA'S SHARE
    of every term: the classification and MSE losses are this replica's sum
    over its images divided by the GLOBAL batch (all-reduced), and each CRL
    term is this replica's hinge sum divided by the global batch's valid
    triplet count (all-reduced). Summing the shares (or their gradients) over
    the replicas gives exactly the value (gradient) of one device on the
    whole global batch; on one device a share is the value itself.
    `MLCRLModel.compute_loss` and `MLCRLModel.train_step` call it, so
    `model.fit()` and the CLI loop optimise one definition of the objective.

    Args:
        cls_weight: α, weight of the soft margin loss.
        aux_weight: β, weight of the CRL (or MSE) loss.
        margin: CRL margin δ.
        image_weight: CRL λ1.
        label_weight: CRL λ2.
        reduction: CRL triplet reduction, "mean" or "sum".

    Example:
    >>> objective = Objective()
    >>> terms = objective.terms([[1.0, 0.0]], {"logits": [[2.0, -1.0]]})
    >>> sorted(terms), round(float(terms["loss"]), 4)
    (['classification', 'loss'], 0.2201)
    """

    def __init__(self, cls_weight=1.0, aux_weight=1.0, margin=losses.DEFAULT_MARGIN,
                 image_weight=losses.DEFAULT_IMAGE_WEIGHT, label_weight=losses.DEFAULT_LABEL_WEIGHT,
                 reduction="mean"):
        losses._check_reduction(reduction)
        self.cls_weight = float(cls_weight)
        self.aux_weight = float(aux_weight)
        self.margin = float(margin)
        self.image_weight = float(image_weight)
        self.label_weight = float(label_weight)
        self.reduction = reduction

    def terms(self, labels, outputs, aux=None, project_labels=None):
        """This replica's share of each loss term.

        Args:
            labels: (B, C) multi-hot labels of this replica's images.
            outputs: the model's training outputs: `logits`, and for
                aux="crl"/"mse" `image_embeddings` and `label_embeddings`.
            aux: None (classification only), "crl" or "mse".
            project_labels: for "mse", the label projector f_l (callable on
                (B, C) multi-hot vectors).

        Returns:
            Dict of float32 scalars: `classification`, for crl `crl`,
            `crl_image_term`, `crl_label_term` (unweighted terms), for mse
            `mse`, and `loss` = α·classification + β·aux.

        Raises:
            ValueError: unknown `aux`, or mse without `project_labels`.
        """
        if aux not in AUX_LOSSES:
            raise ValueError(f"aux={aux!r} is unknown; choose one of {AUX_LOSSES}.")
        logits = tf.cast(outputs["logits"], tf.float32)
        labels = losses._labels_to_float(labels, tf.float32)
        batch = tf.cast(tf.shape(logits)[0], tf.float32)
        if aux == "crl":
            parts = losses.crl_terms(labels, outputs["image_embeddings"],
                              outputs["label_embeddings"], margin=self.margin)
            global_batch, image_count, label_count = _replica_sums(
                batch, parts["image_count"], parts["label_count"])
            parts = dict(parts, image_count=image_count, label_count=label_count)
        else:
            (global_batch,) = _replica_sums(batch)
        per_image = losses.multilabel_soft_margin_per_example(labels, logits)
        cls = tf.reduce_sum(per_image) / global_batch
        terms = {"classification": cls}
        aux_value = tf.zeros([], tf.float32)
        if aux == "crl":
            aux_value = losses.combine_crl_terms(parts, self.image_weight, self.label_weight,
                                          self.reduction)
            terms.update(crl=aux_value,
                         crl_image_term=losses.combine_crl_terms(parts, 1.0, 0.0, self.reduction),
                         crl_label_term=losses.combine_crl_terms(parts, 0.0, 1.0, self.reduction))
        elif aux == "mse":
            if project_labels is None:
                raise ValueError("aux='mse' needs project_labels (the label projector).")
            projected = tf.cast(project_labels(labels), tf.float32)
            aux_value = tf.reduce_sum(losses.embedding_mse_per_example(
                outputs["image_embeddings"], projected)) / global_batch
            terms["mse"] = aux_value
        terms["loss"] = self.cls_weight * cls + self.aux_weight * aux_value
        return terms

    def get_config(self):
        return {"cls_weight": self.cls_weight, "aux_weight": self.aux_weight,
                "margin": self.margin, "image_weight": self.image_weight,
                "label_weight": self.label_weight, "reduction": self.reduction}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def unpack_batch(data):
    """(images, labels) from an `(images, labels)` pair or a `make_dataset` dict.

    Raises:
        ValueError: no labels, or per-image sample weights (a third element,
            `fit(sample_weight=...)` or `class_weight`): the paper's
            objective has none, and the ranking loss couples a batch's images.
    """
    if isinstance(data, dict):
        images, labels, weights = data["images"], data["labels"], None
    else:
        images, labels, weights = keras.utils.unpack_x_y_sample_weight(data)
    if labels is None:
        raise ValueError("MLCRLModel trains on (images, labels): the data gives "
                         "no labels.")
    if weights is not None:
        raise ValueError(
            "MLCRLModel does not support sample weights (a third element of the "
            "data, fit(sample_weight=...) or class_weight): the paper's objective "
            "has none, and the ranking loss couples the images of a batch.")
    return images, labels


def global_values(terms):
    """Each replica's shares x replicas: Keras (and the CLI) then take the MEAN
    over replicas, which is the sum of the shares, the global batch's value."""
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    return {name: value * replicas for name, value in terms.items()}

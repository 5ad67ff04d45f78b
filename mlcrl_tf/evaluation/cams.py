"""Class activation maps of the direct head and of `f_conv` (paper Fig. 3):
CAM_c = sum_d W[d, c] Fx[..., d], and Fconv[..., c] (docs/serving.md, CAM pictures).
"""

import weakref

import numpy as np
import tensorflow as tf

_FEATURE_MODELS = weakref.WeakKeyDictionary()


def _feature_model(model):
    """`model.feature_model()`, built once per model."""
    feature_model = _FEATURE_MODELS.get(model)
    if feature_model is None:
        feature_model = model.feature_model()
        _FEATURE_MODELS[model] = feature_model
    return feature_model


def direct_head_kernel(model):
    """W (D, C): the classifier rows that read the pooled features Fx."""
    kernel = np.asarray(model.classifier.kernel.numpy(), np.float32)
    return kernel[:int(model.backbone.output_shape[-1])]


def compute_cams(model, images, class_ids):
    """Class maps at feature-map resolution for some classes of each image.

    Args:
        model: an `MLCRLModel`.
        images: float (N, S, S, 3), RGB in [0, 255] at the model size
            (`preprocess_eval`'s output; the model normalises).
        class_ids: the classes to map: an int (the same for every image), a
            sequence of N ints (one per image) or an (N, K) array.

    Returns:
        dict with `direct` float32 (N, K, h, w) (the direct head's CAM),
        `f_conv` float32 (N, K, h, w) or None (variants without f_conv),
        `class_ids` int (N, K) and `probabilities` float32 (N, C).

    Raises:
        ValueError: images of the wrong shape or a class id out of range.
    """
    images = _checked_images(model, images)
    _class_id_array(class_ids, len(images), model.num_classes)  # before the run
    return maps_from_outputs(model, run_feature_model(model, images), class_ids)


def run_feature_model(model, images):
    """One run of the network: `model.feature_model()`'s outputs.

    Args:
        model: an `MLCRLModel`.
        images: float (N, S, S, 3), RGB in [0, 255] at the model size.

    Returns:
        dict of tensors: `features` (N, h, w, D), `logits` (N, C) and, for
        variants with f_conv, `class_maps` (N, h, w, C).

    Raises:
        ValueError: images of the wrong shape.
    """
    return _feature_model(model)(_checked_images(model, images), training=False)


def _checked_images(model, images):
    """float32 (N, S, S, 3) at the model size, else ValueError."""
    images = np.asarray(images, np.float32)
    size = model.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"images must have shape (N, {size}, {size}, 3), "
                         f"got {images.shape}.")
    return images


def _class_id_array(class_ids, n, num_classes):
    """`compute_cams`'s class_ids as an int (n, K) array (ValueError if bad)."""
    ids = np.asarray(class_ids)
    if ids.ndim == 0:
        ids = np.full((n, 1), int(ids))
    elif ids.ndim == 1:
        ids = ids.reshape(n, 1) if len(ids) == n else None
    if ids is None or ids.shape[0] != n or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"class_ids must be an int, {n} ints or an ({n}, K) int array, "
                         f"got {class_ids!r}.")
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"class_ids must be in [0, {num_classes}), got {class_ids!r}.")
    return ids


def maps_from_outputs(model, outputs, class_ids):
    """`compute_cams` from `run_feature_model`'s outputs (no second run).

    Args:
        model: the `MLCRLModel` that gave `outputs`.
        outputs: `run_feature_model(model, images)`.
        class_ids: as `compute_cams`.

    Returns:
        As `compute_cams`.
    """
    features = np.asarray(tf.cast(outputs["features"], tf.float32))  # (N, h, w, D)
    ids = _class_id_array(class_ids, features.shape[0], model.num_classes)
    kernel = direct_head_kernel(model)  # (D, C)
    # CAM for the chosen classes only: (N, h, w, D) x (N, D, K) -> (N, K, h, w).
    direct = np.einsum("nhwd,ndk->nkhw", features, kernel[:, ids].transpose(1, 0, 2))
    fconv = None
    if "class_maps" in outputs:
        maps = np.asarray(tf.cast(outputs["class_maps"], tf.float32))  # (N, h, w, C)
        fconv = np.take_along_axis(maps.transpose(0, 3, 1, 2),
                                   ids[:, :, None, None], axis=1)
    probabilities = np.asarray(tf.sigmoid(tf.cast(outputs["logits"], tf.float32)))
    return {"direct": direct.astype(np.float32),
            "f_conv": None if fconv is None else fconv.astype(np.float32),
            "class_ids": ids, "probabilities": probabilities}


def upsample_and_normalise(cam, height, width):
    """Bilinear resize of one (h, w) map to (height, width), then to [0, 1].

    A constant map becomes all zeros.
    """
    cam = np.asarray(cam, np.float32)
    resized = tf.image.resize(cam[:, :, None], (height, width), method="bilinear")
    resized = resized.numpy()[:, :, 0]
    low, high = float(resized.min()), float(resized.max())
    if high - low < 1e-12:
        return np.zeros_like(resized)
    return (resized - low) / (high - low)


def jet(values):
    """The jet colormap in NumPy: [0, 1] (H, W) -> uint8 (H, W, 3).

    0 is dark blue, 0.5 green-yellow, 1 dark red (matplotlib's "jet").
    """
    x = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4.0 * x - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)],
                   axis=-1)
    return np.round(rgb * 255.0).astype(np.uint8)


def overlay(image_uint8, heat, alpha=0.5):
    """Blends jet(heat) (H, W) in [0, 1] over an RGB uint8 image (H, W, 3)."""
    colours = jet(heat).astype(np.float32)
    blended = (1.0 - alpha) * np.asarray(image_uint8, np.float32) + alpha * colours
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)

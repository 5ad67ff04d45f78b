"""Preprocessing, the train/eval pair: resize to S x S, optional augmentation.

`preprocess_eval` resizes; `preprocess_train` does the same by default, or
applies an `Augmentation` driven by a stateless seed. RGB pixels in [0, 255]
come out: the model normalises them itself. No antialiasing by default
(docs/data.md, Input pipeline: Preprocessing and augmentation).
"""

import dataclasses

import tensorflow as tf

# ML-GCN's MultiScaleCrop(448, scales=(1.0, 0.875, 0.75, 0.66, 0.5)).
ML_GCN_CROP_SCALES = (1.0, 0.875, 0.75, 0.66, 0.5)
# ML-GCN's max_distort: the height and width scale indices differ by <= 2.
_MAX_DISTORT = 2
INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training augmentation; the default, none, is the paper's.

    False when it does nothing (`bool(Augmentation())` is False).

    Args:
        random_flip: bool, flip left-right with probability 1/2 (after the
            resize).
        crop_scales: None (no crop), or the scales of ML-GCN's multi-scale
            random crop taken before the resize, e.g. `ML_GCN_CROP_SCALES`.

    Example:

    >>> augmentation = Augmentation(random_flip=True, crop_scales=ML_GCN_CROP_SCALES)
    >>> bool(augmentation), bool(Augmentation())
    (True, False)
    >>> image = tf.zeros([120, 160, 3], tf.uint8)
    >>> preprocess_train(image, 96, augmentation, seed=tf.constant([0, 7])).shape
    TensorShape([96, 96, 3])
    """

    random_flip: bool = False
    crop_scales: tuple | None = None

    def __bool__(self):
        return bool(self.random_flip or self.crop_scales)


def _resize(image, image_size, antialias):
    """Bilinear resize to (S, S), aspect ratio not kept."""
    return tf.image.resize(tf.cast(image, tf.float32),
                           (image_size, image_size), method="bilinear",
                           antialias=antialias)


def preprocess_eval(image, image_size, antialias=False):
    """Evaluation (and serving) preprocessing.

    Args:
        image: uint8 or float tensor (H, W, 3) (or a batch (B, H, W, 3)),
            RGB in [0, 255].
        image_size: side S of the square model input.
        antialias: antialiased (PIL-like) bilinear downscaling; about 3x
            slower on 640x480 photos to 448 (docs/performance.md). The
            identity when the image already has the model size.

    Returns:
        float32 (S, S, 3) (or (B, S, S, 3)), RGB in [0, 255] (the model
        normalises).
    """
    return _resize(image, image_size, antialias)


def _multi_scale_crop(image, crop_scales, seed):
    """ML-GCN's MultiScaleCrop with a random (not fixed-grid) offset: height
    and width are each `min(H, W) * scale`, the two scales' indices at most
    `_MAX_DISTORT` apart (docs/data.md, Preprocessing and augmentation)."""
    seeds = tf.random.experimental.stateless_split(seed, 3)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    base = tf.cast(tf.minimum(height, width), tf.float32)
    sizes = tf.maximum(tf.cast(base * tf.constant(crop_scales, tf.float32),
                               tf.int32), 1)
    n = len(crop_scales)
    pairs = tf.constant([(i, j) for i in range(n) for j in range(n)
                         if abs(i - j) <= _MAX_DISTORT], tf.int32)
    k = tf.random.stateless_uniform([], seeds[0], 0, tf.shape(pairs)[0],
                                    dtype=tf.int32)
    crop_h, crop_w = sizes[pairs[k, 0]], sizes[pairs[k, 1]]
    top = tf.random.stateless_uniform([], seeds[1], 0, height - crop_h + 1,
                                      dtype=tf.int32)
    left = tf.random.stateless_uniform([], seeds[2], 0, width - crop_w + 1,
                                       dtype=tf.int32)
    return tf.slice(image, [top, left, 0], [crop_h, crop_w, 3])


def preprocess_train(image, image_size, augmentation=None, seed=None, antialias=False):
    """Training preprocessing; equal to `preprocess_eval` by default.

    Args:
        image: uint8 or float tensor (H, W, 3), RGB in [0, 255].
        image_size: side S of the square model input.
        augmentation: an `Augmentation`, or None for none (the paper's).
        seed: stateless seed, int tensor of shape (2,). The same seed gives
            the same augmentation eagerly and inside tf.data. None draws a
            fresh one per call (not reproducible).
        antialias: see `preprocess_eval`.

    Returns:
        float32 (S, S, 3), RGB in [0, 255].
    """
    augmentation = augmentation or Augmentation()
    if augmentation:
        if seed is None:
            seed = tf.random.uniform([2], maxval=INT32_MAX, dtype=tf.int32)
        crop_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 2))
    if augmentation.crop_scales:
        image = _multi_scale_crop(image, tuple(augmentation.crop_scales), crop_seed)
    image = _resize(image, image_size, antialias)
    if augmentation.random_flip:
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return image

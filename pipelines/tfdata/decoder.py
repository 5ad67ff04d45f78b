"""Decoding (tf-models' Decoder): one tf.Example of the schema -> tensors.

`decode_example` gives the labels as multi-hot vectors (a class id outside
[0, num_classes) is an error naming the file, not a silent drop);
`decode_image` gives RGB pixels, decoded by content after a pixel-budget check
of the header. Decisions: docs/data.md, Input pipeline (Decoding).
"""

import tensorflow as tf

from pipelines.records import image_header
from pipelines.records import schema
from pipelines.tfdata import record_stream


def parse_example(serialized):
    """tf.Example -> image bytes, filename, label ids and difficult ids."""
    parsed = tf.io.parse_single_example(serialized, schema.FEATURE_SPEC)
    return {
        "image_bytes": parsed[schema.ENCODED_KEY],
        "filename": parsed[schema.FILENAME_KEY],
        "label_ids": tf.sparse.to_dense(parsed[schema.LABEL_KEY]),
        "difficult_ids": tf.sparse.to_dense(parsed[schema.DIFFICULT_KEY]),
    }


def _multi_hot(ids, num_classes, filename, what):
    """int64 class ids (n,) -> float32 multi-hot (C,); ids out of range raise."""
    message = (f"{what}: a class id is outside [0, num_classes={num_classes}); "
               "wrong num_classes or label map? (filename, ids):")
    in_range = tf.reduce_all((ids >= 0) & (ids < num_classes))
    check = tf.debugging.Assert(in_range, [record_stream.ERROR_TAG, message, filename, ids])
    with tf.control_dependencies([check]):
        one_hot = tf.one_hot(ids, num_classes, dtype=tf.float32)
    # Sum then clip: a repeated id stays 1 and no id gives all zeros.
    return tf.minimum(tf.reduce_sum(one_hot, axis=0), 1.0)


def labels_to_multi_hot(features, num_classes):
    """Replaces `label_ids`/`difficult_ids` by `labels`/`difficult` (C,)."""
    features = dict(features)
    filename = features["filename"]
    features["labels"] = _multi_hot(features.pop("label_ids"), num_classes,
                                    filename, "image/class/label")
    features["difficult"] = _multi_hot(features.pop("difficult_ids"),
                                       num_classes, filename,
                                       "image/class/difficult") > 0
    return features


def decode_example(serialized, num_classes):
    """Parses one serialized tf.Example of the mlcrl_tf schema.

    Args:
        serialized: scalar string tensor, one record.
        num_classes: int C.

    Returns:
        A dict: `image_bytes` string (), `filename` string (), `labels`
        float32 (C,) multi-hot (difficult classes included), `difficult`
        bool (C,).

    Raises:
        tf.errors.InvalidArgumentError: a label or difficult id is outside
            [0, num_classes) (message names num_classes and the filename).
    """
    return labels_to_multi_hot(parse_example(serialized), num_classes)


def decode_image(image_bytes, max_pixels=None):
    """Decodes JPEG/PNG/GIF/BMP bytes (by content, not name) to RGB.

    Grayscale and RGBA become 3-channel RGB; an animated GIF gives its first
    frame. EXIF orientation is the converters' job (docs/data.md, Decoding).

    Args:
        image_bytes: scalar string tensor.
        max_pixels: optional pixel budget, checked from the header before
            decoding (`pipelines.records.image_header`): a decompression bomb
            is refused without being decoded.

    Returns:
        uint8 tensor (H, W, 3).

    Raises:
        tf.errors.InvalidArgumentError: the bytes are not a decodable image,
            or the image is above `max_pixels`.
    """
    if max_pixels is not None:
        image_bytes = image_header.within_pixel_budget_fast(image_bytes, max_pixels)
    image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8,
                               expand_animations=False)
    image.set_shape([None, None, 3])
    return image

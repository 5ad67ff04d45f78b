"""An export's ONNX model as an `ExportClient`: the same decoding, limits and
bad-image reports, the forward pass in onnxruntime (`predict --format=onnx`).
"""

import json
import os

import numpy as np
import tensorflow as tf

from mlcrl_tf.serving import export_client
from mlcrl_tf.serving import onnx_export
from mlcrl_tf.serving import request_checks


def resolve_onnx(path):
    """The model.onnx file meant by a file, an onnx/ folder, a version or base dir.

    Raises:
        ValueError: no ONNX model there (the message says how to export one).
    """
    if path.endswith(".onnx") and os.path.isfile(path):
        return path
    for candidate in (os.path.join(path, onnx_export.ONNX_DIR, onnx_export.ONNX_FILE),
                      os.path.join(path, onnx_export.ONNX_FILE)):
        if os.path.isfile(candidate):
            return candidate
    try:
        version = export_client.resolve_saved_model(path)
    except ValueError:
        version = None
    candidate = (os.path.join(version, onnx_export.ONNX_DIR, onnx_export.ONNX_FILE)
                 if version else None)
    if candidate and os.path.isfile(candidate):
        return candidate
    raise ValueError(f"saved_model={path!r} holds no {onnx_export.ONNX_DIR}/"
                     f"{onnx_export.ONNX_FILE}; export it with `python -m mlcrl_tf.export "
                     "--format=onnx`.")


class OnnxClient(export_client.ExportClient):
    """`ExportClient` over `<version>/onnx/model.onnx`, run by onnxruntime.

    The images are decoded and resized in TensorFlow exactly as the
    SavedModel's `serving_default` does (the run's resize, the export's pixel
    budget), then scored by onnxruntime; the export's settings come from the
    ONNX model's metadata.

    Args:
        path: a `model.onnx` file, its `onnx/` folder, a version directory
            or an export base directory (highest version).

    Raises:
        ValueError: no ONNX model there, not one of `mlcrl_tf.export`, or
            onnxruntime missing (one line naming the install).

    Example:
        client = OnnxClient("saved_models/demo/1")
        kept, logits, problems = client.score([open("photo.jpg", "rb").read()])
    """

    def __init__(self, path):  # pylint: disable=super-init-not-called
        self.path = resolve_onnx(path)
        self._session = onnx_export.session(self.path)
        metadata = self._session.get_modelmeta().custom_metadata_map
        if onnx_export.METADATA_KEY not in metadata:
            raise ValueError(f"{self.path!r} is not an ONNX model of mlcrl_tf.export (no "
                             f"{onnx_export.METADATA_KEY} metadata).")
        info = json.loads(metadata[onnx_export.METADATA_KEY])
        self.class_names = list(info["class_names"])
        self.threshold = float(info["threshold"])
        self.image_size = int(info["image_size"])
        self.max_batch_size = int(info["max_batch_size"])
        self.max_image_pixels = int(info["max_image_pixels"])
        self._decode = tf.function(
            lambda image_bytes: request_checks.decode_image_batch(
                image_bytes, self.image_size, self.max_image_pixels, bool(info["antialias"])),
            input_signature=[tf.TensorSpec([None], tf.string)])

    def outputs(self, image_bytes):
        """Logits and probabilities of encoded images; raises InvalidArgumentError."""
        images = self._decode(tf.constant(list(image_bytes), tf.string)).numpy()
        logits = onnx_export.run_logits(self._session, images, self.max_batch_size)
        return {"logits": logits, "probabilities": 1.0 / (1.0 + np.exp(-logits))}

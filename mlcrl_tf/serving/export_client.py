"""An export as a Python object: its metadata, and scoring encoded images
with bad ones reported rather than fatal (used by `evaluate` and `predict`).
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from mlcrl_tf.serving import contract
from mlcrl_tf.serving import request_checks
from pipelines.records import image_header


def resolve_saved_model(saved_model_dir):
    """A version directory, or the highest integer version under a base dir.

    Raises:
        ValueError: neither a SavedModel nor a directory of versions.
    """
    if tf.io.gfile.exists(os.path.join(saved_model_dir, "saved_model.pb")):
        return saved_model_dir
    if tf.io.gfile.isdir(saved_model_dir):
        versions = [n.rstrip("/") for n in tf.io.gfile.listdir(saved_model_dir)]
        versions = sorted(int(n) for n in versions if n.isdigit())
        if versions:
            return os.path.join(saved_model_dir, str(versions[-1]))
    raise ValueError(f"saved_model={saved_model_dir!r} is neither a SavedModel "
                     "directory nor an export base directory with integer versions.")


@dataclasses.dataclass(frozen=True)
class ImageProblem:
    """One image an export could not score: its index in the request, and why."""

    index: int
    reason: str


class ExportClient:
    """An export's `serving_default` plus its metadata, as a Python object.

    `score` sends encoded images in requests of at most the export's
    `max_batch_size`, refuses those above its pixel budget from their header,
    and retries a failing request image by image, so each bad image gets an
    `ImageProblem` instead of failing the rest.

    Args:
        saved_model_dir: a version directory (or its base directory).

    Raises:
        ValueError: not a SavedModel of `mlcrl_tf.export`.

    Example:
        client = ExportClient("saved_models/demo/1")
        kept, logits, problems = client.score([open("photo.jpg", "rb").read()])
        names = client.class_names
    """

    def __init__(self, saved_model_dir):
        self.path = resolve_saved_model(saved_model_dir)
        loaded = tf.saved_model.load(self.path)
        signatures = loaded.signatures
        if contract.SERVING_DEFAULT not in signatures or contract.METADATA not in signatures:
            raise ValueError(f"saved_model={self.path!r} lacks the {contract.SERVING_DEFAULT}/"
                             f"{contract.METADATA} signatures of mlcrl_tf.export.")
        self._loaded = loaded  # keeps the variables alive
        self._serve = signatures[contract.SERVING_DEFAULT]
        metadata = signatures[contract.METADATA]()
        self.class_names = [n.decode("utf-8") for n in metadata["class_names"].numpy()]
        self.threshold = float(metadata["threshold"].numpy())
        self.image_size = int(metadata["image_size"].numpy())
        # Exports older than these options have no limit to respect.
        self.max_batch_size = (int(metadata["max_batch_size"].numpy())
                               if "max_batch_size" in metadata else None)
        self.max_image_pixels = (int(metadata["max_image_pixels"].numpy())
                                 if "max_image_pixels" in metadata else None)

    def outputs(self, image_bytes):
        """The signature's outputs for a request; raises InvalidArgumentError."""
        out = self._serve(**{contract.IMAGE_BYTES_KEY: tf.constant(list(image_bytes), tf.string)})
        return {key: value.numpy() for key, value in out.items()}

    def score(self, image_bytes, key="logits"):
        """Scores encoded images; bad ones are reported, not fatal.

        Images above the export's pixel budget are refused here, from their
        header, without a request. The others are sent in requests of at
        most the export's `max_batch_size`; a refused request (one bad image
        fails a whole request) or one that runs out of memory is retried
        image by image.

        Args:
            image_bytes: a sequence of encoded images.
            key: the output to return per image ("logits", "probabilities").

        Returns:
            (indices of the scored images, their `key` rows (n, C),
            a list of `ImageProblem` for the others, in index order).
        """
        image_bytes = list(image_bytes)
        problems, todo = [], []
        for i, data in enumerate(image_bytes):
            reason = self._header_problem(data)
            if reason:
                problems.append(ImageProblem(i, reason))
            else:
                todo.append(i)
        kept, rows = [], []
        step = self.max_batch_size or max(len(todo), 1)
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            k, r, p = self._score_chunk([image_bytes[i] for i in chunk], key)
            kept += [chunk[j] for j in k]
            rows += list(r)
            problems += [ImageProblem(chunk[q.index], q.reason) for q in p]
        rows = np.stack(rows) if rows else np.zeros((0, len(self.class_names)), np.float32)
        return kept, rows, sorted(problems, key=lambda q: q.index)

    def _header_problem(self, data):
        if not data:
            return request_checks.EMPTY
        if self.max_image_pixels is None:
            return None
        return image_header.pixel_budget_problem(data, self.max_image_pixels)

    def _score_chunk(self, image_bytes, key):
        """`score` for one request's worth of images."""
        try:
            return list(range(len(image_bytes))), list(self.outputs(image_bytes)[key]), []
        except (tf.errors.InvalidArgumentError, tf.errors.ResourceExhaustedError):
            pass
        kept, rows, problems = [], [], []
        for i, data in enumerate(image_bytes):
            try:
                rows.append(self.outputs([data])[key][0])
                kept.append(i)
            except tf.errors.InvalidArgumentError:
                problems.append(ImageProblem(i, request_checks.image_bytes_problem(data,
                                                                    self.max_image_pixels)))
            except tf.errors.ResourceExhaustedError:
                problems.append(ImageProblem(i, request_checks.OUT_OF_MEMORY))
        return kept, rows, problems

"""The SavedModel contract: signature, input and output names, limits and
metadata (docs/serving.md, Signatures).
"""

import dataclasses

from pipelines.records import image_header

SERVING_DEFAULT = "serving_default"
SERVE_TENSOR = "serve_tensor"
METADATA = "metadata"
IMAGE_BYTES_KEY = "image_bytes"
IMAGES_KEY = "images"
LABELS_FILE = "labels.txt"
OUTPUT_KEYS = ("logits", "probabilities", "predicted", "top_k_scores",
               "top_k_class_ids", "top_k_classes")
# Export options (stored in the `metadata` signature).
# ResNet-101 at 448 px: ~37 MB per image in a request (docs/reliability.md).
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_IMAGE_PIXELS = image_header.DEFAULT_MAX_PIXELS


@dataclasses.dataclass(frozen=True)
class ServingInfo:
    """What an export says about itself: the values of its `metadata` signature.

    Attributes:
        class_names: the C class names, in class-id order.
        backbone, image_size, variant: the network served.
        threshold: probability threshold of the `predicted` output.
        top_k: k of the `top_k_*` outputs.
        max_batch_size, max_image_pixels: the request limits.
        antialias: the resize the model was trained with.
        precision: "float32" or "mixed_bfloat16" (outputs stay float32).
        jit_compile: whether the forward pass is XLA-compiled.

    Example:
    >>> ServingInfo(("cat", "dog"), "small_cnn", 64, 0.5, 2, "crl").max_batch_size
    64
    """

    class_names: tuple
    backbone: str
    image_size: int
    threshold: float
    top_k: int
    variant: str
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    antialias: bool = False
    precision: str = "float32"
    jit_compile: bool = False

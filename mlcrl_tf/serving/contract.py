"""The SavedModel contract: signature, input and output names, limits, metadata."""

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
    """What an export says about itself (the `metadata` signature)."""

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

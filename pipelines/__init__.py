"""Dataset converters (COCO 2014, VOC 2007, CSV -> TFRecord), the tf.data
input pipeline and the embedded Fashion-MNIST "outfits" demo dataset."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

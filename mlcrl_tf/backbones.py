"""Backbones `f_cnn` by name, and each backbone's own input normalisation.

Every backbone maps float RGB images (B, H, W, 3) to a feature map
`Fx` (B, H/s, W/s, D). The input pipeline and the serving signatures both
call `normalize_images` so that training, evaluation and serving see exactly
the same pixels.

| name        | D    | stride s | normalisation                       | imagenet |
|-------------|------|----------|-------------------------------------|----------|
| resnet101   | 2048 | 32       | caffe: RGB->BGR, minus ImageNet mean | yes      |
| resnet50    | 2048 | 32       | caffe                               | yes      |
| vgg16       | 512  | 16       | caffe                               | yes      |
| small_cnn   | 256  | 8        | [0, 255] -> [-1, 1]                 | no       |
"""

import os

import keras
import tensorflow as tf

BACKBONES = ("resnet101", "resnet50", "vgg16", "small_cnn")

# keras.applications' "caffe" mode (ResNet, VGG): BGR order, ImageNet mean.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

_FEATURE_DIMS = {"resnet101": 2048, "resnet50": 2048, "vgg16": 512, "small_cnn": 256}
_STRIDES = {"resnet101": 32, "resnet50": 32, "vgg16": 16, "small_cnn": 8}
# The layer whose output is `Fx`. VGG-16 drops its last pooling layer (paper
# §3.1: "we remove the last pooling layer"): Fx is block5_conv3, 28x28x512 at
# 448 px. The ResNets end at their last block (conv5_block3_out, 14x14x2048).
_FEATURE_LAYERS = {"vgg16": "block5_conv3"}


def check_backbone_name(name):
    """Raises ValueError unless `name` is a known backbone."""
    if name not in BACKBONES:
        raise ValueError(
            f"backbone={name!r} is unknown; choose one of {', '.join(BACKBONES)}.")


def feature_dim(name):
    """Channels D of the backbone's last feature map."""
    check_backbone_name(name)
    return _FEATURE_DIMS[name]


def feature_stride(name):
    """Spatial reduction of the backbone (448 -> 448 / stride)."""
    check_backbone_name(name)
    return _STRIDES[name]


def normalize_images(images, backbone):
    """Applies the backbone's own input normalisation.

    Args:
        images: float tensor (..., H, W, 3), RGB in [0, 255].
        backbone: a name from `BACKBONES`.

    Returns:
        float32 tensor of the same shape, ready for the backbone.
    """
    check_backbone_name(backbone)
    images = tf.cast(images, tf.float32)
    if backbone == "small_cnn":
        return images / 127.5 - 1.0
    bgr = images[..., ::-1]
    return bgr - tf.constant(_CAFFE_BGR_MEAN, dtype=tf.float32)


def denormalize_images(images, backbone):
    """Inverse of `normalize_images`: back to RGB in [0, 255] (for display)."""
    check_backbone_name(backbone)
    images = tf.cast(images, tf.float32)
    if backbone == "small_cnn":
        return (images + 1.0) * 127.5
    bgr = images + tf.constant(_CAFFE_BGR_MEAN, dtype=tf.float32)
    return bgr[..., ::-1]


def build_backbone(name, image_size, weights=None):
    """Builds the feature extractor `f_cnn` without its pooling and top.

    Args:
        name: a name from `BACKBONES`.
        image_size: input side in pixels (square images).
        weights: None (random init), "imagenet" (keras.applications download,
            resnet/vgg only) or a path to a local `.h5`/`.weights.h5` file of
            the same architecture without top.

    Returns:
        A `keras.Model` named "backbone": (B, S, S, 3) -> (B, S/s, S/s, D).

    Raises:
        ValueError: unknown name, imagenet weights for small_cnn, or a weights
            path that does not exist.
    """
    check_backbone_name(name)
    if weights not in (None, "imagenet") and not os.path.exists(weights):
        raise ValueError(f"backbone_weights={weights!r}: no such file.")
    if weights == "imagenet" and name == "small_cnn":
        raise ValueError(
            "backbone_weights='imagenet' is not available for small_cnn; use "
            "None or a local weights file.")
    shape = (image_size, image_size, 3)
    if name == "small_cnn":
        model = _small_cnn(shape)
    else:
        app = {
            "resnet101": keras.applications.ResNet101,
            "resnet50": keras.applications.ResNet50,
            "vgg16": keras.applications.VGG16,
        }[name]
        # keras.applications downloads "imagenet" itself; a local file is
        # loaded below so that one code path serves both.
        model = app(include_top=False,
                    weights="imagenet" if weights == "imagenet" else None,
                    input_shape=shape)
    if weights not in (None, "imagenet"):
        model.load_weights(weights)
    features = model.outputs[0]
    if name in _FEATURE_LAYERS:
        # Weights load into the whole keras.applications network (a local
        # file is that network without top); Fx is then an inner layer.
        features = model.get_layer(_FEATURE_LAYERS[name]).output
    # One name for every backbone: the training loop gives the variables
    # under this layer the backbone learning rate.
    return keras.Model(model.inputs[0], features, name="backbone")


def _small_cnn(shape):
    """A small VGG-like CNN for CPU demos and tests: stride 8, D = 256.

    Batch normalisation is `synchronized` so that a multi-replica run computes
    the same statistics as one device on the same global batch, with momentum
    0.9 so that its moving statistics settle within the few hundred steps of
    a CPU run.
    """
    x = inputs = keras.Input(shape)
    for stage, (filters, stride) in enumerate(
            [(32, 2), (64, 2), (128, 2), (256, 1)]):
        for i, s in enumerate((stride, 1)):
            x = keras.layers.Conv2D(filters, 3, strides=s, padding="same",
                                    use_bias=False,
                                    name=f"stage{stage}_conv{i}")(x)
            x = keras.layers.BatchNormalization(
                momentum=0.9, synchronized=True, name=f"stage{stage}_bn{i}")(x)
            x = keras.layers.ReLU(name=f"stage{stage}_relu{i}")(x)
    return keras.Model(inputs, x, name="small_cnn")

"""Backbones `f_cnn` by name, and each backbone's own input normalisation.

A backbone maps normalised images (B, S, S, 3) to `Fx` (B, S/s, S/s, D); its
`InputNormalization` sits inside the model, so data and serving deliver RGB
pixels in [0, 255] (docs/design.md, Model and Input pipeline).

| name               | D    | stride s | normalisation                        | imagenet |
|--------------------|------|----------|--------------------------------------|----------|
| resnet101          | 2048 | 32       | caffe: RGB->BGR, minus ImageNet mean | yes      |
| resnet50           | 2048 | 32       | caffe                                | yes      |
| vgg16              | 512  | 16       | caffe                                | yes      |
| small_cnn          | 256  | 8        | [0, 255] -> [-1, 1]                  | no       |
| keras_hub:<preset> | read from the built network | the preset's converter | the preset's |
"""

import os

import keras
from keras import layers
from keras import ops

from mlcrl_tf.modeling import keras_hub_backbones

BACKBONES = ("resnet101", "resnet50", "vgg16", "small_cnn")
# The built-in backbones with ImageNet weights (keras.applications).
IMAGENET_BACKBONES = ("resnet101", "resnet50", "vgg16")
# Spellings of "random initialisation" of --backbone_weights, for every backbone.
RANDOM_WEIGHTS = keras_hub_backbones.RANDOM_WEIGHTS

# keras.applications' "caffe" mode (ResNet, VGG): BGR order, ImageNet mean.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

_FEATURE_DIMS = {"resnet101": 2048, "resnet50": 2048, "vgg16": 512, "small_cnn": 256}
_STRIDES = {"resnet101": 32, "resnet50": 32, "vgg16": 16, "small_cnn": 8}
# The layer whose output is `Fx`. VGG-16 drops its last pooling layer (paper
# §3.1: "we remove the last pooling layer"): Fx is block5_conv3, 28x28x512 at
# 448 px. The ResNets end at their last block (conv5_block3_out, 14x14x2048).
_FEATURE_LAYERS = {"vgg16": "block5_conv3"}


def check_backbone_name(name):
    """Raises ValueError unless `name` is a known backbone or `keras_hub:<preset>`."""
    if keras_hub_backbones.is_keras_hub(name):
        keras_hub_backbones.preset_of(name)
        return
    if name not in BACKBONES:
        raise ValueError(
            f"backbone={name!r} is unknown; choose one of {', '.join(BACKBONES)} "
            "or keras_hub:<preset>.")


def check_backbone_available(name):
    """Raises ValueError unless backbone `name` can be built in this environment.

    A `keras_hub:<preset>` backbone needs keras-hub installed (the error,
    a `keras_hub_backbones.KerasHubNotInstalledError`, says how).
    """
    check_backbone_name(name)
    if keras_hub_backbones.is_keras_hub(name):
        keras_hub_backbones.require_keras_hub(name)


def _builtin(name, table):
    check_backbone_name(name)
    if keras_hub_backbones.is_keras_hub(name):
        raise ValueError(f"backbone={name!r}: a KerasHub backbone's D and stride are "
                         "read from the built network (keras_hub_backbones.build).")
    return table[name]


def feature_dim(name):
    """Channels D of a built-in backbone's last feature map."""
    return _builtin(name, _FEATURE_DIMS)


def feature_stride(name):
    """Spatial reduction of a built-in backbone (448 -> 448 / stride)."""
    return _builtin(name, _STRIDES)


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class InputNormalization(layers.Layer):
    """RGB pixels in [0, 255] -> the backbone's input, in float32, no variables.

    `y = (x[..., ::-1] if reverse_channels else x) / divisor + offset`, per
    channel. keras.applications' "caffe" mode is reverse_channels=True,
    divisor=1, offset=-(BGR ImageNet mean); small_cnn's [-1, 1] is
    divisor=127.5, offset=-1. It always computes in float32 (also under a
    mixed-precision policy); the next layer casts to its compute dtype.

    Args:
        divisor: 3 floats (or one for all channels).
        offset: 3 floats (or one).
        reverse_channels: RGB -> BGR first.

    Example:
    >>> layer = InputNormalization(divisor=127.5, offset=-1.0)
    >>> [round(float(v), 4) for v in layer(keras.ops.full((1, 1, 1, 3), 255.0))[0, 0, 0]]
    [1.0, 1.0, 1.0]
    """

    def __init__(self, divisor=1.0, offset=0.0, reverse_channels=False, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.divisor = _per_channel(divisor, "divisor")
        self.offset = _per_channel(offset, "offset")
        self.reverse_channels = bool(reverse_channels)

    def call(self, images):
        x = ops.cast(images, "float32")
        if self.reverse_channels:
            x = ops.flip(x, axis=-1)
        divisor = ops.convert_to_tensor(self.divisor, "float32")
        return x / divisor + ops.convert_to_tensor(self.offset, "float32")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "divisor": list(self.divisor),
                "offset": list(self.offset), "reverse_channels": self.reverse_channels}


def _per_channel(value, name):
    """One float per RGB channel from a number or 3 numbers."""
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ValueError(f"{name} must be one number or 3 (one per RGB channel), "
                         f"got {value!r}.")
    values = tuple(float(v) for v in values)
    if name == "divisor" and 0.0 in values:
        raise ValueError(f"divisor must be non-zero, got {value!r}.")
    return values


_CAFFE = {"divisor": 1.0, "offset": tuple(-m for m in _CAFFE_BGR_MEAN),
          "reverse_channels": True}
_NORMALIZATION = {"resnet101": _CAFFE, "resnet50": _CAFFE, "vgg16": _CAFFE,
                  "small_cnn": {"divisor": 127.5, "offset": -1.0,
                                "reverse_channels": False}}


def normalization_spec(name):
    """The backbone's normalisation as `InputNormalization` arguments.

    A KerasHub preset's converter (`x * scale + offset`) becomes
    divisor = 1 / scale.
    """
    check_backbone_name(name)
    if keras_hub_backbones.is_keras_hub(name):
        return _from_keras_hub(
            keras_hub_backbones.normalization(keras_hub_backbones.preset_of(name)))
    return dict(_NORMALIZATION[name])


def _from_keras_hub(spec):
    """A KerasHub converter spec (`x * scale + offset`) as `InputNormalization`
    arguments."""
    return {"divisor": tuple(1.0 / s for s in spec["scale"]),
            "offset": spec["offset"], "reverse_channels": spec["reverse_channels"]}


def input_normalization(name):
    """The `InputNormalization` layer of backbone `name`."""
    return InputNormalization(**normalization_spec(name), name="input_normalization")


def normalize_images(images, backbone):
    """Applies backbone `backbone`'s normalisation to RGB images in [0, 255].

    The model does this itself; this is for code that feeds a bare
    `build_backbone` network (e.g. pretraining it).

    Returns:
        float32 tensor of the same shape.
    """
    return input_normalization(backbone)(images)


def build_backbone(name, image_size, weights=None):
    """Builds the feature extractor `f_cnn` without its pooling and top.

    It takes NORMALISED images (see `input_normalization`).

    Args:
        name: a name from `BACKBONES` or `keras_hub:<preset>`.
        image_size: input side in pixels (square images).
        weights: None (random init; also any spelling of `RANDOM_WEIGHTS`:
            "", "none", "random"), "imagenet" (keras.applications download,
            `IMAGENET_BACKBONES` only; a KerasHub preset's own weights) or a
            path to a local `.h5`/`.weights.h5` file of the same architecture
            without top.

    Returns:
        A `keras.Model` named "backbone": (B, S, S, 3) -> (B, S/s, S/s, D).

    Raises:
        ValueError: unknown name, imagenet weights for small_cnn, or a weights
            path that does not exist.
    """
    return build_backbone_and_normalization(name, image_size, weights)[0]


def build_backbone_and_normalization(name, image_size, weights=None):
    """(`build_backbone(...)`, `input_normalization(name)`), reading a KerasHub
    preset's converter once (the model needs both)."""
    check_backbone_name(name)
    if keras_hub_backbones.is_keras_hub(name):
        built = keras_hub_backbones.build(name, image_size, weights)
        return built.model, InputNormalization(**_from_keras_hub(built.normalization),
                                               name="input_normalization")
    normalization = input_normalization(name)
    return _build_builtin(name, image_size, weights), normalization


def _build_builtin(name, image_size, weights):
    """`build_backbone` of a name from `BACKBONES`."""
    if weights in RANDOM_WEIGHTS:
        weights = None
    if weights not in (None, "imagenet") and not os.path.exists(weights):
        raise ValueError(f"backbone_weights={weights!r}: no such file.")
    if weights == "imagenet" and name not in IMAGENET_BACKBONES:
        raise ValueError(
            f"backbone_weights='imagenet' is not available for {name}; use "
            "None (random) or a local weights file.")
    shape = (image_size, image_size, 3)
    if name == "small_cnn":
        model = _small_cnn(shape)
    else:
        # keras.applications downloads "imagenet" itself; a local file is
        # loaded below so that one code path serves both.
        model = _application(name, "imagenet" if weights == "imagenet" else None, shape)
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


_APPLICATIONS = {"resnet101": keras.applications.ResNet101,
                 "resnet50": keras.applications.ResNet50,
                 "vgg16": keras.applications.VGG16}


def _application(name, weights, shape):
    """The keras.applications network without top; a failed download of its
    ImageNet weights is one ValueError saying how to give them offline."""
    try:
        return _APPLICATIONS[name](include_top=False, weights=weights, input_shape=shape)
    except Exception as e:  # keras.utils.get_file raises a plain Exception
        if weights != "imagenet" or "fetch failure" not in str(e):
            raise
        reason = str(e).strip().splitlines()[0]
        raise ValueError(
            f"--backbone_weights=imagenet: could not download the ImageNet weights of "
            f"{name} ({reason}). Without internet, download that file elsewhere and pass "
            "--backbone_weights=<path to the .h5>, or copy it into Keras' cache, "
            f"{os.path.join(_keras_home(), 'models')}.") from None


def _keras_home():
    """Where Keras caches downloads: $KERAS_HOME, else ~/.keras."""
    return os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")


def fetch_imagenet_weights(name):
    """Downloads (into Keras' cache) the ImageNet weights `--backbone=name`
    starts from, before a run creates anything; a no-op for other backbones.

    Raises:
        ValueError: the download failed (the message says how to go offline).
    """
    if name in _APPLICATIONS:
        _application(name, "imagenet", (32, 32, 3))


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

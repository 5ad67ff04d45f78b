"""KerasHub image backbones as `f_cnn`: `--backbone=keras_hub:<preset>`.

A preset name, an `hf://` or `kaggle://` handle or a local preset directory;
its D, stride and input converter are read from the built network
(docs/ecosystem.md, KerasHub backbones). keras-hub is optional.
"""

import dataclasses
import os

import keras

try:
    import keras_hub
except ImportError:  # optional dependency: build() says how to get it
    keras_hub = None

PREFIX = "keras_hub:"
PRESET_WEIGHTS = ("imagenet", "preset")
RANDOM_WEIGHTS = (None, "", "none", "None", "random")
_PROBE_SIZE = 512
_INSTALL = ("KerasHub is not installed: pip install 'mlcrl_tf[keras_hub]' && "
            "pip install --no-deps 'keras-hub==0.32.0' (docs/ecosystem.md says why "
            "not plain `pip install keras-hub`)")


@dataclasses.dataclass(frozen=True)
class KerasHubBackbone:
    """A built KerasHub feature extractor and what the model needs to know.

    Attributes:
        model: `keras.Model` named "backbone", images (B, S, S, 3) normalised
            -> `Fx` (B, h, w, D).
        preset: the KerasHub preset it was built from.
        stride: spatial reduction (S / h on a 512 x 512 probe).
        feature_dim: D, the channels of `Fx`.
        normalization: {"scale": 3 floats, "offset": 3 floats,
            "reverse_channels": bool} for RGB pixels in [0, 255].
    """

    model: keras.Model
    preset: str
    stride: int
    feature_dim: int
    normalization: dict


def is_keras_hub(name):
    """True when a --backbone value names a KerasHub preset."""
    return isinstance(name, str) and name.startswith(PREFIX)


def preset_of(name):
    """`keras_hub:<preset>` -> `<preset>`; ValueError for any other spelling."""
    preset = name[len(PREFIX):].strip() if is_keras_hub(name) else ""
    if not preset:
        raise ValueError(
            f"backbone={name!r}: write keras_hub:<preset>, e.g. "
            "keras_hub:resnet_101_imagenet or keras_hub:hf://timm/resnet101.a1h_in1k")
    return preset


class KerasHubNotInstalledError(ImportError, ValueError):
    """A `keras_hub:<preset>` backbone is asked for but keras-hub is not installed.

    Also a ValueError, so that every CLI reports it as its one `error:` line.
    """


def require_keras_hub(name=None):
    """Raises KerasHubNotInstalledError (saying how to install) without keras-hub.

    Args:
        name: the `--backbone` value that needs it, named in the message.
    """
    if keras_hub is None:
        needed_by = f" (needed by --backbone={name})" if name else ""
        raise KerasHubNotInstalledError(_INSTALL.replace(": pip", f"{needed_by}: pip", 1))


def normalization(preset):
    """The preset's input normalisation as the model's normalisation spec.

    Args:
        preset: a KerasHub preset (name, `hf://`/`kaggle://` handle or dir).

    Returns:
        {"scale": (3 floats), "offset": (3 floats), "reverse_channels": False}
        meaning `normalized = x * scale + offset` for RGB x in [0, 255].

    Raises:
        ValueError: the preset has no image converter.
    """
    require_keras_hub()
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"KerasHub preset {preset!r} has no image converter, so "
                         f"its input normalisation is unknown ({e})") from None

    def per_channel(value, default):
        if value is None:
            value = default
        if isinstance(value, (int, float)):
            value = [value] * 3
        value = tuple(float(v) for v in value)
        if len(value) != 3:
            raise ValueError(f"KerasHub preset {preset!r}: image converter scale/"
                             f"offset {value} is not one value per RGB channel")
        return value

    return {"scale": per_channel(converter.scale, 1.0),
            "offset": per_channel(converter.offset, 0.0),
            "reverse_channels": False}


def _load(preset, weights):
    """The KerasHub backbone with preset, random or file weights."""
    if weights not in PRESET_WEIGHTS + RANDOM_WEIGHTS and not os.path.isfile(weights):
        raise ValueError(f"backbone_weights={weights!r}: no such file (or use "
                         "'imagenet' for the preset's weights, empty for random)")
    try:
        hub = keras_hub.models.Backbone.from_preset(
            preset, load_weights=weights in PRESET_WEIGHTS,
            dtype=keras.config.dtype_policy())
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"KerasHub preset {preset!r} cannot be loaded as a "
                         f"backbone: {e}") from None
    return hub


def _feature_extractor(preset, hub):
    """The part of `hub` that maps images to its deepest feature map."""
    if len(hub.outputs) == 1 and len(hub.outputs[0].shape) == 4:
        return hub
    pyramid = getattr(hub, "pyramid_outputs", None)
    if pyramid:
        deepest = list(pyramid.values())[-1]
        return keras.Model(hub.inputs, deepest, name=f"{hub.name}_features")
    raise ValueError(f"KerasHub preset {preset!r} ({type(hub).__name__}) gives no "
                     "(batch, height, width, channels) feature map")


def build(name, image_size, weights="imagenet"):
    """Builds the KerasHub backbone `f_cnn` for `--backbone=keras_hub:<preset>`.

    Args:
        name: `keras_hub:<preset>`.
        image_size: side S of the square input.
        weights: "imagenet"/"preset" (pretrained), None/""/"random" (random
            init from the preset's config), or a `.weights.h5` path.

    Returns:
        A `KerasHubBackbone`.

    Raises:
        KerasHubNotInstalledError: keras-hub is not installed (an ImportError
            and a ValueError).
        ValueError: bad name, missing weights file, a preset that cannot be
            loaded or gives no feature map, or image_size below the stride.
    """
    preset = preset_of(name)
    require_keras_hub(name)
    extractor = _feature_extractor(preset, _load(preset, weights))
    probe = extractor.compute_output_shape((1, _PROBE_SIZE, _PROBE_SIZE, 3))
    stride, feature_dim = _PROBE_SIZE // int(probe[1]), int(probe[-1])
    if image_size < stride:
        raise ValueError(f"image_size={image_size} is below the stride {stride} of "
                         f"backbone={name!r}")
    images = keras.Input((image_size, image_size, 3), name="images")
    # One name for every backbone: the training loop gives the variables
    # under this layer the backbone learning rate.
    model = keras.Model(images, extractor(images), name="backbone")
    if weights not in PRESET_WEIGHTS + RANDOM_WEIGHTS:
        model.load_weights(weights)
    return KerasHubBackbone(model=model, preset=preset, stride=stride,
                            feature_dim=feature_dim,
                            normalization=normalization(preset))

"""KerasHub backbones (mlcrl_tf.keras_hub_backbones), offline.

No download: the presets are local preset directories holding what a
KerasHub preset holds besides its weights (`config.json`, `metadata.json`,
`image_converter.json`), written by the tests. The ResNet-101 one is the
architecture of the `resnet_101_imagenet` preset (keras-hub 0.32 lists it
with 42,605,504 parameters, which the test checks) with timm's ImageNet
mean/std converter; weights are random (`weights="random"`).
"""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.modeling import backbones
from mlcrl_tf.modeling import keras_hub_backbones as khb
from mlcrl_tf.modeling import model as model_lib
from mlcrl_tf.modeling import optim
from mlcrl_tf.serving import export_lib

keras_hub = pytest.importorskip("keras_hub")  # optional: docs/ecosystem.md

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# keras_hub/src/models/resnet/resnet_presets.py: "resnet_101_imagenet" params.
RESNET_101_PARAMS = 42605504


def _write_preset(directory, blocks, filters=(64, 128, 256, 512),
                  block_type="bottleneck_block", scale=None, offset=None):
    """A KerasHub ResNet preset directory without weights."""
    os.makedirs(directory, exist_ok=True)
    backbone = {
        "module": "keras_hub.src.models.resnet.resnet_backbone",
        "class_name": "ResNetBackbone", "registered_name": "keras_hub>ResNetBackbone",
        "config": {"name": "res_net_backbone", "trainable": True,
                   "input_conv_filters": [64], "input_conv_kernel_sizes": [7],
                   "stackwise_num_filters": list(filters),
                   "stackwise_num_blocks": list(blocks),
                   "stackwise_num_strides": [1, 2, 2, 2], "block_type": block_type,
                   "use_pre_activation": False, "image_shape": [None, None, 3]}}
    converter = {
        "module": "keras_hub.src.models.resnet.resnet_image_converter",
        "class_name": "ResNetImageConverter",
        "registered_name": "keras_hub>ResNetImageConverter",
        "config": {"name": "res_net_image_converter", "image_size": [224, 224],
                   "scale": scale if scale is not None else [1 / 255 / s for s in STD],
                   "offset": offset if offset is not None else [
                       -m / s for m, s in zip(MEAN, STD)],
                   "interpolation": "bilinear", "crop_to_aspect_ratio": True}}
    metadata = {"keras_version": keras.__version__,
                "keras_hub_version": keras_hub.__version__,
                "parameter_count": 0, "tasks": ["ImageClassifier"]}
    for name, content in (("config.json", backbone), ("image_converter.json", converter),
                          ("metadata.json", metadata)):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f)
    return str(directory)


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """A small ResNet (basic blocks, 2-2-2-2) preset: fast to build."""
    return _write_preset(tmp_path_factory.mktemp("r18"), blocks=(2, 2, 2, 2),
                         block_type="basic_block")


def test_resnet101_preset_at_448(tmp_path):
    preset = _write_preset(tmp_path / "resnet_101", blocks=(3, 4, 23, 3))
    backbone = khb.build(f"keras_hub:{preset}", image_size=448, weights="random")
    model = backbone.model
    assert model.name == "backbone" and model.count_params() == RESNET_101_PARAMS
    assert model.output.shape == (None, 14, 14, 2048)
    assert (backbone.stride, backbone.feature_dim) == (32, 2048)
    # f_conv on top of it adds exactly D x C + C weights (C = 80).
    f_conv = keras.layers.Conv2D(80, 1)
    f_conv.build(model.output.shape)
    assert f_conv.count_params() == 2048 * 80 + 80
    # A real forward pass at a small input size: (B, S/32, S/32, 2048), finite.
    small = khb.build(f"keras_hub:{preset}", image_size=64, weights="random").model
    out = small(np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype("float32"))
    assert out.shape == (2, 2, 2, 2048) and np.isfinite(out.numpy()).all()


def test_normalization_spec_is_the_presets_converter(resnet18):
    spec = khb.build(f"keras_hub:{resnet18}", 64, weights="random").normalization
    assert spec["reverse_channels"] is False
    np.testing.assert_allclose(spec["scale"], [1 / 255 / s for s in STD])
    np.testing.assert_allclose(spec["offset"], [-m / s for m, s in zip(MEAN, STD)])
    # The spec reproduces KerasHub's own converter on RGB pixels in [0, 255].
    converter = keras_hub.layers.ImageConverter.from_preset(resnet18)
    converter.image_size = None  # no resize: compare the normalisation alone
    x = np.random.default_rng(1).uniform(0, 255, (2, 5, 7, 3)).astype("float32")
    expected = np.asarray(converter(x))
    np.testing.assert_allclose(x * np.array(spec["scale"]) + np.array(spec["offset"]),
                               expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(expected[..., 0], (x[..., 0] / 255 - MEAN[0]) / STD[0],
                               rtol=1e-4, atol=1e-4)


def test_scalar_and_missing_scale_offset(tmp_path):
    preset = _write_preset(tmp_path / "p", blocks=(1, 1, 1, 1), block_type="basic_block",
                           scale=1 / 127.5, offset=-1.0)
    assert khb.normalization(preset) == {"scale": (1 / 127.5,) * 3, "offset": (-1.0,) * 3,
                                         "reverse_channels": False}
    os.remove(os.path.join(preset, "image_converter.json"))
    with pytest.raises(ValueError, match="has no image converter"):
        khb.normalization(preset)


def test_checkpoint_and_weights_file_round_trip(resnet18, tmp_path):
    name = f"keras_hub:{resnet18}"
    first = khb.build(name, 64, weights="random").model
    images = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype("float32")
    expected = first(images, training=False).numpy()
    # tf.train.Checkpoint (what training saves): restore into a fresh random build.
    path = tf.train.Checkpoint(backbone=first).write(str(tmp_path / "ckpt"))
    second = khb.build(name, 64, weights=None).model
    assert not np.allclose(second(images, training=False).numpy(), expected)
    tf.train.Checkpoint(backbone=second).read(path).assert_consumed()
    np.testing.assert_allclose(second(images, training=False).numpy(), expected,
                               rtol=1e-5, atol=1e-5)
    # --backbone_weights=<file>: the preset's architecture, then the file.
    weights = str(tmp_path / "backbone.weights.h5")
    first.save_weights(weights)
    third = khb.build(name, 64, weights=weights).model
    np.testing.assert_allclose(third(images, training=False).numpy(), expected,
                               rtol=1e-5, atol=1e-5)


def test_names_and_errors(resnet18, tmp_path, monkeypatch):
    assert khb.is_keras_hub("keras_hub:resnet_101_imagenet")
    assert not khb.is_keras_hub("resnet101")
    assert khb.preset_of("keras_hub:hf://timm/resnet101.a1h_in1k") == (
        "hf://timm/resnet101.a1h_in1k")
    for bad in ("keras_hub:", "keras_hub:  ", "resnet101"):
        with pytest.raises(ValueError, match="write keras_hub:<preset>"):
            khb.preset_of(bad)
    with pytest.raises(ValueError, match="no such file"):
        khb.build(f"keras_hub:{resnet18}", 64, weights=str(tmp_path / "nope.weights.h5"))
    with pytest.raises(ValueError, match="cannot be loaded as a backbone"):
        khb.build(f"keras_hub:{tmp_path}", 64, weights="random")  # no config.json
    with pytest.raises(ValueError, match="below the stride 32"):
        khb.build(f"keras_hub:{resnet18}", 16, weights="random")
    monkeypatch.setattr(khb, "keras_hub", None)
    with pytest.raises(ImportError, match="pip install --no-deps 'keras-hub"):
        khb.build("keras_hub:resnet_101_imagenet", 448)


def test_saved_model_export_of_the_backbone(resnet18, tmp_path):
    """The backbone exports and reloads like the rest of the inference model."""
    model = khb.build(f"keras_hub:{resnet18}", 64, weights="random").model
    images = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype("float32")
    expected = model(images, training=False).numpy()
    module = tf.Module()
    module.model = model
    module.serve = tf.function(lambda x: module.model(x, training=False),
                               input_signature=[tf.TensorSpec([None, 64, 64, 3], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "export"))
    reloaded = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(reloaded.serve(images).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_the_model_with_a_keras_hub_backbone_trains_exports_and_adds_d_times_c_plus_c(
        tmp_path):
    """End to end through MLCRLModel: the model normalises with the preset's
    converter, f_conv adds D x C + C weights to the inference branch, a real
    training step runs, and an export reloads with the live model's logits."""
    preset = _write_preset(str(tmp_path / "tiny"), blocks=(1, 1, 1, 1),
                           filters=(64, 16, 16, 16), block_type="basic_block")
    name = f"keras_hub:{preset}"
    baseline = model_lib.build_model(5, name, 64, "baseline", backbone_weights="random")
    crl = model_lib.build_model(5, name, 64, "crl", backbone_weights="random")
    d = crl.backbone.output_shape[-1]
    extra = crl.inference_model.count_params() - baseline.inference_model.count_params()
    assert extra == d * 5 + 5
    spec = backbones.normalization_spec(name)
    np.testing.assert_allclose(np.array(spec["divisor"]), 255.0 * np.array(STD), rtol=1e-6)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    labels = (rng.random((4, 5)) < 0.4).astype(np.float32)
    crl.compile(optimizer=optim.make_optimizer(crl, 0.01, 0.001))
    before = crl.f_conv.kernel.numpy().copy()
    crl.train_step((images, labels))
    assert not np.allclose(before, crl.f_conv.kernel.numpy())
    path = export_lib.export_model(crl, str(tmp_path / "export"), list("abcde"))
    served = tf.saved_model.load(path).signatures["serve_tensor"](images=tf.constant(images))
    np.testing.assert_allclose(served["logits"].numpy(),
                               crl.inference_model(images).numpy(), rtol=1e-4, atol=1e-4)


def test_the_model_reads_the_preset_once(resnet18, monkeypatch):
    """Failed before: building the model loaded the preset's image converter
    twice (once for the normalisation layer, once inside the backbone)."""
    loads = []
    real = keras_hub.layers.ImageConverter.from_preset

    def counting(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(keras_hub.layers.ImageConverter, "from_preset", counting)
    model = model_lib.build_model(5, f"keras_hub:{resnet18}", 64, "baseline",
                                  backbone_weights="random")
    assert len(loads) == 1
    np.testing.assert_allclose(model.input_normalization.divisor,
                               255.0 * np.array(STD), rtol=1e-6)


def test_a_missing_keras_hub_is_also_a_value_error(monkeypatch):
    """Every CLI reports a ValueError as one `error:` line."""
    monkeypatch.setattr(khb, "keras_hub", None)
    with pytest.raises(ValueError, match=r"needed by --backbone=keras_hub:x\): pip install"):
        backbones.check_backbone_available("keras_hub:x")
    backbones.check_backbone_available("small_cnn")

"""Tests for mlcrl_tf.model: shapes, the inference branch, the D×C + C claim,
and which weights a real gradient step moves."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from mlcrl_tf import backbones, losses
from mlcrl_tf.model import (VARIANTS, FusedPooling, ImageProjector, LabelProjector,
                            MLCRLModel, build_model)
from pipelines import fashion_mnist

NUM_CLASSES = 10  # Fashion-MNIST classes


@pytest.fixture(scope="module")
def real_batch():
    """8 real 64×64 canvases of two Fashion-MNIST items each, multi-hot labels."""
    images, labels = fashion_mnist.load_fashion_mnist("test")
    rng = np.random.default_rng(0)
    canvases = np.zeros((8, 64, 64, 3), np.float32)
    multi_hot = np.zeros((8, NUM_CLASSES), np.float32)
    for b in range(8):
        for slot, idx in enumerate(rng.choice(len(images), 2, replace=False)):
            y, x = rng.integers(0, 36, size=2)
            canvases[b, y:y + 28, x:x + 28, slot] = np.maximum(
                canvases[b, y:y + 28, x:x + 28, slot], images[idx])
            multi_hot[b, labels[idx]] = 1.0
    return backbones.normalize_images(canvases, "small_cnn").numpy(), multi_hot


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes_small_cnn(variant):
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant=variant)
    out = model(np.zeros((3, 64, 64, 3), np.float32), training=False)
    assert out["logits"].shape == (3, NUM_CLASSES)
    assert out["logits"].dtype == tf.float32
    if variant in ("mse", "crl"):
        assert out["image_embeddings"].shape == (3, NUM_CLASSES)
        assert out["label_embeddings"].shape == (NUM_CLASSES, NUM_CLASSES)
    else:
        assert set(out) == {"logits"}
    inference = model.inference_model(np.zeros((3, 64, 64, 3), np.float32))
    np.testing.assert_allclose(inference, out["logits"], atol=1e-6)


@pytest.mark.parametrize("backbone, layer, shape", [
    ("vgg16", "block5_conv3", (28, 28, 512)),       # paper §3.1: pool5 removed
    ("resnet101", "conv5_block3_out", (14, 14, 2048)),
])
def test_feature_map_is_the_papers_layer_at_448(backbone, layer, shape):
    """Fx is the last convolution's map, not a pooled one (stride 16 for VGG)."""
    net = backbones.build_backbone(backbone, 448)
    assert net.output_shape == (None, *shape)
    assert net.layers[-1].name == layer
    assert 448 // backbones.feature_stride(backbone) == shape[0]
    assert backbones.feature_dim(backbone) == shape[2]


@pytest.mark.parametrize("backbone", ["resnet101", "resnet50", "vgg16", "small_cnn"])
def test_inference_adds_exactly_d_times_c_plus_c(backbone):
    """The paper's efficiency claim: crl's test-time model = baseline + f_conv."""
    num_classes = 20
    baseline = build_model(num_classes, backbone=backbone, image_size=64, variant="baseline")
    crl = build_model(num_classes, backbone=backbone, image_size=64, variant="crl")
    d = backbones.feature_dim(backbone)
    extra = crl.inference_model.count_params() - baseline.inference_model.count_params()
    assert extra == d * num_classes + num_classes
    out = crl(np.zeros((1, 64, 64, 3), np.float32))
    assert out["logits"].shape == (1, num_classes)
    # The backbone's feature map has the documented depth and stride.
    assert crl.backbone.output_shape == (None, 64 // backbones.feature_stride(backbone),
                                         64 // backbones.feature_stride(backbone), d)


@pytest.mark.parametrize("variant", ["mse", "crl"])
def test_inference_model_has_no_co_projector_variables(variant):
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant=variant)
    inference_ids = {id(v) for v in model.inference_model.variables}
    projector = model.co_projector_variables
    assert projector, "the training model must own the co-projector"
    assert not inference_ids & {id(v) for v in projector}
    assert not [v.path for v in model.inference_model.variables if "projector" in v.path]
    # ...while the training model does hold them.
    assert {id(v) for v in projector} <= {id(v) for v in model.variables}


def test_variable_groups_partition_trainable_variables():
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant="crl")
    backbone_ids = {id(v) for v in model.backbone_variables}
    head_ids = {id(v) for v in model.head_variables}
    assert backbone_ids and head_ids and not backbone_ids & head_ids
    assert backbone_ids | head_ids == {id(v) for v in model.trainable_variables}
    assert all("projector" not in v.path for v in model.backbone_variables)


def _sgd_step(model, images, labels, aux):
    """One SGD step on soft margin (+ the variant's auxiliary loss if aux)."""
    with tf.GradientTape() as tape:
        out = model(images, training=True)
        loss = losses.multilabel_soft_margin_loss(labels, out["logits"])
        if aux and model.variant == "crl":
            loss += losses.constrained_ranking_loss(
                labels, out["image_embeddings"], out["label_embeddings"])
        elif aux and model.variant == "mse":
            loss += losses.embedding_mse_loss(
                out["image_embeddings"], model.label_projector(labels))
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    keras.optimizers.SGD(0.1).apply_gradients(
        [(g, v) for g, v in zip(grads, variables) if g is not None])
    return grads


@pytest.mark.parametrize("variant", ["mse", "crl"])
def test_real_step_moves_co_projector(variant, real_batch):
    images, labels = real_batch
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant=variant)
    model(images)  # build
    trainable_projector = [v for v in model.co_projector_variables if v.trainable]
    before = [v.numpy().copy() for v in trainable_projector]
    _sgd_step(model, images, labels, aux=True)
    for v, old in zip(trainable_projector, before):
        assert not np.allclose(v.numpy(), old), f"{v.path} did not move"


@pytest.mark.parametrize("variant", ["baseline", "tba", "tbc"])
def test_classification_only_variants_have_no_co_projector(variant, real_batch):
    images, labels = real_batch
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant=variant)
    assert model.co_projector_variables == []
    assert not [v.path for v in model.variables if "projector" in v.path]
    before = model.classifier.kernel.numpy().copy()
    grads = _sgd_step(model, images, labels, aux=True)
    assert all(g is not None for g in grads)
    assert not np.allclose(model.classifier.kernel.numpy(), before)


def test_classification_loss_alone_never_reaches_the_co_projector(real_batch):
    """The co-projector does not feed the logits: only the CRL trains it."""
    images, labels = real_batch
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant="crl")
    model(images)
    # (BN moving statistics change in any training-mode forward pass; the
    # weights that a loss trains are the trainable ones.)
    trainable_projector = [v for v in model.co_projector_variables if v.trainable]
    before = [v.numpy().copy() for v in trainable_projector]
    grads = _sgd_step(model, images, labels, aux=False)
    projector_ids = {id(v) for v in trainable_projector}
    for g, v in zip(grads, model.trainable_variables):
        if id(v) in projector_ids:
            assert g is None
    for v, old in zip(trainable_projector, before):
        np.testing.assert_array_equal(v.numpy(), old)


def test_layers_serialize():
    for layer in (FusedPooling(), ImageProjector(12), LabelProjector(12)):
        config = layer.get_config()
        clone = layer.__class__.from_config(config)
        assert clone.get_config() == config
    # The projectors' widths follow Tables 3 and 4 (C/4 and C/2, C/4, C/2, C).
    projector = LabelProjector(80)
    projector.build((None, 80))
    assert [d.units for d in projector.dense_layers] == [40, 20, 40, 80]
    image_projector = ImageProjector(80)
    assert image_projector(np.zeros((2, 14, 14, 80), np.float32)).shape == (2, 80)
    assert image_projector.conv2.filters == 20 and image_projector.conv1.strides == (2, 2)


def test_model_config_round_trip():
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant="tbc")
    clone = MLCRLModel.from_config(model.get_config())
    assert clone.variant == "tbc" and clone.num_classes == NUM_CLASSES
    assert clone.count_params() == model.count_params()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert isinstance(restored, MLCRLModel) and restored.image_size == 64


def test_feature_model_for_cam():
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant="crl")
    out = model.feature_model()(np.zeros((2, 64, 64, 3), np.float32))
    assert out["features"].shape == (2, 8, 8, 256)
    assert out["class_maps"].shape == (2, 8, 8, NUM_CLASSES)
    assert out["logits"].shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("kwargs, name", [
    ({"backbone": "resnet152"}, "backbone"),
    ({"variant": "gcn"}, "variant"),
    ({"num_classes": 1}, "num_classes"),
    ({"num_classes": 2.5}, "num_classes"),
    ({"image_size": 4}, "image_size"),
    ({"backbone_weights": "/nonexistent/weights.h5"}, "backbone_weights"),
    ({"backbone_weights": "imagenet"}, "backbone_weights"),  # small_cnn has none
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"num_classes": NUM_CLASSES, "backbone": "small_cnn", "image_size": 64,
            "variant": "crl", **kwargs}
    with pytest.raises(ValueError, match=name):
        build_model(**args)


def test_local_backbone_weights_file_is_loaded(tmp_path):
    source = backbones.build_backbone("small_cnn", 64)
    path = str(tmp_path / "small_cnn.weights.h5")
    source.save_weights(path)
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64,
                        backbone_weights=path)
    for a, b in zip(source.weights, model.backbone.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("variant", ["baseline", "crl"])
def test_checkpoint_round_trip_restores_every_variable(variant, tmp_path):
    """tf.train.Checkpoint (what training saves) must reach every layer."""
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=32, variant=variant)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    clone = build_model(NUM_CLASSES, backbone="small_cnn", image_size=32, variant=variant)
    tf.train.Checkpoint(model=clone).restore(path).assert_existing_objects_matched()
    assert len(clone.variables) == len(model.variables)
    for a, b in zip(model.variables, clone.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)

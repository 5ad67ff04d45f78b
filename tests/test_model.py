"""Tests for mlcrl_tf.model: shapes, the inference branch, the D×C + C claim,
and which weights a real gradient step moves."""

import json
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.modeling import backbones
from mlcrl_tf.modeling import objective as objective_lib
from mlcrl_tf.modeling import optim
from mlcrl_tf.modeling.heads import FusedPooling
from mlcrl_tf.modeling.heads import ImageProjector
from mlcrl_tf.modeling.heads import LabelProjector
from mlcrl_tf.modeling.model import VARIANTS
from mlcrl_tf.modeling.model import MLCRLModel
from mlcrl_tf.modeling.model import build_model
from pipelines.demo import fashion_mnist

from helpers import reference_crl
from helpers import reference_mse_per_example
from helpers import reference_soft_margin_per_example

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
    return canvases, multi_hot  # RGB in [0, 255]: the model normalises


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes_small_cnn(variant):
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant=variant)
    out = model(np.zeros((3, 64, 64, 3), np.float32), training=False)
    assert out["logits"].shape == (3, NUM_CLASSES)
    assert out["logits"].dtype == tf.float32
    if variant in ("mse", "crl"):
        assert set(out) == {"logits", "image_embeddings"}
        assert out["image_embeddings"].shape == (3, NUM_CLASSES)
        assert model.label_embeddings().shape == (NUM_CLASSES, NUM_CLASSES)
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
    """One SGD step on the model's own objective (the one training uses);
    aux=False keeps only its classification term."""
    with tf.GradientTape() as tape:
        terms = model.loss_terms(model(images, training=True), labels)
        loss = terms["loss"] if aux else terms["classification"]
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    keras.optimizers.SGD(0.1).apply_gradients(
        [(g, v) for g, v in zip(grads, variables) if g is not None])
    return grads


@pytest.mark.parametrize("variant", VARIANTS)
def test_objective_of_every_variant_matches_the_numpy_reference(variant, real_batch):
    """model.loss_terms (what fit() and the CLI loop optimise) = Eq. 10 by loops,
    with non-default alpha, beta, margin and lambdas."""
    images, labels = real_batch
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant=variant)
    objective = objective_lib.Objective(cls_weight=0.7, aux_weight=1.3, margin=0.4,
                                 image_weight=0.6, label_weight=0.2)
    model.compile(optimizer=optim.PaperSGD(0.01), objective=objective)
    out = model(images, training=True)
    terms = {k: float(v) for k, v in model.loss_terms(out, labels).items()}
    cls = float(np.mean(reference_soft_margin_per_example(labels, out["logits"].numpy())))
    aux = 0.0
    if variant == "crl":
        aux = reference_crl(labels, out["image_embeddings"].numpy(),
                            model.label_embeddings().numpy(), margin=0.4,
                            image_weight=0.6, label_weight=0.2)
        expected_keys = {"loss", "classification", "crl", "crl_image_term", "crl_label_term"}
        assert terms["crl"] == pytest.approx(aux, rel=1e-5)
    elif variant == "mse":
        projected = model.label_projector(labels).numpy()
        aux = float(np.mean(reference_mse_per_example(out["image_embeddings"].numpy(),
                                                      projected)))
        expected_keys = {"loss", "classification", "mse"}
        assert terms["mse"] == pytest.approx(aux, rel=1e-5)
    else:
        expected_keys = {"loss", "classification"}
    assert set(terms) == expected_keys
    assert terms["classification"] == pytest.approx(cls, rel=1e-5)
    assert terms["loss"] == pytest.approx(0.7 * cls + 1.3 * aux, rel=1e-5)
    assert float(model.compute_loss(images, labels, out)) == pytest.approx(terms["loss"], rel=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_and_inference_logits_agree_on_real_images_after_training(
        variant, real_batch):
    """The inference branch computes the training model's logits (BN in inference
    mode), on real canvases after a few real training steps of the objective."""
    images, labels = real_batch
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant=variant)
    model.compile(optimizer=optim.make_optimizer(model, 0.05, 0.05, weight_decay=1e-4))
    for _ in range(3):
        model.train_step((images, labels))
    training_path = model(images, training=False)["logits"].numpy()
    inference_path = model.inference_model(images, training=False).numpy()
    assert training_path.std() > 0.05, "degenerate logits cannot tell the paths apart"
    assert len(np.unique(np.round(training_path, 4))) > NUM_CLASSES
    np.testing.assert_allclose(inference_path, training_path, rtol=1e-5, atol=1e-5)


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


# --------------------------------------------------------------------------
# The model owns its input normalisation.
# --------------------------------------------------------------------------

def test_input_normalization_is_bit_identical_to_the_old_formulas():
    """small_cnn: x / 127.5 - 1; caffe: RGB->BGR minus the ImageNet BGR mean."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 5, 7, 3)).astype(np.float32)
    small = backbones.input_normalization("small_cnn")(x).numpy()
    np.testing.assert_array_equal(small, x / np.float32(127.5) - np.float32(1.0))
    caffe = backbones.input_normalization("resnet101")(x).numpy()
    mean = np.array([103.939, 116.779, 123.68], np.float32)
    np.testing.assert_array_equal(caffe, x[..., ::-1] - mean)
    assert not backbones.input_normalization("vgg16").weights


def test_model_normalises_raw_pixels_itself(real_batch):
    images, _ = real_batch
    model = build_model(NUM_CLASSES, backbone="small_cnn", image_size=64, variant="crl")
    by_hand = model.classifier(model.fused_pool(model.backbone(
        backbones.normalize_images(images, "small_cnn"), training=False)))
    fconv = model.f_conv(model.backbone(backbones.normalize_images(images, "small_cnn"),
                                        training=False))
    expected = by_hand + keras.ops.max(fconv, axis=(1, 2))
    np.testing.assert_allclose(model.inference_model(images), expected, rtol=1e-5, atol=1e-5)
    assert model.inference_model.layers[1].name == "input_normalization"


def test_normalization_runs_in_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = backbones.input_normalization("small_cnn")
        out = layer(np.full((1, 2, 2, 3), 200.0, np.float32))
        assert out.dtype == tf.float32 and layer.compute_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")
    config = layer.get_config()
    clone = backbones.InputNormalization.from_config(config)
    assert clone.divisor == (127.5,) * 3 and clone.offset == (-1.0,) * 3


@pytest.mark.parametrize("variant", ["crl", "baseline"])
def test_checkpoints_of_earlier_versions_still_restore(variant, tmp_path):
    """Same checkpoint keys and shapes as version 0.1 (before the model owned
    its normalisation): old checkpoints restore into the new model."""
    fixture = pathlib.Path(__file__).parent / "fixtures" / "checkpoint_keys_0.1.json"
    expected = {key: shape for key, shape in json.loads(fixture.read_text())[variant]}
    model = build_model(5, backbone="small_cnn", image_size=32, variant=variant)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    got = {key: list(shape) for key, shape in tf.train.list_variables(path)
           if key.startswith("model/")}
    assert got == expected


# --------------------------------------------------------------------------
# Keras compile/fit and serialization.
# --------------------------------------------------------------------------

def _small_compiled(**compile_kwargs):
    model = build_model(4, backbone="small_cnn", image_size=32, variant="crl")
    model.compile(optimizer=optim.make_optimizer(model, 0.01, 0.001), **compile_kwargs)
    return model


def test_compile_refuses_a_keras_loss_as_the_objective():
    """Failed before: compile(optimizer, "bce") took "bce" as the objective
    and training failed deep inside (AttributeError in a traced step)."""
    model = build_model(4, backbone="small_cnn", image_size=32, variant="crl")
    optimizer = optim.make_optimizer(model, 0.01, 0.001)
    with pytest.raises(ValueError, match="objective must be a mlcrl_tf Objective.*'bce'"):
        model.compile(optimizer, "bce")
    with pytest.raises(ValueError, match="not loss="):
        model.compile(optimizer, loss="bce")
    model.compile(optimizer, objective_lib.Objective(margin=0.3))  # positional objective: fine
    assert model.objective.margin == 0.3


def test_sample_weights_are_refused_not_dropped():
    """Failed before: fit() with sample weights trained as if there were none."""
    model = _small_compiled()
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    labels = (rng.random((4, 4)) < 0.5).astype(np.float32)
    with pytest.raises(ValueError, match="does not support sample weights"):
        model.fit(images, labels, sample_weight=np.ones(4, np.float32), epochs=1,
                  batch_size=4, verbose=0)
    with pytest.raises(ValueError, match="does not support sample weights"):
        model.train_step((images, labels, np.ones(4, np.float32)))
    with pytest.raises(ValueError, match="no labels"):
        model.train_step((images,))
    model.train_step((images, labels, None))  # Keras' spelling of "no weights"


def test_from_config_does_not_reload_the_backbone_weights(tmp_path):
    """Failed before: from_config rebuilt with backbone_weights, so a model
    whose weights file is gone (or 'imagenet' offline) could not be loaded."""
    path = str(tmp_path / "small_cnn.weights.h5")
    backbones.build_backbone("small_cnn", 32).save_weights(path)
    model = build_model(4, backbone="small_cnn", image_size=32, backbone_weights=path)
    config = model.get_config()
    assert config["backbone_weights"] == path  # recorded
    saved = str(tmp_path / "model.keras")
    model.save(saved)
    pathlib.Path(path).unlink()
    clone = MLCRLModel.from_config(config)
    assert clone.backbone_weights is None and clone.count_params() == model.count_params()
    loaded = keras.saving.load_model(saved)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_saved_model_loads_compiled_with_its_objective_and_two_rates(tmp_path):
    """Failed before: the objective was not in the compile config (the model
    loaded uncompiled, with a warning) and PaperSGD's multipliers were lost."""
    model = _small_compiled(objective=objective_lib.Objective(margin=0.25, reduction="sum"))
    assert "objective" in model.get_compile_config()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.objective.get_config() == model.objective.get_config()
    inner = optim.inner_optimizer(loaded.optimizer)
    assert isinstance(inner, optim.PaperSGD)
    assert [inner.learning_rate_multiplier(v) for v in loaded.backbone_variables] == [
        pytest.approx(0.1)] * len(loaded.backbone_variables)
    assert {inner.learning_rate_multiplier(v) for v in loaded.head_variables} == {1.0}


def test_random_weights_spellings_work_for_every_backbone():
    """Failed before: "random" was a KerasHub-only spelling ("no such file")."""
    for spelling in backbones.RANDOM_WEIGHTS:
        model = build_model(4, backbone="small_cnn", image_size=32,
                            backbone_weights=spelling)
        assert model.backbone.name == "backbone"


@pytest.mark.parametrize("variant", VARIANTS)
def test_variables_come_in_release_0_1s_order(variant):
    """A checkpoint stores optimizer slots and EMA shadows by position: a 0.1
    run resumes correctly only if the variables come in 0.1's order (the
    fixture was written by 0.1's code, small CNN, C = 5, 32 px)."""
    fixture = pathlib.Path(__file__).parent / "fixtures" / "variable_order_0.1.json"
    expected = json.loads(fixture.read_text())[variant]
    model = build_model(5, backbone="small_cnn", image_size=32, variant=variant)
    assert [v.path for v in model.trainable_variables] == expected["trainable"]
    assert [v.path for v in model.variables] == expected["all"]

"""modeling/batch_norm: the fused training kernel gives Keras' numbers."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.modeling import batch_norm
from mlcrl_tf.modeling import model as model_lib
from tests import helpers


def _layer(shape, fused, **kwargs):
    layer = keras.layers.BatchNormalization(**kwargs)
    layer.build(shape)
    rng = np.random.default_rng(3)
    for variable in layer.weights:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))
    if fused:
        assert batch_norm.use_fused_training_kernels(keras.Sequential([layer])) == 1
    return layer


def _training_call(layer, x, upstream):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        total = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    weights = [w for w in (layer.gamma, layer.beta) if w is not None]
    return [y] + tape.gradient(total, [x] + weights) + [layer.moving_mean, layer.moving_variance]


def _reference_moving_statistics(x, mean0, var0, momentum):
    """NumPy loops: Keras' update with the biased batch variance."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mean = np.array([sum(rows[:, c]) / len(rows) for c in range(rows.shape[1])])
    var = np.array([sum((rows[:, c] - mean[c]) ** 2) / len(rows) for c in range(rows.shape[1])])
    return mean0 * momentum + mean * (1 - momentum), var0 * momentum + var * (1 - momentum)


@pytest.mark.parametrize("kwargs", [{}, {"center": False}, {"scale": False},
                                    {"momentum": 0.9, "epsilon": 1e-3}])
def test_the_fused_training_call_equals_keras(kwargs):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(2.0, 3.0, (4, 5, 6, 7)).astype("float32"))
    upstream = tf.constant(rng.normal(size=(4, 5, 6, 7)).astype("float32"))
    keras_out = _training_call(_layer(x.shape, False, **kwargs), x, upstream)
    fused_layer = _layer(x.shape, True, **kwargs)
    mean0, var0 = fused_layer.moving_mean.numpy(), fused_layer.moving_variance.numpy()
    fused_out = _training_call(fused_layer, x, upstream)
    for a, b in zip(keras_out, fused_out):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=2e-5)
    mean, var = _reference_moving_statistics(x.numpy(), mean0, var0, fused_layer.momentum)
    np.testing.assert_allclose(fused_layer.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(fused_layer.moving_variance.numpy(), var, rtol=1e-5)


def test_inference_and_frozen_layers_run_keras_code():
    x = tf.constant(np.random.default_rng(1).normal(size=(2, 3, 3, 4)).astype("float32"))
    keras_layer, fused_layer = _layer(x.shape, False), _layer(x.shape, True)
    np.testing.assert_array_equal(fused_layer(x, training=False), keras_layer(x, training=False))
    fused_layer.trainable = keras_layer.trainable = False
    before = fused_layer.moving_mean.numpy()
    np.testing.assert_array_equal(fused_layer(x, training=True), keras_layer(x, training=True))
    np.testing.assert_array_equal(fused_layer.moving_mean.numpy(), before)


def _op_types(function, x):
    return {op.type for op in function.get_concrete_function(x).graph.get_operations()}


def test_xla_and_the_graph_it_runs():
    """A training call builds FusedBatchNormV3, except under XLA (a NaN loss on a
    random ResNet-50 there), where Keras' ops run."""
    x = tf.constant(np.ones((2, 3, 3, 4), np.float32))
    layer = _layer(x.shape, True)
    for jit, fused in ((False, True), (True, False)):
        types = _op_types(tf.function(lambda v: layer(v, training=True), jit_compile=jit), x)
        assert ("FusedBatchNormV3" in types) is fused, (jit, sorted(types))
    assert "FusedBatchNormV3" not in _op_types(tf.function(lambda v: layer(v, training=False)), x)


@pytest.mark.parametrize("kwargs", [{"renorm": True}, {"synchronized": True}, {"axis": 1},
                                    {"epsilon": 1e-6}])
def test_ineligible_layers_keep_keras_call(kwargs):
    layer = keras.layers.BatchNormalization(**kwargs)
    layer.build((2, 3, 3, 4))
    assert batch_norm.use_fused_training_kernels(keras.Sequential([layer])) == 0


def test_the_model_switches_its_backbone_and_keeps_its_keys():
    model = model_lib.build_model(5, backbone="resnet50", image_size=32)
    layers = [layer for layer in model._flatten_layers(include_self=False)  # noqa: SLF001
              if isinstance(layer, keras.layers.BatchNormalization)]
    fused = [layer for layer in layers if isinstance(layer.call, functools.partial)]
    assert len(fused) == 53 and all(not layer.synchronized for layer in fused)
    assert {layer.name for layer in layers} - {layer.name for layer in fused} == {"bn1", "bn2"}
    assert "call" not in model.backbone.get_layer("conv1_bn").get_config()


def _conv_net():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, -1)(inputs)
    for filters in (8, 16):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same")(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization(epsilon=1.001e-5)(x))
    outputs = keras.layers.Dense(helpers.FASHION_CLASSES)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_sgd_on_real_images_takes_the_same_steps():
    images, labels = helpers.fashion_canvases(16, 32, 32, seed=4)
    nets = []
    for fused in (False, True):
        keras.utils.set_random_seed(0)
        net = _conv_net()
        if fused:
            assert batch_norm.use_fused_training_kernels(net) == 2
        net.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                    keras.losses.BinaryCrossentropy(from_logits=True))
        history = net.fit(images.astype("float32"), labels, batch_size=8, epochs=3, verbose=0,
                          shuffle=False)
        nets.append((net, history.history["loss"]))
    (keras_net, keras_losses), (fused_net, fused_losses) = nets
    np.testing.assert_allclose(fused_losses, keras_losses, rtol=1e-4)
    for a, b in zip(keras_net.weights, fused_net.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-5)

"""BatchNormalization's training statistics in one TensorFlow kernel.

Keras 3's `BatchNormalization` computes a training batch's statistics with
separate ops (`moments`: a mean, a squared difference and a second mean, then
the normalisation's multiply and add), and autodiff differentiates each of
them: about a dozen passes over every activation of a ResNet per step.
TensorFlow's `FusedBatchNormV3` does the forward in one kernel and its
gradient (`FusedBatchNormGradV3`) in one more, as Keras 2 did (`fused=True`)
and PyTorch does. `use_fused_training_kernels(model)` gives every eligible
`BatchNormalization` layer of a model that kernel for its training call: the
layer, its variables, its config and its checkpoint keys stay Keras' own, and
the moving statistics get the same update as Keras' (the biased batch
variance: the kernel's Bessel-corrected one times (n - 1) / n).

Inference keeps Keras' path: the fused kernel was measured no faster there
(docs/design.md, "Precision, oneDNN and the CPU"), so an export's graph is
unchanged.

Eligible: TensorFlow backend, a 4-D channels-last input, no mask, no renorm,
not `synchronized`, epsilon at least the kernel's minimum 1.001e-5 (Keras'
ResNets use exactly that), and not inside an XLA compilation (`--jit_compile`):
there the fused kernel gave a NaN loss at the second step of a randomly
initialised ResNet-50, where Keras' path did not. Any other call runs Keras'
own code.
"""

import functools

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # XLA context: no public API

# FusedBatchNormV3 raises a smaller epsilon to this (tf.compat.v1.nn.fused_batch_norm).
_MIN_EPSILON = 1.001e-5


def use_fused_training_kernels(model):
    """Switches `model`'s eligible BatchNormalization layers (nested ones too)
    to the fused kernel in training; returns how many were switched."""
    if keras.backend.backend() != "tensorflow":
        return 0
    switched = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):  # noqa: SLF001
        if (isinstance(layer, keras.layers.BatchNormalization) and not layer.renorm
                and not layer.synchronized and layer.axis in (-1, 3)
                and layer.epsilon >= _MIN_EPSILON):
            layer.call = functools.partial(_call, layer, layer.call)
            switched += 1
    return switched


def _call(layer, keras_call, inputs, training=None, mask=None):
    """The layer's call: the fused kernel for a training batch, else Keras'."""
    if (not (training and layer.trainable) or mask is not None or len(inputs.shape) != 4
            or control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())):
        return keras_call(inputs, training=training, mask=mask)
    x = tf.cast(inputs, tf.float32)  # as Keras: the statistics in float32
    channels = x.shape[-1]
    gamma = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels])
    beta = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels])
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        x, gamma, beta, epsilon=layer.epsilon, data_format="NHWC", is_training=True)
    n = tf.cast(tf.size(x, out_type=tf.int64) // channels, tf.float32)
    variance = variance * ((n - 1.0) / tf.maximum(n, 1.0))  # Bessel's correction undone
    momentum = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(
        layer.moving_variance * momentum + variance * (1.0 - momentum))
    return tf.cast(y, layer.compute_dtype)

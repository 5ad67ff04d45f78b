"""The layers on top of the backbone: `fpool`, `f_im` and `f_l` (paper §3,
Tables 3-4; shapes fixed in docs/design.md, Model).
"""

import keras
from keras import layers
from keras import ops


def _reduced(num_classes, factor):
    """C / factor rounded down, at least 1 (Tables 3–4 for small C)."""
    return max(1, num_classes // factor)


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class FusedPooling(layers.Layer):
    """`fpool`: global average pool + global max pool, summed (keeps D dims).

    Max pooling finds small objects, average pooling large ones (paper §3.2).

    Example:
    >>> tuple(FusedPooling()(keras.ops.ones((2, 7, 7, 16))).shape)
    (2, 16)
    """

    def call(self, inputs):
        return ops.mean(inputs, axis=(1, 2)) + ops.max(inputs, axis=(1, 2))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class ImageProjector(layers.Layer):
    """`f_im` (paper Table 3 after `f_conv`, as fixed in docs/design.md, Model).

    conv 3×3 C stride 2 → BN → ReLU → conv 3×3 C/4 → BN → ReLU → conv 3×3 C →
    global max pool. Maps `Fconv` (B,h,w,C) to the image embedding Fe (B,C).

    Args:
        num_classes: C.

    Example:
    >>> tuple(ImageProjector(8)(keras.ops.ones((2, 14, 14, 8))).shape)
    (2, 8)
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        # === Layers ===
        c = num_classes
        self.conv1 = layers.Conv2D(c, 3, strides=2, padding="same", use_bias=False,
                                   name="conv1")
        self.bn1 = layers.BatchNormalization(synchronized=True, name="bn1")
        self.conv2 = layers.Conv2D(_reduced(c, 4), 3, padding="same", use_bias=False,
                                   name="conv2")
        self.bn2 = layers.BatchNormalization(synchronized=True, name="bn2")
        self.conv3 = layers.Conv2D(c, 3, padding="same", name="conv3")

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in (self.conv1, self.bn1, self.conv2, self.bn2, self.conv3):
            layer.build(shape)
            shape = layer.compute_output_shape(shape)

    def call(self, inputs, training=None):
        x = ops.relu(self.bn1(self.conv1(inputs), training=training))
        x = ops.relu(self.bn2(self.conv2(x), training=training))
        return ops.max(self.conv3(x), axis=(1, 2))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        # === Config ===
        return {**super().get_config(), "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class LabelProjector(layers.Layer):
    """`f_l` (paper Table 4): Dense C → C/2 → C/4 → C/2 → C, ReLU between.

    Applied to the C one-hot vectors (the identity) it gives one embedding
    per class; applied to an image's multi-hot vector it gives `f_l(y)` for
    the MSE ablation.

    Args:
        num_classes: C.

    Example:
    >>> tuple(LabelProjector(8)(keras.ops.eye(8)).shape)
    (8, 8)
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        # === Layers ===
        c = num_classes
        # Plain attributes, not a list: tf.train.Checkpoint tracks attributes
        # of Keras layers but not Python lists of layers.
        self.fc1 = layers.Dense(_reduced(c, 2), name="fc1")
        self.fc2 = layers.Dense(_reduced(c, 4), name="fc2")
        self.fc3 = layers.Dense(_reduced(c, 2), name="fc3")
        self.fc4 = layers.Dense(c, name="fc4")

    @property
    def dense_layers(self):
        return [self.fc1, self.fc2, self.fc3, self.fc4]

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.dense_layers:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)

    def call(self, inputs):
        x = inputs
        for layer in self.dense_layers[:-1]:
            x = ops.relu(layer(x))
        return self.dense_layers[-1](x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        # === Config ===
        return {**super().get_config(), "num_classes": self.num_classes}

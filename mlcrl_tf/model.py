"""The paper's model: backbone, direct head, `f_conv` and the co-projector.

Data flow (paper Eq. 1–5; docs/design.md, Model):

    images ─ f_cnn ─ Fx (B,h,w,D) ─┬─ fpool (GAP+GMP) ─ Dense(C) ─ direct ─┐
                                   │                                        (+)─ logits P
                                   └─ f_conv 1×1 ─ Fconv (B,h,w,C) ─ GMP ──┘
                                                        │      (training only)
                                                        └─ f_im ─ Fe (B,C) ─┐
                          one-hot labels I_C ─ f_l ─ E (C,C) ───────────────┴─ CRL

At inference only backbone + direct head + `f_conv` remain:
`model.inference_model` (images → final logits) holds exactly
D×C + C more weights than the baseline's.

Variants (docs/design.md, Model): `baseline` (direct head only), `tba` (adds the `f_conv`
context logits, classification loss only), `tbc` (concatenates GMP(Fconv)
to the pooled features before the Dense), `mse` and `crl` (the full
co-projector, trained with the MSE ablation loss or the constrained ranking
loss).
"""

import keras
from keras import layers, ops
import tensorflow as tf

from mlcrl_tf import backbones
from mlcrl_tf import losses

VARIANTS = ("baseline", "tba", "tbc", "mse", "crl")
# Variants whose training model carries the image and label projectors.
CO_PROJECTOR_VARIANTS = ("mse", "crl")
# Variants with the `f_conv` branch in their inference model.
F_CONV_VARIANTS = ("tba", "tbc", "mse", "crl")


def check_variant_name(variant):
    """Raises ValueError unless `variant` is one of `VARIANTS`."""
    if variant not in VARIANTS:
        raise ValueError(
            f"variant={variant!r} is unknown; choose one of {', '.join(VARIANTS)}.")


def _reduced(num_classes, factor):
    """C / factor rounded down, at least 1 (Tables 3–4 for small C)."""
    return max(1, num_classes // factor)


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class FusedPooling(layers.Layer):
    """`fpool`: global average pool + global max pool, summed (keeps D dims).

    Max pooling finds small objects, average pooling large ones (paper §3.2).

    Example:
    >>> FusedPooling()(keras.ops.ones((2, 7, 7, 16))).shape
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
    >>> ImageProjector(8)(keras.ops.ones((2, 14, 14, 8))).shape
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
    >>> LabelProjector(8)(keras.ops.eye(8)).shape
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


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class MLCRLModel(keras.Model):
    """The training model of one variant, with its inference branch.

    `model(images, training=...)` returns a dict:
      - `logits` (B,C): final logits P (Eq. 5), float32;
      - for `mse`/`crl` also `image_embeddings` Fe (B,C) and
        `label_embeddings` E = f_l(I_C) (C,C), float32.

    `model.inference_model` is a functional `keras.Model` images → logits
    sharing the same layers, with no co-projector weights; it is what gets
    exported. `model.label_projector(y)` projects multi-hot label vectors
    (the MSE ablation's target).

    Input contract: RGB pixels in [0, 255] (float or uint8), (B, S, S, 3).
    The model normalises them itself with its backbone's
    `backbones.InputNormalization` layer (float32, no variables), in the
    training model, the inference model and hence in every export.

    Training the Keras way: `model.compile(optimizer, objective=...)` then
    `model.fit(dataset)` trains the paper's objective (`losses.Objective`:
    soft margin + the variant's CRL or MSE) with the model's own
    `train_step`; the dataset yields `(images, labels)` pairs or the dicts
    of `pipelines.input_pipeline.make_dataset`. Use
    `mlcrl_tf.optim.make_optimizer(model, ...)` for the paper's SGD with
    its two learning rates. The CLI training loop calls the same
    `train_step`, so both optimise one definition of the objective. There
    are no per-image sample weights (`fit(sample_weight=...)`,
    `class_weight` and `(images, labels, weights)` data raise ValueError):
    the paper's objective has none.

    Saving: `get_config` holds the architecture (and `backbone_weights`, as
    a record; `from_config` builds a randomly initialised backbone, the
    saved weights fill it); the compile config holds the optimizer (with
    `PaperSGD`'s per-variable rate multipliers) and the objective, so
    `keras.saving.load_model` returns a model compiled as it was saved.

    Args:
        num_classes: C, number of labels.
        backbone: a name from `mlcrl_tf.backbones.BACKBONES` or
            `keras_hub:<preset>`.
        image_size: square input side in pixels.
        variant: a name from `VARIANTS`.
        backbone_weights: None, "imagenet" or a local weights file path.

    Example:
    >>> model = MLCRLModel(5, backbone="small_cnn", image_size=32)
    >>> out = model(keras.ops.zeros((2, 32, 32, 3)))
    >>> out["logits"].shape, out["image_embeddings"].shape, out["label_embeddings"].shape
    (TensorShape([2, 5]), TensorShape([2, 5]), TensorShape([5, 5]))
    """

    def __init__(self, num_classes, backbone="resnet101", image_size=448,
                 variant="crl", backbone_weights=None, **kwargs):
        _check_arguments(num_classes, backbone, image_size, variant)
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.backbone_name = backbone
        self.image_size = int(image_size)
        self.variant = variant
        self.backbone_weights = backbone_weights
        c = self.num_classes

        # === Layers ===
        backbone_model, normalization = backbones.build_backbone_and_normalization(
            backbone, image_size, backbone_weights)
        self.input_normalization = normalization
        self.backbone = backbone_model
        self.fused_pool = FusedPooling(name="fused_pool")
        self.classifier = layers.Dense(c, name="classifier")
        self.f_conv = (layers.Conv2D(c, 1, name="f_conv")
                       if variant in F_CONV_VARIANTS else None)
        self.image_projector = (ImageProjector(c, name="image_projector")
                                if variant in CO_PROJECTOR_VARIANTS else None)
        self.label_projector = (LabelProjector(c, name="label_projector")
                                if variant in CO_PROJECTOR_VARIANTS else None)

        # === Functional Model ===
        # The inference branch is built from the same layer objects, so it
        # always holds the trained weights.
        images = keras.Input((self.image_size, self.image_size, 3), name="images")
        features = self.backbone(self.input_normalization(images))
        fconv = self.f_conv(features) if self.f_conv is not None else None
        logits = self._head(features, fconv)
        self.inference_model = keras.Model(images, logits, name=f"{variant}_inference")
        self._feature_outputs = {"features": features, "logits": logits}
        if fconv is not None:
            self._feature_outputs["class_maps"] = fconv
        if self.image_projector is not None:
            self.image_projector.build(tuple(fconv.shape))
            self.label_projector.build((None, c))
        self._images_input = images
        self.built = True

    def _head(self, features, fconv):
        """Final logits from Fx and Fconv (None for baseline), float32."""
        pooled = self.fused_pool(features)
        if self.variant == "tbc":
            pooled = ops.concatenate([pooled, ops.max(fconv, axis=(1, 2))], axis=-1)
        logits = self.classifier(pooled)
        if self.variant in ("tba", "mse", "crl"):
            logits = logits + ops.max(fconv, axis=(1, 2))
        return ops.cast(logits, "float32")

    def call(self, images, training=None):
        features = self.backbone(self.input_normalization(images), training=training)
        fconv = self.f_conv(features) if self.f_conv is not None else None
        outputs = {"logits": self._head(features, fconv)}
        if self.image_projector is not None:
            embeddings = self.image_projector(fconv, training=training)
            outputs["image_embeddings"] = ops.cast(embeddings, "float32")
            outputs["label_embeddings"] = self.label_embeddings()
        return outputs

    # --- the objective (Keras training) ------------------------------------

    @property
    def aux_loss(self):
        """The variant's auxiliary loss: "crl", "mse" or None."""
        return self.variant if self.variant in CO_PROJECTOR_VARIANTS else None

    def compile(self, optimizer="rmsprop", objective=None, **kwargs):
        """Keras' compile, plus the objective (default: the paper's, Eq. 10).

        The second positional argument is the objective, not Keras' `loss`:
        `compile(optimizer, "bce")` is refused (the model trains its own
        objective). The objective is part of the compile config, so a model
        saved with `model.save(...)` loads compiled with it.

        Args:
            optimizer: a Keras optimizer, e.g. `optim.make_optimizer(model, ...)`.
            objective: a `losses.Objective`; None = the paper's weights.
            **kwargs: other `keras.Model.compile` arguments (not `loss`).

        Raises:
            ValueError: a `loss`, or an objective that is not a `losses.Objective`.
        """
        if kwargs.get("loss") is not None:
            raise ValueError("MLCRLModel trains its own objective: pass "
                             "objective=losses.Objective(...), not loss=.")
        if objective is not None and not isinstance(objective, losses.Objective):
            raise ValueError(
                f"objective must be a losses.Objective (or None for the paper's), got "
                f"{objective!r}: MLCRLModel trains its own objective, and compile's "
                "second argument is that objective, not a Keras loss.")
        super().compile(optimizer=optimizer, **kwargs)
        self.objective = objective if objective is not None else losses.Objective()
        self._compile_config.config.pop("loss", None)
        self._compile_config.config["objective"] = self.objective

    def compile_from_config(self, config):
        """Compiles from `get_compile_config()` (when `keras.saving.load_model`
        loads a saved model): optimizer, objective and Keras' other arguments."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def loss_terms(self, outputs, labels):
        """This replica's share of every loss term (see `losses.Objective`)."""
        objective = getattr(self, "objective", None) or losses.Objective()
        return objective.terms(labels, outputs, aux=self.aux_loss,
                               project_labels=self.label_projector)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        """The objective (Keras' hook): this replica's share of the total loss."""
        del x, training
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported: the ranking loss "
                             "couples the images of a batch.")
        return self.loss_terms(y_pred, y)["loss"]

    @staticmethod
    def _unpack(data):
        """(images, labels) from a pair or a `make_dataset` dict.

        Raises:
            ValueError: no labels, or per-image sample weights (a third
                element, or `fit(sample_weight=...)`/`class_weight=`).
        """
        if isinstance(data, dict):
            images, labels, weights = data["images"], data["labels"], None
        else:
            images, labels, weights = keras.utils.unpack_x_y_sample_weight(data)
        if labels is None:
            raise ValueError("MLCRLModel trains on (images, labels): the data gives "
                             "no labels.")
        if weights is not None:
            raise ValueError(
                "MLCRLModel does not support sample weights (a third element of the "
                "data, fit(sample_weight=...) or class_weight): the paper's objective "
                "has none, and the ranking loss couples the images of a batch.")
        return images, labels

    def train_step(self, data):
        """One SGD step on the objective; returns every term (global values).

        Runs in a replica context under `fit()` and under the CLI loop's
        `strategy.run`. The optimizer sums the replicas' gradients of their
        shares, i.e. applies the gradient of the global batch's objective.

        Args:
            data: `(images, labels)` or a `make_dataset` dict. Sample weights
                (`(images, labels, weights)`, `fit(sample_weight=...)`,
                `class_weight`) raise ValueError: the objective has none.
        """
        images, labels = self._unpack(data)
        with tf.GradientTape() as tape:
            outputs = self(images, training=True)
            terms = self.loss_terms(outputs, labels)
            loss = self.optimizer.scale_loss(terms["loss"])
        variables = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return _global_values(terms)

    def test_step(self, data):
        """The objective's terms on a batch without training (`model.evaluate`)."""
        images, labels = self._unpack(data)
        return _global_values(self.loss_terms(self(images, training=False), labels))

    def label_embeddings(self):
        """E = f_l(I_C): one embedding row per class, (C, C) float32."""
        if self.label_projector is None:
            raise ValueError(f"variant={self.variant!r} has no label projector.")
        eye = ops.eye(self.num_classes, dtype=self.label_projector.compute_dtype)
        return ops.cast(self.label_projector(eye), "float32")

    @property
    def backbone_variables(self):
        """Trainable variables of `f_cnn` (the paper's lr 0.001 group)."""
        return self.backbone.trainable_variables

    @property
    def head_variables(self):
        """Every other trainable variable (the paper's lr 0.01 group)."""
        backbone_ids = {id(v) for v in self.backbone.trainable_variables}
        return [v for v in self.trainable_variables if id(v) not in backbone_ids]

    @property
    def co_projector_variables(self):
        """Variables of `f_im` and `f_l` (training only; never exported)."""
        if self.image_projector is None:
            return []
        return self.image_projector.variables + self.label_projector.variables

    def feature_model(self):
        """images → {"features": Fx, "class_maps": Fconv, "logits": P}.

        For CAM pictures (paper Fig. 3); `class_maps` only for variants with
        `f_conv`.
        """
        return keras.Model(self._images_input, self._feature_outputs,
                           name=f"{self.variant}_features")

    def get_config(self):
        # === Config ===
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "backbone": self.backbone_name,
            "image_size": self.image_size,
            "variant": self.variant,
            "backbone_weights": self.backbone_weights,
        }

    @classmethod
    def from_config(cls, config):
        """The architecture of `config`, with a randomly initialised backbone.

        `backbone_weights` in the config records where training started
        ("imagenet", a file); it is not reloaded: the weights come from the
        saved model (`keras.saving.load_model`) or a checkpoint, and the
        file may be gone or the download impossible where the model loads.
        """
        return cls(**dict(config, backbone_weights=None))


def _global_values(terms):
    """Shares x replicas: Keras (and the CLI) then take the MEAN over replicas,
    which is the sum of the shares, i.e. the global batch's value."""
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    return {name: value * replicas for name, value in terms.items()}


def _check_arguments(num_classes, backbone, image_size, variant):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    backbones.check_backbone_name(backbone)
    check_variant_name(variant)
    if not isinstance(image_size, int) or isinstance(image_size, bool):
        raise ValueError(f"image_size must be an integer, got {image_size!r}.")
    if backbone not in backbones.BACKBONES:
        return  # KerasHub: keras_hub_backbones.build checks the size against its stride
    stride = backbones.feature_stride(backbone)
    if image_size < stride:
        raise ValueError(
            f"image_size must be an integer >= {stride} for backbone={backbone!r}, "
            f"got {image_size!r}.")


def build_model(num_classes, backbone="resnet101", image_size=448, variant="crl",
                backbone_weights=None):
    """Builds the training model of a variant; see `MLCRLModel`.

    Args:
        num_classes: C, number of labels.
        backbone: "resnet101" (paper), "resnet50", "vgg16", "small_cnn", or
            "keras_hub:<preset>" for a KerasHub image backbone (a preset
            name, `hf://` or `kaggle://` handle or a local preset directory;
            needs keras-hub: see `mlcrl_tf.keras_hub_backbones`).
        image_size: square input side (paper: 448).
        variant: "baseline", "tba", "tbc", "mse" or "crl" (paper).
        backbone_weights: None (random init; "", "none" and "random" too),
            "imagenet" (keras.applications' download; a KerasHub preset's
            own weights) or a local weights file.

    Returns:
        An `MLCRLModel`; `.inference_model` is images → final logits.

    Raises:
        ValueError: an unknown backbone or variant, bad num_classes or
            image_size, a missing weights file, or a KerasHub backbone
            without keras-hub installed (`KerasHubNotInstalledError`).
    """
    return MLCRLModel(num_classes, backbone=backbone, image_size=image_size,
                      variant=variant, backbone_weights=backbone_weights)

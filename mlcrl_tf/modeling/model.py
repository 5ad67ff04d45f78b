"""The paper's model (§3, Eq. 1-5): one functional Keras model per variant.

The graph is built once, in `MLCRLModel.__init__` (keras-hub's idiom); its
`inference_model` is the logits sub-graph that gets exported
(docs/design.md, Model).
"""

import keras
from keras import layers
from keras import ops
import tensorflow as tf

from mlcrl_tf.modeling import backbones
from mlcrl_tf.modeling import batch_norm
from mlcrl_tf.modeling import heads
from mlcrl_tf.modeling import objective as objective_lib

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


def _logits(variant, pooled, class_maps, classifier):
    """The final logits P of Eq. 5 from fpool(Fx) and Fconv (None for
    baseline), float32: the direct logits plus GMP(Fconv) (`tba`, `mse`,
    `crl`), or a Dense on [fpool(Fx), GMP(Fconv)] (`tbc`)."""
    context = (layers.GlobalMaxPooling2D(name="context_logits")(class_maps)
               if class_maps is not None else None)
    if variant == "tbc":
        pooled = layers.Concatenate(name="pooled_and_context")([pooled, context])
    logits = classifier(pooled)
    if variant in ("tba", "mse", "crl"):
        logits = layers.Add(name="final_logits")([logits, context])
    return ops.cast(logits, "float32")


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class MLCRLModel(keras.Model):
    """The training model of one variant: a functional Keras model.

    `model(images, training=...)` returns a dict: `logits` (B, C), the final
    logits P (Eq. 5), and for `mse`/`crl` `image_embeddings` Fe (B, C), both
    float32. The label embeddings E = f_l(I_C) do not depend on the image:
    `model.label_embeddings()` computes them (C, C) where the objective needs
    them. `model.inference_model` (images -> logits) is the sub-graph that
    gets exported: same layers, no co-projector weight.

    Inputs are RGB pixels in [0, 255] (B, S, S, 3); the model normalises them
    itself (`backbones.InputNormalization`, float32, no variables).
    `compile(optimizer, objective)` then `fit()` trains the paper's objective
    (`objective.Objective`) with the model's own `train_step`, the step the
    CLI loop runs too; `optim.make_optimizer(model, ...)` is the paper's SGD.

    Args:
        num_classes: C, number of labels (>= 2).
        backbone: a name of `backbones.BACKBONES` or `keras_hub:<preset>`.
        image_size: square input side S in pixels.
        variant: one of `VARIANTS`.
        backbone_weights: None (random), "imagenet" or a local weights file.

    Example:
    >>> model = MLCRLModel(5, backbone="small_cnn", image_size=32)
    >>> out = model(keras.ops.zeros((2, 32, 32, 3)))
    >>> out["logits"].shape, out["image_embeddings"].shape
    (TensorShape([2, 5]), TensorShape([2, 5]))
    >>> model.label_embeddings().shape
    TensorShape([5, 5])
    """

    def __init__(self, num_classes, backbone="resnet101", image_size=448,
                 variant="crl", backbone_weights=None, **kwargs):
        _check_arguments(num_classes, backbone, image_size, variant)
        c = int(num_classes)
        co_projector = variant in CO_PROJECTOR_VARIANTS

        # === Layers ===
        backbone_model, normalization = backbones.build_backbone_and_normalization(
            backbone, image_size, backbone_weights)
        fused_pool = heads.FusedPooling(name="fused_pool")
        classifier = layers.Dense(c, name="classifier")
        f_conv = layers.Conv2D(c, 1, name="f_conv") if variant in F_CONV_VARIANTS else None
        image_projector = heads.ImageProjector(c, name="image_projector") if co_projector else None
        label_projector = heads.LabelProjector(c, name="label_projector") if co_projector else None

        # === Functional Model ===
        images = keras.Input((image_size, image_size, 3), name="images")
        features = backbone_model(normalization(images))
        class_maps = f_conv(features) if f_conv is not None else None
        logits = _logits(variant, fused_pool(features), class_maps, classifier)
        outputs = {"logits": logits}
        if co_projector:
            outputs["image_embeddings"] = ops.cast(image_projector(class_maps), "float32")
        super().__init__(inputs=images, outputs=outputs, **kwargs)

        # === Config ===
        self.num_classes = c
        self.backbone_name = backbone
        self.image_size = int(image_size)
        self.variant = variant
        self.backbone_weights = backbone_weights
        # Attributes named as in release 0.1: they are the checkpoint keys.
        self.input_normalization = normalization
        self.backbone = backbone_model
        self.fused_pool = fused_pool
        self.classifier = classifier
        self.f_conv = f_conv
        self.image_projector = image_projector
        self.label_projector = label_projector
        if label_projector is not None:
            label_projector.build((None, c))  # applied to I_C, outside the graph
        _order_layers(self, [normalization, backbone_model, fused_pool, classifier, f_conv,
                             image_projector, label_projector])
        self.inference_model = keras.Model(images, logits, name=f"{variant}_inference")
        batch_norm.use_fused_training_kernels(self)  # the same numbers, ~1.1x faster steps
        self._feature_outputs = {"features": features, "logits": logits}
        if class_maps is not None:
            self._feature_outputs["class_maps"] = class_maps

    def _obj_type(self):
        # Saved like a subclassed model: `.keras` weights keep release 0.1's
        # attribute paths (backbone/, classifier/, ...), not layers/<name>.
        return "Layer"

    # --- the objective (Keras training) ------------------------------------

    @property
    def aux_loss(self):
        """The variant's auxiliary loss: "crl", "mse" or None."""
        return self.variant if self.variant in CO_PROJECTOR_VARIANTS else None

    def compile(self, optimizer="rmsprop", objective=None, **kwargs):
        """Keras' compile, plus the objective (default: the paper's, Eq. 10).

        The second positional argument is the objective, not a Keras `loss`
        (refused); it is part of the compile config, so `model.save` and
        `keras.saving.load_model` keep it.

        Args:
            optimizer: a Keras optimizer, e.g. `optim.make_optimizer(model, ...)`.
            objective: an `objective.Objective`; None = the paper's weights.
            **kwargs: other `keras.Model.compile` arguments (not `loss`).

        Raises:
            ValueError: a `loss`, or an objective that is not an `Objective`.
        """
        if kwargs.get("loss") is not None:
            raise ValueError("MLCRLModel trains its own objective: pass "
                             "objective=Objective(...), not loss=.")
        if objective is not None and not isinstance(objective, objective_lib.Objective):
            raise ValueError(
                f"objective must be a mlcrl_tf Objective (or None for the paper's), got "
                f"{objective!r}: MLCRLModel trains its own objective, and compile's "
                "second argument is that objective, not a Keras loss.")
        super().compile(optimizer=optimizer, **kwargs)
        self.objective = objective if objective is not None else objective_lib.Objective()
        self._compile_config.config.pop("loss", None)
        self._compile_config.config["objective"] = self.objective

    def compile_from_config(self, config):
        """Compiles from `get_compile_config()` (`keras.saving.load_model`)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if getattr(self, "optimizer", None) is not None:
            self.optimizer.build(self.trainable_variables)

    def loss_terms(self, outputs, labels):
        """This replica's share of every loss term (`objective.Objective.terms`)."""
        if self.label_projector is not None:
            outputs = dict(outputs, label_embeddings=self.label_embeddings())
        objective = getattr(self, "objective", None) or objective_lib.Objective()
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

    def train_step(self, data):
        """One SGD step on the objective; returns every term (global values).

        The step of `fit()` and of the CLI loop's `strategy.run`: the
        optimizer sums the replicas' gradients of their shares, i.e. applies
        the gradient of the global batch's objective.
        """
        images, labels = objective_lib.unpack_batch(data)
        with tf.GradientTape() as tape:
            terms = self.loss_terms(self(images, training=True), labels)
            loss = self.optimizer.scale_loss(terms["loss"])
        variables = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return objective_lib.global_values(terms)

    def test_step(self, data):
        """The objective's terms on a batch without training (`model.evaluate`)."""
        images, labels = objective_lib.unpack_batch(data)
        terms = self.loss_terms(self(images, training=False), labels)
        return objective_lib.global_values(terms)

    def label_embeddings(self):
        """E = f_l(I_C): one embedding row per class, (C, C) float32."""
        if self.label_projector is None:
            raise ValueError(f"variant={self.variant!r} has no label projector.")
        eye = ops.eye(self.num_classes, dtype=self.label_projector.compute_dtype)
        return ops.cast(self.label_projector(eye), "float32")

    # --- parameter groups and sub-models -------------------------------------

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
        """images -> {"features": Fx, "class_maps": Fconv, "logits": P}, for CAMs
        (paper Fig. 3); `class_maps` only for variants with `f_conv`."""
        return keras.Model(self.input, self._feature_outputs,
                           name=f"{self.variant}_features")

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_classes": self.num_classes,
            "backbone": self.backbone_name,
            "image_size": self.image_size,
            "variant": self.variant,
            "backbone_weights": self.backbone_weights,
        }

    @classmethod
    def from_config(cls, config):
        """The architecture of `config`, with a randomly initialised backbone:
        the weights come from the saved model or a checkpoint
        (`backbone_weights` only records where training started)."""
        config = dict(config, backbone_weights=None)
        config.pop("dtype", None)  # release 0.1 stored the (float32) policy
        return cls(**config)


def _order_layers(model, first):
    """Puts `first` (Nones skipped) at the head of the model's tracked layers.

    The variables then come in release 0.1's order, which optimizer slots and
    EMA shadows follow: a checkpoint stores them by position, so a run of
    0.1 resumes with each momentum buffer on its own variable.
    """
    first = [layer for layer in first if layer is not None]
    rest = [layer for layer in model._layers if all(layer is not f for f in first)]
    model._layers[:] = first + rest


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
    """Builds the training model of a variant (see `MLCRLModel`).

    Args:
        num_classes: C, number of labels.
        backbone: "resnet101" (paper), "resnet50", "vgg16", "small_cnn", or
            "keras_hub:<preset>" (needs keras-hub).
        image_size: square input side (paper: 448).
        variant: "baseline", "tba", "tbc", "mse" or "crl" (paper).
        backbone_weights: None (random init; "", "none" and "random" too),
            "imagenet" or a local weights file.

    Returns:
        An `MLCRLModel`; `.inference_model` is images -> final logits.

    Raises:
        ValueError: an unknown backbone or variant, bad num_classes or
            image_size, a missing weights file, or a KerasHub backbone
            without keras-hub installed.
    """
    return MLCRLModel(num_classes, backbone=backbone, image_size=image_size,
                      variant=variant, backbone_weights=backbone_weights)

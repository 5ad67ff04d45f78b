"""The paper's optimizer: PyTorch's SGD rule with two learning rates and a step decay.

    d = g + weight_decay * theta;  buf = momentum * buf + d;  theta -= lr_group * buf

Why not Keras' SGD, and how the two rates are one optimizer: docs/design.md,
Training.
"""

import keras
from keras import ops
import tensorflow as tf


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class StepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr = initial · factor^(number of boundaries passed); constant without any.

    PyTorch's `MultiStepLR` with milestones in steps: the rate used by the
    update at step `s` (0-based count of updates already applied) is
    `initial · factor^#{b in boundaries: s >= b}`.

    The step is the optimizer's `iterations`, which counts applied updates.
    Under mixed_float16 (`make_optimizer(loss_scaling=True)`) the
    `LossScaleOptimizer` skips a step whose gradients are not finite and
    then does not advance `iterations`, so every skipped step moves each
    decay one step later than the training loop's step counter (which
    counts every step). Skips happen mostly in the first steps, while the
    dynamic loss scale comes down from 2^15: a decay at epoch 30 then comes
    that many (typically a few) steps late. float32 and bfloat16 skip none.

    Args:
        initial_learning_rate: rate before the first boundary.
        boundaries: sorted steps at which the rate is multiplied by `factor`.
        factor: the decay factor (0.1 in ML-GCN's recipe).

    Example:
    >>> schedule = StepDecay(0.01, boundaries=[100], factor=0.1)
    >>> round(float(schedule(99)), 6), round(float(schedule(100)), 6)
    (0.01, 0.001)
    """

    def __init__(self, initial_learning_rate, boundaries=(), factor=0.1):
        self.initial_learning_rate = float(initial_learning_rate)
        self.boundaries = [int(b) for b in boundaries]
        self.factor = float(factor)

    def __call__(self, step):
        passed = tf.zeros([], tf.float32)
        for boundary in self.boundaries:
            passed += tf.cast(tf.cast(step, tf.int64) >= boundary, tf.float32)
        return self.initial_learning_rate * tf.pow(self.factor, passed)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "boundaries": self.boundaries, "factor": self.factor}


@keras.saving.register_keras_serializable(package="mlcrl_tf")
class PaperSGD(keras.optimizers.Optimizer):
    """PyTorch's SGD update rule (coupled weight decay, momentum buffer).

    Serialization: `get_config` holds the rate multipliers by variable
    path (`variable.path`, e.g. "conv1_conv/kernel"); an optimizer made
    from that config applies them to the variables of those paths when it
    is built (`model.save` / `keras.saving.load_model` keep the two rates).

    Args:
        learning_rate: float or schedule (e.g. `StepDecay`): the base rate.
        momentum: μ in [0, 1).
        coupled_weight_decay: L2 coefficient added to the gradient before
            momentum (PyTorch's `weight_decay`), applied to every variable.
        name: optimizer name.
        learning_rate_multipliers: {variable path: multiplier} (what
            `get_config` writes); `set_learning_rate_multiplier` is the
            usual way to set them.
        **kwargs: other `keras.optimizers.Optimizer` arguments (not
            `weight_decay`, which is Keras' decoupled decay).

    Example:
    >>> v = keras.Variable([1.0])
    >>> opt = PaperSGD(learning_rate=0.1, momentum=0.9)
    >>> opt.set_learning_rate_multiplier([v], 0.5)
    >>> _ = opt.apply_gradients([(keras.ops.convert_to_tensor([1.0]), v)])
    >>> round(float(v.numpy()[0]), 6)
    0.95
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, coupled_weight_decay=0.0,
                 name="paper_sgd", learning_rate_multipliers=None, **kwargs):
        if kwargs.get("weight_decay"):
            raise ValueError("PaperSGD: use coupled_weight_decay (PyTorch's L2), not "
                             "Keras' decoupled weight_decay.")
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        if coupled_weight_decay < 0:
            raise ValueError(
                f"coupled_weight_decay must be >= 0, got {coupled_weight_decay!r}.")
        self.momentum = float(momentum)
        self.coupled_weight_decay = float(coupled_weight_decay)
        self._multipliers = {}  # variable key -> multiplier
        self._multiplier_paths = {}  # variable key -> variable path (get_config)
        # {path: multiplier} from a config: given to those variables by `build`.
        self._path_multipliers = {str(k): float(v) for k, v in
                                  (learning_rate_multipliers or {}).items()}

    def set_learning_rate_multiplier(self, variables, multiplier):
        """Gives `variables` the rate `multiplier · learning_rate` (a param group)."""
        for variable in variables:
            key = self._var_key(variable)
            self._multipliers[key] = float(multiplier)
            self._multiplier_paths[key] = _path(variable)

    def learning_rate_multiplier(self, variable):
        """The multiplier of `variable` (1.0 unless set)."""
        return self._multipliers.get(self._var_key(variable), 1.0)

    def build(self, variables):
        if self.built:
            return
        for variable in variables:  # the multipliers of a config, by path
            path = _path(variable)
            if self._var_key(variable) not in self._multipliers and (
                    path in self._path_multipliers):
                self.set_learning_rate_multiplier([variable], self._path_multipliers[path])
        super().build(variables)
        self.momentum_buffers = []
        if self.momentum:
            self.momentum_buffers = self.add_optimizer_variables(
                variables, "momentum_buffer")

    def update_step(self, gradient, variable, learning_rate):
        """θ −= lr·m·buf with buf = μ·buf + g + λ·θ (PyTorch's SGD)."""
        dtype = variable.dtype
        rate = ops.cast(learning_rate, dtype) * ops.cast(
            self.learning_rate_multiplier(variable), dtype)
        step = ops.cast(gradient, dtype)
        if self.coupled_weight_decay:
            step = step + ops.cast(self.coupled_weight_decay, dtype) * variable
        if self.momentum:
            buffer = self.momentum_buffers[self._get_variable_index(variable)]
            self.assign(buffer, ops.cast(self.momentum, dtype) * buffer + step)
            step = buffer
        self.assign_sub(variable, rate * step)

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum,
                       "coupled_weight_decay": self.coupled_weight_decay,
                       "learning_rate_multipliers": self._multipliers_by_path()})
        return config

    def _multipliers_by_path(self):
        """{variable path: multiplier} of every variable given one."""
        by_path = dict(self._path_multipliers)
        given = {}
        for key, multiplier in self._multipliers.items():
            path = self._multiplier_paths[key]
            if given.setdefault(path, multiplier) != multiplier:
                raise ValueError(
                    f"PaperSGD: two variables with the path {path!r} have different "
                    "learning rate multipliers, which a config cannot tell apart; "
                    "give the layers distinct names.")
            by_path[path] = multiplier
        return by_path


def _path(variable):
    """A variable's path (its name for a variable without one)."""
    return getattr(variable, "path", None) or variable.name


def make_optimizer(model, learning_rate, backbone_learning_rate, momentum=0.9,
                   weight_decay=1e-4, decay_boundaries=(), decay_factor=0.1,
                   loss_scaling=False):
    """The paper's optimizer for an `MLCRLModel`.

    Args:
        model: the model (its `backbone_variables` get the backbone rate).
        learning_rate: rate of every non-backbone layer (paper: 0.01).
        backbone_learning_rate: rate of the backbone (paper: 0.001).
        momentum: SGD momentum (0.9).
        weight_decay: coupled (PyTorch) weight decay (1e-4).
        decay_boundaries: steps at which both rates are multiplied by
            `decay_factor`.
        decay_factor: step decay factor in (0, 1].
        loss_scaling: wrap in a dynamic `LossScaleOptimizer` (float16).

    Returns:
        A built Keras optimizer.
    """
    optimizer = PaperSGD(
        learning_rate=StepDecay(learning_rate, sorted(decay_boundaries), decay_factor),
        momentum=momentum, coupled_weight_decay=weight_decay)
    optimizer.set_learning_rate_multiplier(
        model.backbone_variables, backbone_learning_rate / learning_rate)
    if loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return optimizer


def inner_optimizer(optimizer):
    """The `PaperSGD` inside a possible `LossScaleOptimizer`."""
    return getattr(optimizer, "inner_optimizer", optimizer)


class ExponentialMovingAverage(tf.Module):
    """Shadow copies of the trainable weights: ema = d * ema + (1 - d) * w.

    The shadow variables are created in the distribution strategy's scope
    with ONLY_FIRST_REPLICA aggregation, so `update` can run inside
    `strategy.run` (every replica computes the same value). `swap`
    exchanges weights and shadows (evaluation on the EMA weights).

    Args:
        variables: the variables to average (the model's trainable ones).
        decay: d in [0, 1).

    Example:
    >>> w = tf.Variable([1.0])
    >>> ema = ExponentialMovingAverage([w], decay=0.5)
    >>> _ = w.assign([3.0]); ema.update()
    >>> float(ema.shadow[0].numpy()[0])
    2.0
    """

    def __init__(self, variables, decay):
        super().__init__(name="ema")
        self.decay = float(decay)
        self._model_variables = list(variables)
        self.shadow = [
            tf.Variable(v, trainable=False, name=v.name.split(":")[0] + "_ema",
                        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for v in self._model_variables]

    def update(self):
        for s, v in zip(self.shadow, self._model_variables):
            s.assign(self.decay * s + (1.0 - self.decay) * tf.cast(v, s.dtype))

    def copy_to_model(self):
        """Overwrites the model's weights with the averages (for eval/export)."""
        for s, v in zip(self.shadow, self._model_variables):
            v.assign(tf.cast(s, v.dtype))

    def swap(self):
        """Exchanges model weights and averages (call twice to undo)."""
        for s, v in zip(self.shadow, self._model_variables):
            tmp = tf.identity(v)
            v.assign(tf.cast(s, v.dtype))
            s.assign(tf.cast(tmp, s.dtype))

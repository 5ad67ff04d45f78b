"""Tests of mlcrl_tf.optim: the paper's (PyTorch) SGD against a NumPy transcription."""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf.modeling import optim


def pytorch_sgd_reference(params, grads, lr_at, multipliers, momentum, weight_decay):
    """NumPy transcription of torch.optim.SGD (dampening 0, no nesterov) + MultiStepLR.

    for each step t, each group (multiplier m) and parameter p:
        d_p = grad + weight_decay * p
        buf = d_p                      if t == 0
              momentum * buf + d_p     otherwise
        p  -= lr_at(t) * m * buf
    """
    params = [np.array(p, np.float64) for p in params]
    buffers = [None] * len(params)
    history = []
    for t, step_grads in enumerate(grads):
        for i, (p, g) in enumerate(zip(params, step_grads)):
            d_p = g + weight_decay * p
            buffers[i] = d_p.copy() if buffers[i] is None else momentum * buffers[i] + d_p
            p -= lr_at(t) * multipliers[i] * buffers[i]
        history.append([p.copy() for p in params])
    return history


def _run_paper_sgd(params, grads, schedule, multipliers, momentum, weight_decay):
    variables = [keras.Variable(p.astype(np.float32)) for p in params]
    optimizer = optim.PaperSGD(learning_rate=schedule, momentum=momentum,
                               coupled_weight_decay=weight_decay)
    for variable, multiplier in zip(variables, multipliers):
        optimizer.set_learning_rate_multiplier([variable], multiplier)
    history = []
    for step_grads in grads:
        optimizer.apply_gradients(
            [(tf.constant(g, tf.float32), v) for g, v in zip(step_grads, variables)])
        history.append([v.numpy().astype(np.float64) for v in variables])
    return history


def _problem(seed=0, steps=30):
    rng = np.random.default_rng(seed)
    params = [rng.normal(0, 1, (3, 4)), rng.normal(0, 1, (5,))]
    grads = [[rng.normal(0, 1, p.shape) for p in params] for _ in range(steps)]
    return params, grads


def test_thirty_steps_across_a_decay_match_pytorch_to_1e6():
    """Two groups (backbone x0.1, head), momentum, coupled decay, x0.1 at step 12."""
    params, grads = _problem()
    schedule = optim.StepDecay(0.01, boundaries=[12], factor=0.1)
    multipliers = [0.1, 1.0]  # backbone 0.001, head 0.01
    expected = pytorch_sgd_reference(
        params, grads, lambda t: 0.01 * (0.1 if t >= 12 else 1.0), multipliers,
        momentum=0.9, weight_decay=1e-4)
    got = _run_paper_sgd(params, grads, schedule, multipliers, 0.9, 1e-4)
    for t, (g_step, e_step) in enumerate(zip(got, expected)):
        for g, e in zip(g_step, e_step):
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-6, err_msg=f"step {t}")


def test_keras_sgd_with_scaled_gradients_is_not_the_papers_rule():
    """The old recipe (Keras SGD, gradients x ratio) drifts after the decay."""
    params, grads = _problem(seed=1)
    expected = pytorch_sgd_reference(
        params, grads, lambda t: 0.01 * (0.1 if t >= 12 else 1.0), [0.1, 1.0],
        momentum=0.9, weight_decay=1e-4)
    variables = [keras.Variable(p.astype(np.float32)) for p in params]
    sgd = keras.optimizers.SGD(optim.StepDecay(0.01, [12], 0.1), momentum=0.9)
    for step_grads in grads:
        sgd.apply_gradients([
            (tf.constant((g + 1e-4 * v.numpy()) * m, tf.float32), v)
            for g, v, m in zip(step_grads, variables, [0.1, 1.0])])
    error = max(np.abs(v.numpy() - e).max() for v, e in zip(variables, expected[-1]))
    assert error > 1e-4


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.0, 1e-2), (0.5, 0.0)])
def test_edge_settings_match_pytorch(momentum, weight_decay):
    params, grads = _problem(seed=2, steps=8)
    expected = pytorch_sgd_reference(params, grads, lambda t: 0.05, [1.0, 0.3],
                                     momentum, weight_decay)
    got = _run_paper_sgd(params, grads, 0.05, [1.0, 0.3], momentum, weight_decay)
    for g, e in zip(got[-1], expected[-1]):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-6)


def test_loss_scale_optimizer_unscales_before_the_rule():
    params, grads = _problem(seed=3, steps=5)
    expected = pytorch_sgd_reference(params, grads, lambda t: 0.01, [1.0, 1.0], 0.9, 1e-4)
    variables = [keras.Variable(p.astype(np.float32)) for p in params]
    optimizer = keras.optimizers.LossScaleOptimizer(
        optim.PaperSGD(0.01, momentum=0.9, coupled_weight_decay=1e-4))
    optimizer.build(variables)
    scale = float(optimizer.dynamic_scale.numpy())
    assert scale > 1
    for step_grads in grads:
        optimizer.apply_gradients(
            [(tf.constant(g * scale, tf.float32), v) for g, v in zip(step_grads, variables)])
    for v, e in zip(variables, expected[-1]):
        np.testing.assert_allclose(v.numpy(), e, rtol=0, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="momentum"):
        optim.PaperSGD(momentum=1.0)
    with pytest.raises(ValueError, match="coupled_weight_decay"):
        optim.PaperSGD(coupled_weight_decay=-1.0)
    with pytest.raises(ValueError, match="decoupled"):
        optim.PaperSGD(weight_decay=1e-4)


def test_docstring_examples():
    assert doctest.testmod(optim, optionflags=doctest.ELLIPSIS).failed == 0


# ---------------------------------------------------------------------------
# ExponentialMovingAverage against its NumPy recursion.
# ---------------------------------------------------------------------------

def ema_reference(initial, updates, decay):
    """NumPy: shadow starts as a copy of the weights the EMA is built from;
    after each update `ema = decay * ema + (1 - decay) * w` (w the weights then).

    Returns the shadow values after each update.
    """
    shadow = [np.array(w, np.float64) for w in initial]
    history = []
    for weights in updates:
        for i, w in enumerate(weights):
            shadow[i] = decay * shadow[i] + (1.0 - decay) * np.asarray(w, np.float64)
        history.append([s.copy() for s in shadow])
    return history


@pytest.mark.parametrize("decay", [0.9, 0.5, 0.0])
def test_ema_follows_the_numpy_recursion(decay):
    rng = np.random.default_rng(4)
    initial = [rng.normal(0, 1, (3, 4)), rng.normal(0, 1, (5,))]
    updates = [[rng.normal(0, 1, w.shape) for w in initial] for _ in range(6)]
    variables = [tf.Variable(w.astype(np.float32)) for w in initial]
    ema = optim.ExponentialMovingAverage(variables, decay)
    # Initialisation: a copy of the weights at construction (not zeros), and a
    # copy, not an alias: moving the weights leaves the shadow where it was.
    for s, w in zip(ema.shadow, initial):
        np.testing.assert_array_equal(s.numpy(), w.astype(np.float32))
    expected = ema_reference(initial, updates, decay)
    for step, weights in enumerate(updates):
        for v, w in zip(variables, weights):
            v.assign(w.astype(np.float32))
        ema.update()
        for v, w in zip(variables, weights):  # update never touches the weights
            np.testing.assert_array_equal(v.numpy(), w.astype(np.float32))
        for s, e in zip(ema.shadow, expected[step]):
            np.testing.assert_allclose(s.numpy(), e, rtol=0, atol=1e-6,
                                       err_msg=f"update {step}")
    if decay:  # the test can fail: the average is not the last weights
        assert max(np.abs(s.numpy() - w).max()
                   for s, w in zip(ema.shadow, updates[-1])) > 0.1


def test_ema_swap_twice_is_the_identity_and_copy_to_model():
    rng = np.random.default_rng(5)
    variables = [tf.Variable(rng.normal(0, 1, (4, 3)).astype(np.float32)),
                 tf.Variable(rng.normal(0, 1, (7,)).astype(np.float32))]
    ema = optim.ExponentialMovingAverage(variables, 0.8)
    for _ in range(3):
        for v in variables:
            v.assign(rng.normal(0, 1, v.shape).astype(np.float32))
        ema.update()
    raw = [v.numpy().copy() for v in variables]
    averaged = [s.numpy().copy() for s in ema.shadow]
    assert all(np.abs(a - r).max() > 0.1 for a, r in zip(averaged, raw))
    ema.swap()  # model <- averages, averages <- model
    for v, s, a, r in zip(variables, ema.shadow, averaged, raw):
        np.testing.assert_array_equal(v.numpy(), a)
        np.testing.assert_array_equal(s.numpy(), r)
    ema.swap()  # and back: bit-identical
    for v, s, a, r in zip(variables, ema.shadow, averaged, raw):
        np.testing.assert_array_equal(v.numpy(), r)
        np.testing.assert_array_equal(s.numpy(), a)
    ema.copy_to_model()
    for v, s, a in zip(variables, ema.shadow, averaged):
        np.testing.assert_array_equal(v.numpy(), a)
        np.testing.assert_array_equal(s.numpy(), a)


def test_the_rate_multipliers_survive_get_config():
    """Failed before: from_config(get_config()) gave every variable rate 1.0."""
    head = keras.Variable(np.ones(2, np.float32), name="kernel")
    backbone = keras.Variable(np.ones(2, np.float32), name="conv_kernel")
    optimizer = optim.PaperSGD(learning_rate=optim.StepDecay(0.1, [5], 0.1), momentum=0.9)
    optimizer.set_learning_rate_multiplier([backbone], 0.1)
    config = optimizer.get_config()
    assert config["learning_rate_multipliers"] == {backbone.path: 0.1}
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    clone.build([head, backbone])
    assert clone.learning_rate_multiplier(backbone) == pytest.approx(0.1)
    assert clone.learning_rate_multiplier(head) == 1.0
    assert clone.get_config()["learning_rate_multipliers"] == {backbone.path: 0.1}
    # Inside a LossScaleOptimizer (mixed_float16) too.
    wrapped = keras.optimizers.deserialize(keras.optimizers.serialize(
        keras.optimizers.LossScaleOptimizer(optimizer)))
    wrapped.build([head, backbone])
    assert optim.inner_optimizer(wrapped).learning_rate_multiplier(backbone) == (
        pytest.approx(0.1))


def test_a_skipped_float16_step_does_not_advance_the_schedule():
    """What optim.StepDecay documents: LossScaleOptimizer skips a step with
    non-finite gradients without advancing `iterations`, the schedule's step."""
    variable = keras.Variable(np.ones(2, np.float32))
    optimizer = keras.optimizers.LossScaleOptimizer(
        optim.PaperSGD(learning_rate=optim.StepDecay(0.1, [1], 0.1), momentum=0.0))
    optimizer.build([variable])
    optimizer.apply_gradients([(tf.constant([np.inf, 0.0]), variable)])
    assert int(optimizer.iterations.numpy()) == 0
    np.testing.assert_array_equal(variable.numpy(), [1.0, 1.0])
    assert float(optim.inner_optimizer(optimizer).learning_rate) == pytest.approx(0.1)

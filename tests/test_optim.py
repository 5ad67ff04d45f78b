"""Tests of mlcrl_tf.optim: the paper's (PyTorch) SGD against a NumPy transcription."""

import doctest

import keras
import numpy as np
import pytest
import tensorflow as tf

from mlcrl_tf import optim


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

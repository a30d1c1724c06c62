"""losses.py against NumPy references and closed forms."""
import math

import numpy as np
import pytest
import tensorflow as tf

import losses

RNG = np.random.default_rng(0)
B, H, W, C, Z = 4, 6, 5, 2, 3
D = H * W * C


def batch():
    x = RNG.uniform(-1, 1, (B, H, W, C)).astype(np.float32)
    x_hat = np.tanh(RNG.normal(size=x.shape)).astype(np.float32)
    mu = RNG.normal(size=(B, Z)).astype(np.float32)
    log_var = RNG.normal(scale=0.5, size=(B, Z)).astype(np.float32)
    return x, x_hat, mu, log_var


def np_nll(x, m, log_sigma):
    sigma = np.exp(log_sigma)
    return 0.5 * ((x - m) / sigma) ** 2 + log_sigma + 0.5 * np.log(2 * np.pi)


def np_kl(mu, log_var):
    return -0.5 * np.sum(1 + log_var - mu ** 2 - np.exp(log_var), axis=-1)


def np_softclip(t, m):
    return m + np.log1p(np.exp(t - m))


def test_gaussian_nll_matches_numpy_and_broadcasts():
    x, x_hat, _, _ = batch()
    for log_sigma in (0.0, -1.3, np.float32(0.7)):
        got = losses.gaussian_nll(x, x_hat, tf.constant(log_sigma, tf.float32)).numpy()
        np.testing.assert_allclose(got, np_nll(x, x_hat, log_sigma), rtol=1e-5, atol=1e-6)
    per_pixel = RNG.normal(size=x.shape).astype(np.float32)
    np.testing.assert_allclose(losses.gaussian_nll(x, x_hat, per_pixel).numpy(),
                               np_nll(x, x_hat, per_pixel), rtol=1e-5, atol=1e-6)


def test_nll_at_the_mean_with_unit_sigma_is_half_log_2pi():
    x = tf.zeros((2, 3))
    np.testing.assert_allclose(losses.gaussian_nll(x, x, 0.0).numpy(), 0.5 * math.log(2 * math.pi))


def test_kl_matches_numpy_and_is_zero_for_the_prior():
    _, _, mu, log_var = batch()
    kl = losses.kl_divergence(mu, log_var).numpy()
    assert kl.shape == (B, Z)
    np.testing.assert_allclose(kl.sum(-1), np_kl(mu, log_var), rtol=1e-5)
    np.testing.assert_allclose(losses.kl_divergence(tf.zeros((2, 5)), tf.zeros((2, 5))).numpy(), 0.0)


def test_softclip_matches_numpy_and_bounds_from_below():
    t = np.linspace(-30, 10, 101).astype(np.float32)
    got = losses.softclip(t, -6.0).numpy()
    np.testing.assert_allclose(got, np_softclip(t.astype(np.float64), -6.0), rtol=1e-5, atol=1e-5)
    assert np.all(got >= -6.0)
    np.testing.assert_allclose(got[t > 5], t[t > 5], atol=1e-4)  # ~identity far above


def test_optimal_log_sigma_is_log_rmse_and_minimises_the_nll():
    x, x_hat, _, _ = batch()
    got = float(losses.optimal_log_sigma(tf.reduce_mean(tf.square(x - x_hat))))
    expected = np.log(np.sqrt(np.mean((x.astype(np.float64) - x_hat) ** 2)))
    assert got == pytest.approx(expected, rel=1e-5)
    best = np_nll(x, x_hat, got).sum()
    for factor in (1.1, 1 / 1.1):
        assert np_nll(x, x_hat, got + math.log(factor)).sum() > best


def test_log_ndtr_matches_erfc_in_float64_everywhere():
    t = np.concatenate([np.linspace(-35, 12, 2001), [-10.0, 5.0, -10.001, 5.001, 0.0]])
    expected = np.array([math.log(0.5 * math.erfc(-v / math.sqrt(2))) if v < 5 else
                         math.log1p(-0.5 * math.erfc(v / math.sqrt(2))) for v in t])
    got = losses.log_ndtr(tf.constant(t, tf.float32)).numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=1e-7)
    # Beyond float64's erfc: Mills' ratio, whose next term is 15 / t^6 < 2e-11 here.
    t = np.array([-100.0, -1e3, -1e4])
    expected = -t ** 2 / 2 - np.log(-t) - 0.5 * math.log(2 * math.pi) + np.log1p(-1 / t ** 2 + 3 / t ** 4)
    np.testing.assert_allclose(losses.log_ndtr(tf.constant(t, tf.float32)).numpy(), expected, rtol=1e-6)
    # Its gradient, phi(t) / Phi(t), is finite everywhere (no nan from the branches not taken).
    v = tf.constant([-1e4, -60.0, -10.0, 0.0, 5.0, 40.0, 1e4])
    with tf.GradientTape() as tape:
        tape.watch(v)
        y = losses.log_ndtr(v)
    grad = tape.gradient(y, v).numpy()
    expected = [math.exp(-0.5 * u * u) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(-u / math.sqrt(2)))
                if u > -30 else -u for u in v.numpy().astype(np.float64)]
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-30)


def test_shared_sigma_gradient_reaches_log_sigma_with_the_closed_form():
    x, x_hat, _, _ = batch()
    likelihood = losses.SharedSigma((-1, 1), log_sigma_min=-6.0)
    likelihood.log_sigma.assign(-0.4)
    with tf.GradientTape() as tape:
        values, _, _ = likelihood.train_terms(x, x_hat)
        loss = tf.reduce_sum(values)
    grad = float(tape.gradient(loss, likelihood.log_sigma))
    # d/ds sum(0.5 r^2 e^{-2s} + s) = sum(1 - r^2 e^{-2s}), times softclip' = sigmoid(t - m)
    s = np_softclip(-0.4, -6.0)
    expected = np.sum(1 - (x - x_hat).astype(np.float64) ** 2 * np.exp(-2 * s))
    expected *= 1 / (1 + np.exp(-(-0.4 + 6.0)))
    assert grad == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize('log_sigma_min, rtol', [(None, 1e-4), (-6.0, 2e-2)])
def test_optimal_sigma_gradient_same_with_and_without_stop_gradient(log_sigma_min, rtol):
    x, _, mu, _ = batch()
    net = tf.keras.layers.Dense(D, activation='tanh')
    net.build((None, Z))
    x_flat = x.reshape(B, D)

    class Stopped(losses.OptimalSigma):
        def batch_log_sigma(self, x, params, global_mean):
            return tf.stop_gradient(super().batch_log_sigma(x, params, global_mean))

    def grads(likelihood):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(likelihood.train_terms(x_flat, net(mu))[0])
        return tape.gradient(loss, net.trainable_variables)

    for a, b in zip(grads(losses.OptimalSigma((-1, 1), log_sigma_min=log_sigma_min)),
                    grads(Stopped((-1, 1), log_sigma_min=log_sigma_min))):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=rtol * np.abs(b).max())


def test_bits_per_dim_closed_form():
    # A uniform density on [-1, 1]^D has -log p = D ln 2; on [0, 255] it is log2(255) bits a value.
    assert losses.bits_per_dim(D * math.log(2.0), D, math.log(127.5)) == pytest.approx(math.log2(255.0))
    # On [0, 1] the same uniform density has -log p = 0: again log2(255) bits on 0..255.
    assert losses.bits_per_dim(0.0, D, math.log(255.0)) == pytest.approx(math.log2(255.0))
    assert losses.bits_per_dim(-100.0, 784, math.log(127.5)) == pytest.approx(
        (-100 + 784 * math.log(127.5)) / (784 * math.log(2)))


def objective_gradients(likelihood, beta, x, net, mu, log_var):
    with tf.GradientTape() as tape:
        values, _, _ = likelihood.train_terms(x, net(mu))
        rec, kl = likelihood.reduce(values, losses.kl_divergence(mu, log_var), B)
        loss = rec + beta * kl
    return [g.numpy() for g in tape.gradient(loss, net.trainable_variables + [mu, log_var])]


@pytest.mark.parametrize('name, log_sigma', [('sigma', -1.3), ('mse', 0.0)])
def test_effective_beta_is_the_gaussian_kl_weight_with_the_same_gradients(name, log_sigma):
    # A decoder with KL weight beta and the gaussian (sigma = 1) decoder with KL weight
    # effective_beta have proportional gradients: the same minimisers, the same Adam steps.
    x, _, mu, _ = batch()
    x_flat = x.reshape(B, D)
    net = tf.keras.layers.Dense(D, activation='tanh')
    net.build((None, Z))
    mu = tf.Variable(mu)  # the KL's gradient reaches the encoder through mu and log_var
    log_var = tf.Variable(RNG.normal(scale=0.5, size=(B, Z)).astype(np.float32))
    likelihood = losses.DECODERS[name]((-1, 1), log_sigma_min=None)
    if name == 'sigma':
        likelihood.log_sigma.assign(log_sigma)
    beta = 0.7
    effective = likelihood.effective_beta(beta, log_sigma, D, Z)
    expected = {'sigma': beta * math.exp(2 * log_sigma), 'mse': beta * D / (2 * Z)}[name]
    assert effective == pytest.approx(expected)
    got = objective_gradients(likelihood, beta, x_flat, net, mu, log_var)
    want = objective_gradients(losses.Gaussian((-1, 1)), effective, x_flat, net, mu, log_var)
    scale = want[0].ravel() @ got[0].ravel() / (got[0].ravel() @ got[0].ravel())
    for g, w in zip(got, want):
        np.testing.assert_allclose(scale * g, w, rtol=1e-4, atol=1e-6 * np.abs(w).max())
    assert losses.DECODERS['logistic']((-1, 1)).effective_beta(beta, -1.0, D, Z) is None

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
    np.testing.assert_allclose(losses.kl_divergence(mu, log_var).numpy(), np_kl(mu, log_var),
                               rtol=1e-5)
    assert losses.kl_divergence(mu, log_var).shape == (B,)
    np.testing.assert_allclose(losses.kl_divergence(tf.zeros((2, 5)), tf.zeros((2, 5))).numpy(), 0.0)


def test_softclip_matches_numpy_and_bounds_from_below():
    t = np.linspace(-30, 10, 101).astype(np.float32)
    got = losses.softclip(t, -6.0).numpy()
    np.testing.assert_allclose(got, np_softclip(t.astype(np.float64), -6.0), rtol=1e-5, atol=1e-5)
    assert np.all(got >= -6.0)
    np.testing.assert_allclose(got[t > 5], t[t > 5], atol=1e-4)  # ~identity far above


def test_optimal_log_sigma_is_log_rmse_and_minimises_the_nll():
    x, x_hat, _, _ = batch()
    got = float(losses.optimal_log_sigma(x, x_hat))
    expected = np.log(np.sqrt(np.mean((x.astype(np.float64) - x_hat) ** 2)))
    assert got == pytest.approx(expected, rel=1e-5)
    best = np_nll(x, x_hat, got).sum()
    for factor in (1.1, 1 / 1.1):
        assert np_nll(x, x_hat, got + math.log(factor)).sum() > best


@pytest.mark.parametrize('model', sorted(losses.MODELS))
@pytest.mark.parametrize('log_sigma_min', [-6.0, None, -0.5])
def test_vae_loss_matches_numpy(model, log_sigma_min):
    x, x_hat, mu, log_var = batch()
    beta = 0.7
    param = np.float32(-0.9)  # the `sigma` model's trainable value
    kl = np_kl(mu, log_var)
    if model == 'mse':
        rec, kl, used = np.mean((x - x_hat) ** 2), np.mean(kl) / Z, 0.0
    else:
        raw = {'gaussian': None, 'sigma': param,
               'optimal': 0.5 * np.log(np.mean((x - x_hat) ** 2))}[model]
        if raw is None:
            used = 0.0
        else:
            used = raw if log_sigma_min is None else np_softclip(raw, log_sigma_min)
        rec, kl = np_nll(x, x_hat, used).sum(), kl.sum()
    loss, got_rec, got_kl, got_used = losses.vae_loss(
        model, x, x_hat, mu, log_var, log_sigma=param if model == 'sigma' else None,
        beta=beta, log_sigma_min=log_sigma_min)
    np.testing.assert_allclose([got_rec, got_kl, got_used, loss],
                               [rec, kl, used, rec + beta * kl], rtol=1e-5, atol=1e-5)


def test_sigma_gradient_reaches_log_sigma_with_the_closed_form():
    x, x_hat, mu, log_var = batch()
    t = tf.Variable(-0.4)
    with tf.GradientTape() as tape:
        loss = losses.vae_loss('sigma', x, x_hat, mu, log_var, t, log_sigma_min=-6.0)[0]
    grad = float(tape.gradient(loss, t))
    # d/ds sum(0.5 r^2 e^{-2s} + s) = sum(1 - r^2 e^{-2s}), times softclip' = sigmoid(t - m)
    s = np_softclip(-0.4, -6.0)
    expected = np.sum(1 - (x - x_hat).astype(np.float64) ** 2 * np.exp(-2 * s))
    expected *= 1 / (1 + np.exp(-(-0.4 + 6.0)))
    assert grad == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize('log_sigma_min, rtol', [(None, 1e-4), (-6.0, 2e-2)])
def test_optimal_sigma_gradient_same_with_and_without_stop_gradient(log_sigma_min, rtol):
    x, _, mu, log_var = batch()
    net = tf.keras.layers.Dense(D, activation='tanh')
    net.build((None, Z))
    x_flat = x.reshape(B, D)

    def grads(stop):
        with tf.GradientTape() as tape:
            x_hat = net(mu)
            log_sigma = losses.optimal_log_sigma(x_flat, x_hat)
            if stop:
                log_sigma = tf.stop_gradient(log_sigma)
            loss = losses.vae_loss('optimal', x_flat, x_hat, mu, log_var, log_sigma,
                                   log_sigma_min=log_sigma_min)[0]
        return tape.gradient(loss, net.trainable_variables)

    for a, b in zip(grads(False), grads(True)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=rtol * np.abs(b).max())


def test_negative_elbo_per_example():
    x, x_hat, mu, log_var = batch()
    rec, kl = losses.negative_elbo(x, x_hat, mu, log_var, -0.3)
    np.testing.assert_allclose(rec.numpy(), np_nll(x, x_hat, -0.3).reshape(B, -1).sum(1), rtol=1e-5)
    np.testing.assert_allclose(kl.numpy(), np_kl(mu, log_var), rtol=1e-5)


def test_bits_per_dim_closed_form():
    # A uniform density on [-1, 1]^D has -log p = D ln 2; on [0, 255] it is log2(255) bits a value.
    assert losses.bits_per_dim(D * math.log(2.0), D) == pytest.approx(math.log2(255.0))
    # On [0, 1] the same uniform density has -log p = 0: again log2(255) bits on 0..255.
    assert losses.bits_per_dim(0.0, D, math.log(255.0)) == pytest.approx(math.log2(255.0))
    assert losses.bits_per_dim(-100.0, 784) == pytest.approx(
        (-100 + 784 * math.log(127.5)) / (784 * math.log(2)))

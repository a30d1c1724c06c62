"""The contract every decoder of losses.DECODERS passes, and a decoder added at run time."""
import json
import math

import numpy as np
import pytest
import tensorflow as tf

import compare
import losses
import models
from conftest import TINY, run
import checkpoints
import config as settings
import evaluation
import trainer as training

DECODERS = list(losses.DECODERS)
RNG = np.random.default_rng(3)
B, H, W, C = 3, 4, 5, 2
LEVEL = 2.0 / 255.0  # one 8-bit level on [-1, 1]
LOG_SIGMA_MIN = -4.0


def eight_bit(shape):
    """Random 8-bit values on [-1, 1], the edges 0 and 255 included."""
    levels = RNG.integers(0, 256, shape)
    levels.flat[:2] = [0, 255]
    return (levels * LEVEL - 1.0).astype(np.float32)


def random_params(likelihood):
    mean = np.tanh(RNG.normal(size=(B, H, W, C)))
    raw = RNG.uniform(-3.0, 0.5, (B, H, W, C * (likelihood.params_per_value - 1)))
    return np.concatenate([mean, raw], -1).astype(np.float32)


# ---- NumPy references, float64 -------------------------------------------------

def np_softclip(t):
    return LOG_SIGMA_MIN + np.logaddexp(0.0, t - LOG_SIGMA_MIN)


def np_log_bin_mass(cdf, x, loc, scale):
    """log of the mass of x's 8-bit bin, the edge bins open, from a CDF (float64, no tricks)."""
    lower, upper = (x - LEVEL / 2 - loc) / scale, (x + LEVEL / 2 - loc) / scale
    first, last = x <= -1 + LEVEL / 2, x >= 1 - LEVEL / 2
    # Mirror bins above the centre, where 1 - CDF keeps the precision (F(-t) = 1 - F(t)).
    mirrored = lower + upper > 0
    lo, hi = np.where(mirrored, -upper, lower), np.where(mirrored, -lower, upper)
    mass = np.where(first, cdf(upper), np.where(last, cdf(-lower), cdf(hi) - cdf(lo)))
    return np.log(mass)


np_ndtr = np.vectorize(lambda t: 0.5 * math.erfc(-t / math.sqrt(2.0)))


def np_sigmoid(t):
    return 1.0 / (1.0 + np.exp(-t))


def np_gaussian_nll(x, mean, log_sigma):
    return 0.5 * ((x - mean) / np.exp(log_sigma)) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)


def np_log_sigma(name, x, params, likelihood, training):
    """The log sigma each Gaussian decoder uses (broadcastable to x), from its definition."""
    mean = params[..., :C]
    if name in ('mse', 'gaussian'):
        return np.zeros(())
    if name == 'sigma':
        return np_softclip(float(likelihood.log_sigma.numpy()))
    if name == 'sigma_pixel':
        return np_softclip(params[..., C:])
    if not training:  # optimal, optimal_image: the debiased running average of sigma*^2
        return 0.5 * np.log(float(likelihood.sigma2_avg.numpy()) / float(likelihood.sigma2_weight.numpy()))
    if name == 'optimal':
        return np_softclip(0.5 * np.log(np.mean((x - mean) ** 2)))
    if name == 'optimal_image':
        return np_softclip(0.5 * np.log(np.mean((x - mean) ** 2, axis=(1, 2, 3), keepdims=True)))
    pytest.fail(f'decoder {name} has no NumPy reference in tests/test_decoders.py: add one')


def reference(name, x, params, likelihood, training):
    """(elementwise NLL (density), elementwise -log P(8-bit value), log sigma (B,)) in NumPy."""
    x, params = x.astype(np.float64), params.astype(np.float64)
    mean = params[..., :C]
    if name == 'logistic':
        log_s = np_softclip(params[..., C:])
        discrete = -np_log_bin_mass(np_sigmoid, x, mean, np.exp(log_s))
        return discrete + math.log(LEVEL), discrete, log_s.reshape(B, -1).mean(1)
    log_sigma = np_log_sigma(name, x, params, likelihood, training) + np.zeros_like(x)
    discrete = -np_log_bin_mass(np_ndtr, x, mean, np.exp(log_sigma))
    return np_gaussian_nll(x, mean, log_sigma), discrete, log_sigma.reshape(B, -1).mean(1)


def make(name):
    likelihood = losses.DECODERS[name]((-1.0, 1.0), LOG_SIGMA_MIN)
    if hasattr(likelihood, 'log_sigma'):
        likelihood.log_sigma.assign(-0.8)
    return likelihood


# ---- the contract -------------------------------------------------------------

@pytest.mark.parametrize('name', DECODERS)
def test_the_decoder_outputs_what_the_likelihood_reads(name):
    likelihood = make(name)
    vae = models.network_vae(28, C, 3, likelihood)
    x = tf.random.uniform((B, 28, 28, C), -1, 1)
    params, mu, log_var = vae(x, tf.zeros((B, 3)))
    assert params.shape == (B, 28, 28, C * likelihood.params_per_value) and params.dtype == tf.float32
    assert vae.decode(mu).shape == x.shape and np.all(np.abs(vae.decode(mu).numpy()) <= 1)
    objective, nll, log_sigma = likelihood.train_terms(x, params)
    assert objective.shape == x.shape and nll.shape == (B,) and log_sigma.shape == (B,)
    assert [t.shape for t in likelihood.test_terms(x, params)] == [(B,)] * 3


@pytest.mark.parametrize('name', DECODERS)
@pytest.mark.parametrize('training', [True, False])
def test_nll_matches_numpy(name, training):
    likelihood = make(name)
    x = eight_bit((B, H, W, C))
    params = random_params(likelihood)
    if training:
        _, nll, log_sigma = likelihood.train_terms(x, params)
        discrete = None
    else:
        if hasattr(likelihood, 'sigma2_avg'):  # a running average as training leaves it
            likelihood.sigma2_avg.assign(0.02)
            likelihood.sigma2_weight.assign(0.1)
        nll, discrete, log_sigma = likelihood.test_terms(x, params)
    want_nll, want_discrete, want_log_sigma = reference(name, x, params, likelihood, training)
    np.testing.assert_allclose(nll.numpy(), want_nll.reshape(B, -1).sum(1), rtol=1e-4)
    np.testing.assert_allclose(log_sigma.numpy(), want_log_sigma, rtol=1e-5, atol=1e-6)
    if discrete is not None:
        np.testing.assert_allclose(discrete.numpy(), want_discrete.reshape(B, -1).sum(1), rtol=1e-4)


@pytest.mark.parametrize('name', DECODERS)
def test_the_training_objective_and_its_reduction(name):
    likelihood = make(name)
    x = eight_bit((B, H, W, C))
    params = random_params(likelihood)
    mu, log_var = RNG.normal(size=(2, B, 3)).astype(np.float32)
    objective, _, _ = likelihood.train_terms(x, params)
    rec, kl = likelihood.reduce(objective, losses.kl_divergence(mu, log_var), 2 * B)
    np_kl = -0.5 * (1 + log_var - mu ** 2 - np.exp(log_var))
    if name == 'mse':  # the original's means, over a global batch of 2B here
        want_rec = np.sum((x - params[..., :C]) ** 2) / (2 * B * H * W * C)
        want_kl = np_kl.sum() / (2 * B * 3)
    else:
        want_rec = reference(name, x, params, likelihood, True)[0].sum()
        want_kl = np_kl.sum()
    np.testing.assert_allclose([float(rec), float(kl)], [want_rec, want_kl], rtol=1e-4)


@pytest.mark.parametrize('name', DECODERS)
def test_discrete_probabilities_of_all_256_values_sum_to_one(name):
    # At the default floor of log sigma (-6: the bins are a few sigma wide) and wider; the
    # scale is set through whichever knob the decoder has (sigma = 1 decoders have none).
    likelihood = losses.DECODERS[name]((-1.0, 1.0))
    x = (np.arange(256) * LEVEL - 1.0).astype(np.float32)[:, None, None, None]
    means = [-1.0, -0.4 + LEVEL / 3, 0.3, 0.5, 0.999, 1.0]
    for log_scale in [-9.0, -6.0, -3.0, 0.0, 3.0]:
        if hasattr(likelihood, 'log_sigma'):
            likelihood.log_sigma.assign(log_scale)
        if hasattr(likelihood, 'sigma2_avg'):
            likelihood.sigma2_avg.assign(math.exp(2 * log_scale))
            likelihood.sigma2_weight.assign(1.0)
        for mean in means:
            params = np.concatenate([np.full((256, 1, 1, 1), mean), np.full(
                (256, 1, 1, likelihood.params_per_value - 1), log_scale)], -1).astype(np.float32)
            log_p = -likelihood.test_terms(tf.constant(x), tf.constant(params))[1].numpy()
            assert np.all(log_p <= 1e-6)
            total = np.exp(log_p.astype(np.float64)).sum()
            assert total == pytest.approx(1.0, abs=1e-5), (mean, log_scale)


@pytest.mark.parametrize('name', ['gaussian', 'sigma'])
def test_a_wide_sigma_gives_the_same_discrete_and_continuous_bits_per_dim(name):
    # sigma >> one level: the mass of a bin is its width times the density (the midpoint
    # rule), except in the two open edge bins, which hold a whole tail: levels 1-254 here.
    likelihood = make(name)
    x = (RNG.integers(1, 255, (B, 28, 28, 1)) * LEVEL - 1).astype(np.float32)
    params = np.clip(x + RNG.normal(scale=0.3, size=x.shape), -1, 1).astype(np.float32)
    nll, discrete, _ = likelihood.test_terms(x, params)
    continuous_bpd = losses.bits_per_dim(nll.numpy(), 784, math.log(127.5))
    discrete_bpd = losses.bits_per_dim(discrete.numpy(), 784, 0.0)
    np.testing.assert_allclose(discrete_bpd, continuous_bpd, atol=1e-3)
    # A black value (level 0) under a mean at black gets the whole lower half: P = 1/2 + ~0.
    edge = likelihood.test_terms(-np.ones((1, 1, 1, 1), np.float32), -np.ones((1, 1, 1, 1), np.float32))
    sigma = math.exp(float(edge[2][0]))
    assert float(edge[1][0]) == pytest.approx(-math.log(float(np_ndtr(LEVEL / 2 / sigma))), rel=1e-5)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """Each decoder's Trainer after 12 steps on one batch of 8-bit images, and its losses."""
    out = tmp_path_factory.mktemp('decoders')
    x = tf.constant(eight_bit((8, 28, 28, 1)))
    result = {}
    for name in DECODERS:
        trainer = training.Trainer(settings.Config(model=name, batch_size=8, z_dim=4, seed=2,
                                             output_dir=str(out), experiment_name=name,
                                             channels=1))
        result[name] = trainer, [float(trainer.update(x)['loss']) for _ in range(12)]
    return x, result


@pytest.mark.parametrize('name', DECODERS)
def test_a_few_training_steps_lower_the_loss(trained, name):
    _, result = trained
    losses_seen = result[name][1]
    assert all(np.isfinite(losses_seen)) and losses_seen[-1] < losses_seen[0], losses_seen


@pytest.mark.parametrize('name', DECODERS)
def test_iw_nll_with_one_sample_is_the_negative_elbo_of_the_same_z(trained, name):
    x, result = trained
    vae = result[name][0].vae
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8)
    nll, discrete, seen = evaluation.importance_weighted_nll(vae, ds, 1, seed=5)
    # The same z by hand: one batch, seed [5, 0].
    mu, log_var = vae.encoder(x, training=False)
    z = mu + tf.exp(0.5 * log_var) * tf.random.stateless_normal((1,) + mu.shape, seed=[5, 0])[0]
    rec, rec_discrete, _ = vae.likelihood.test_terms(x, vae.decoder(z, training=False))
    kl_one_sample = losses.log_normal(z, mu, log_var) - losses.log_normal(z, 0.0 * z, 0.0 * z)
    assert seen == 8
    assert nll == pytest.approx(float(tf.reduce_mean(rec + kl_one_sample)), rel=1e-5, abs=1e-3)
    assert discrete == pytest.approx(float(tf.reduce_mean(rec_discrete + kl_one_sample)), rel=1e-5)


# ---- a decoder that only this file knows ---------------------------------------

class Laplace(losses.Likelihood):
    """Laplace(x_hat, b) with one trainable log b: defined here, registered at run time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_b = self.add_weight(shape=(), initializer='zeros', name='log_b')

    def nll_values(self, x, params, training=False, global_mean=tf.reduce_mean):
        log_b = self.log_b + tf.zeros_like(x)
        return tf.abs(x - self.mean(params)) * tf.exp(-log_b) + log_b + math.log(2.0), log_b

    def discrete_log_prob(self, x, params):
        def log_cdf(t):  # of the standard Laplace, each branch on a clamped t
            return tf.where(t < 0, math.log(0.5) + tf.minimum(t, 0.0),
                            tf.math.log1p(-0.5 * tf.exp(-tf.maximum(t, 0.0))))
        return losses.log_bin_mass(log_cdf, *self.bins(x, self.mean(params), tf.exp(self.log_b)))


def test_a_decoder_registered_at_run_time_trains_and_is_evaluated(image_folder, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setitem(losses.DECODERS, 'toy', Laplace)
    x = np.arange(256, dtype=np.float32)[:, None, None, None] * LEVEL - 1.0
    p = Laplace((-1, 1)).test_terms(x, np.full_like(x, 0.1))[1].numpy()
    assert np.exp(-p.astype(np.float64)).sum() == pytest.approx(1.0, abs=1e-5)

    out = tmp_path / 'cmp'
    assert compare.main(['--models', 'toy', '--dataset', image_folder, '--output_dir', str(out),
                         '--max_steps', '3', '--batch_size', '8', '--z_dim', '4',
                         '--iw_samples', '3', '--fid_samples', '4']) == 0
    rows = [json.loads(line) for line in open(out / 'toy' / 'metrics.jsonl')]
    assert rows[-1]['step'] == 3 and np.isfinite(rows[-1]['test_bits_per_dim_discrete'])
    result = json.load(open(out / 'toy' / 'evaluation.json'))
    assert result['model'] == 'toy' and np.isfinite(result['iw_bits_per_dim_discrete'])
    assert '| toy |' in open(out / 'results.md').read()
    # Trained: log b moved from 0, and a restored run has it back.
    assert float(checkpoints.load_model(str(out / 'toy'))[1].likelihood.log_b) != 0.0
    capsys.readouterr()
    assert run(['--model', 'toy', '--dataset', image_folder, '--output_dir', str(tmp_path),
                '--max_steps', '1'] + TINY) == 0

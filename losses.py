"""The VAE objective: reconstruction and KL terms. This file holds only math.

A VAE maximises the evidence lower bound (ELBO) of each image x,

    log p(x) >= ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I)),

and is trained on  loss = rec + beta * kl,  rec = -E_q[log p(x|z)].  With a
Gaussian decoder p(x|z) = N(x_hat(z), sigma^2 I) over the D values of an image,

    -log p(x|z) = sum_i [ (x_i - x_hat_i)^2 / (2 sigma^2) + log sigma + log(2 pi) / 2 ].

sigma sets the balance between the two terms: for a fixed sigma the NLL is the
summed squared error weighted by 1 / (2 sigma^2), which is beta-VAE with
beta = 2 sigma^2. The sigma-VAE (Rybkin, Daniilidis, Levine, "Simple and
Effective VAE Training with Calibrated Decoders", ICML 2021, arXiv:2006.13202)
learns one log sigma shared by all values (`sigma`), or solves for it in closed
form on every batch (`optimal`):

    sigma*^2 = mean over batch and values of (x - x_hat)^2,

the minimiser of the summed NLL over sigma. Both keep beta = 1.

The models, as the original TensorFlow code defines them (x in [-1, 1]):

    mse       rec = mean over batch and values of (x - x_hat)^2,  kl averaged too
    gaussian  rec = summed NLL with log sigma = 0,                 kl summed
    sigma     rec = summed NLL with a trainable scalar log sigma,  kl summed
    optimal   rec = summed NLL with log sigma*,                    kl summed

log sigma is soft-clipped from below (`softclip`, minimum -6 by default) so that
it cannot run to -inf on data it reconstructs perfectly.

To add a model, write one reconstruction function with the signature of
`gaussian_reconstruction` and add one line to `MODELS`.
"""
import math

import tensorflow as tf

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_nll(x, mean, log_sigma):
    """Elementwise negative log density of N(mean, exp(log_sigma)^2) at x.

    Args:
      x, mean: tensors of one shape, e.g. (B, H, W, C).
      log_sigma: a tensor broadcastable to x (a scalar for a shared sigma).
    Returns:
      A tensor of x's shape: 0.5 ((x - mean) / sigma)^2 + log sigma + 0.5 log 2pi.
      Nothing is reduced.
    """
    return 0.5 * tf.square((x - mean) * tf.exp(-log_sigma)) + log_sigma + 0.5 * LOG_2PI


def kl_divergence(mu, log_var):
    """KL(N(mu, exp(log_var)) || N(0, I)) per example.

    Args:
      mu, log_var: (B, Z) encoder outputs.
    Returns:
      (B,): -0.5 * sum over the Z latent dims of (1 + log_var - mu^2 - exp(log_var)).
    """
    return -0.5 * tf.reduce_sum(1.0 + log_var - tf.square(mu) - tf.exp(log_var), axis=-1)


def softclip(t, minimum):
    """A smooth lower bound: minimum + softplus(t - minimum), ~t for t >> minimum."""
    return minimum + tf.nn.softplus(t - minimum)


def optimal_log_sigma(x, x_hat):
    """The batch-wise optimal shared log sigma: log sqrt(mean((x - x_hat)^2)).

    Args:
      x, x_hat: tensors of one shape, e.g. (B, H, W, C).
    Returns:
      A scalar: the mean is over the whole batch and every value, so it is the
      log RMSE, the sigma that minimises sum(gaussian_nll(x, x_hat, log sigma)).
    """
    return 0.5 * tf.math.log(tf.reduce_mean(tf.square(x - x_hat)))


def clip_log_sigma(log_sigma, log_sigma_min):
    """softclip(log_sigma, log_sigma_min), or log_sigma itself when log_sigma_min is None."""
    return log_sigma if log_sigma_min is None else softclip(log_sigma, log_sigma_min)


# Reconstruction functions: (x, x_hat, log_sigma, log_sigma_min) ->
# (elementwise loss of x's shape, the scalar log sigma it used).

def mse_reconstruction(x, x_hat, log_sigma, log_sigma_min):
    """Squared error; the original's averaged baseline (no sigma: reported as 0)."""
    del log_sigma, log_sigma_min
    return tf.square(x - x_hat), tf.constant(0.0, x.dtype)


def gaussian_reconstruction(x, x_hat, log_sigma, log_sigma_min):
    """Gaussian NLL with sigma fixed at 1."""
    del log_sigma, log_sigma_min
    log_sigma = tf.constant(0.0, x.dtype)
    return gaussian_nll(x, x_hat, log_sigma), log_sigma


def sigma_reconstruction(x, x_hat, log_sigma, log_sigma_min):
    """Gaussian NLL with the model's trainable scalar log sigma (soft-clipped)."""
    log_sigma = clip_log_sigma(tf.cast(log_sigma, x.dtype), log_sigma_min)
    return gaussian_nll(x, x_hat, log_sigma), log_sigma


def optimal_reconstruction(x, x_hat, log_sigma, log_sigma_min):
    """Gaussian NLL with the batch's optimal log sigma (soft-clipped).

    If `log_sigma` is given it is used as sigma* (a distributed caller passes the
    value computed over the global batch); otherwise it is computed from this batch.
    The gradient flows through sigma*; at the optimum dL/dsigma = 0, so stopping
    it would give the network the same gradient.
    """
    if log_sigma is None:
        log_sigma = optimal_log_sigma(x, x_hat)
    log_sigma = clip_log_sigma(tf.cast(log_sigma, x.dtype), log_sigma_min)
    return gaussian_nll(x, x_hat, log_sigma), log_sigma


# name -> (reconstruction function, how rec and kl are reduced over batch and values)
MODELS = {
    'mse': (mse_reconstruction, 'mean'),
    'gaussian': (gaussian_reconstruction, 'sum'),
    'sigma': (sigma_reconstruction, 'sum'),
    'optimal': (optimal_reconstruction, 'sum'),
}


def vae_loss(model, x, x_hat, mu, log_var, log_sigma=None, beta=1.0, log_sigma_min=-6.0,
             batch_size=None):
    """The training objective of one batch.

    Args:
      model: a key of MODELS.
      x, x_hat: (B, H, W, C) data and decoder mean.
      mu, log_var: (B, Z) encoder outputs.
      log_sigma: scalar; the trainable log sigma for `sigma`, an optional
        precomputed sigma* for `optimal`, ignored by the others.
      beta: weight of the KL term.
      log_sigma_min: soft lower bound of log sigma; None turns the clip off.
      batch_size: what a 'mean' model's batch mean divides by: the global batch when
        this batch is one replica's part of it (default: B).
    Returns:
      (loss, rec, kl, log_sigma_used), scalars with loss = rec + beta * kl.
      For 'mean' models rec and kl are means over batch and values (latent dims
      for kl); for 'sum' models they are sums over batch and values.
    """
    reconstruction, reduction = MODELS[model]
    rec, log_sigma_used = reconstruction(x, x_hat, log_sigma, log_sigma_min)
    kl = kl_divergence(mu, log_var)
    if reduction == 'mean':
        n = tf.cast(tf.shape(x)[0] if batch_size is None else batch_size, rec.dtype)
        rec = tf.reduce_sum(rec) / (n * tf.cast(tf.size(rec[0]), rec.dtype))
        kl = tf.reduce_sum(kl) / (n * tf.cast(tf.shape(mu)[-1], kl.dtype))
    else:
        rec = tf.reduce_sum(rec)
        kl = tf.reduce_sum(kl)
    return rec + beta * kl, rec, kl, log_sigma_used


def negative_elbo(x, x_hat, mu, log_var, log_sigma):
    """-ELBO per example in nats under N(x_hat, sigma^2): (rec, kl), each (B,).

    Uses the single z that produced x_hat, so rec + kl is an unbiased estimate.
    """
    rec = tf.reduce_sum(gaussian_nll(x, x_hat, log_sigma), axis=tf.range(1, tf.rank(x)))
    return rec, kl_divergence(mu, log_var)


def log_normal(z, mu, log_var):
    """log N(z; mu, diag(exp(log_var))) summed over the last axis: (..., Z) -> (...)."""
    return -0.5 * tf.reduce_sum(LOG_2PI + log_var + tf.square(z - mu) * tf.exp(-log_var), axis=-1)


def log_importance_weights(x, x_hat, z, mu, log_var, log_sigma):
    """log w = log p(x|z) + log p(z) - log q(z|x) for one z per example.

    Args:
      x, x_hat: (B, H, W, C) data and the decoder mean of z.
      z, mu, log_var: (B, Z) the sample and the encoder's q(z|x).
      log_sigma: the decoder's scalar log sigma.
    Returns:
      (B,). With K samples, -(logsumexp_k log w_k - log K) is the importance-weighted
      bound on -log p(x) (Burda et al. 2016): for K = 1 it is the single-sample -ELBO,
      and it does not increase (in expectation) as K grows.
    """
    log_px_z = -tf.reduce_sum(gaussian_nll(x, x_hat, log_sigma), axis=tf.range(1, tf.rank(x)))
    zeros = tf.zeros_like(z)
    return log_px_z + log_normal(z, zeros, zeros) - log_normal(z, mu, log_var)


def bits_per_dim(nats, num_values, log_scale=math.log(127.5)):
    """Nats per image -> bits per value on the 0-255 scale.

    Mapping [-1, 1] to [0, 255] multiplies by 127.5, which divides the density
    by 127.5 per value: (nats + D ln 127.5) / (D ln 2). For data in [0, 1] pass
    log_scale = ln 255.
    """
    return (nats + num_values * log_scale) / (num_values * math.log(2.0))

"""The VAE objective and the decoder likelihoods p(x|z): the file to edit.

A VAE maximises the evidence lower bound (ELBO) of each image x,

    log p(x) >= ELBO(x) = E_q(z|x)[log p(x|z)] - KL(q(z|x) || N(0, I)),

and is trained on  loss = rec + beta * kl,  rec = -E_q[log p(x|z)].  With a
Gaussian decoder p(x|z) = N(x_hat(z), sigma^2 I) over the D values of an image,

    -log p(x|z) = sum_i [ (x_i - x_hat_i)^2 / (2 sigma^2) + log sigma + log(2 pi) / 2 ].

sigma sets the balance between the two terms: for a fixed sigma the NLL is the
summed squared error weighted by 1 / (2 sigma^2). The sigma-VAE (Rybkin,
Daniilidis, Levine, "Simple and Effective VAE Training with Calibrated Decoders",
ICML 2021, arXiv:2006.13202) learns one log sigma shared by all values (`sigma`),
or solves for it in closed form on every batch (`optimal`):

    sigma*^2 = mean over batch and values of (x - x_hat)^2,

the minimiser of the summed NLL over sigma. Both keep beta = 1.

The decoders (DECODERS; x in [-1, 1] unless --data_range 0,1):

    mse            the original's baseline: rec = mean over batch and values of
                   (x - x_hat)^2, kl averaged too; evaluated as `gaussian`
    gaussian       N(x_hat, 1)
    sigma          N(x_hat, sigma^2), one trainable log sigma shared by all values
    optimal        N(x_hat, sigma*^2), sigma*^2 = the MSE of the global batch
    optimal_image  N(x_hat, sigma_i*^2), sigma_i*^2 = the MSE of image i
    sigma_pixel    N(x_hat, sigma(z)^2), log sigma predicted for every value by the
                   decoder (the "naive" learned variance the paper argues against)
    logistic       discretized logistic(x_hat, s(z)) over the 256 levels of each value,
                   log s predicted for every value (PixelCNN++, IAF-VAE)

Every log sigma (and the logistic's log s) is soft-clipped from below (`softclip`,
minimum --log_sigma_min, -6 by default) so that it cannot run to -inf on values the
decoder reconstructs perfectly. At test time `optimal` and `optimal_image` use a
running average of the training sigma*^2: a likelihood must not look at x to pick sigma.

Every decoder also gives the probability of the 8-bit values (`discrete_nll`): the
mass of each value's bin [x - w/2, x + w/2], w = one level, the first bin open to
-inf and the last to +inf, so that bits/dim compare with published likelihoods.

Adding a decoder: subclass `Likelihood` (or `Gaussian`, choosing log sigma), and add
one line to DECODERS; the trainer, the evaluation and the comparison take it from there.

A training step's loss and metrics, for any decoder, on one device or per replica of a
tf.distribute strategy: `vae_loss` (train.py's Trainer and models.FitVAE, Keras' fit, call it).
Two heuristics of deep VAEs, off by default, are options of it: a KL warm-up (`kl_weight`,
the Ladder VAE's and NVAE's) and free bits per latent group (`free_bits_kl`, IAF-VAE's).
This file imports only math, keras and tensorflow: copy it into a project of your own.
"""
import math

import keras
import tensorflow as tf

LOG_2PI = math.log(2.0 * math.pi)


# ---- elementwise math ---------------------------------------------------------

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
    """KL(N(mu, exp(log_var)) || N(0, I)) per latent dimension.

    Args:
      mu, log_var: (B, Z) encoder outputs.
    Returns:
      (B, Z): -0.5 (1 + log_var - mu^2 - exp(log_var)); sum over Z for the KL of an image.
    """
    return -0.5 * (1.0 + log_var - tf.square(mu) - tf.exp(log_var))


def softclip(t, minimum):
    """A smooth lower bound: minimum + softplus(t - minimum), ~t for t >> minimum."""
    return minimum + tf.nn.softplus(t - minimum)


def clip_log_sigma(log_sigma, log_sigma_min):
    """softclip(log_sigma, log_sigma_min), or log_sigma itself when log_sigma_min is None."""
    return log_sigma if log_sigma_min is None else softclip(log_sigma, log_sigma_min)


def optimal_log_sigma(mean_squared_error):
    """log sigma* = log sqrt(MSE): the sigma that minimises the summed Gaussian NLL
    of residuals whose mean square is `mean_squared_error` (any shape)."""
    return 0.5 * tf.math.log(mean_squared_error)


def per_image_mean(t):
    """(B, ...) -> (B,): the mean over everything but the first axis."""
    return tf.reduce_mean(tf.reshape(t, (tf.shape(t)[0], -1)), axis=1)


def per_image_sum(t):
    """(B, ...) -> (B,): the sum over everything but the first axis."""
    return tf.reduce_sum(tf.reshape(t, (tf.shape(t)[0], -1)), axis=1)


def log_normal(z, mu, log_var):
    """log N(z; mu, diag(exp(log_var))) summed over the last axis: (..., Z) -> (...)."""
    return -0.5 * tf.reduce_sum(LOG_2PI + log_var + tf.square(z - mu) * tf.exp(-log_var), axis=-1)


def log_importance_weights(nll, z, mu, log_var):
    """log w = log p(x|z) + log p(z) - log q(z|x) for one z per image.

    Args:
      nll: (B,) -log p(x|z) of each image under its z (any likelihood, continuous or discrete).
      z, mu, log_var: (B, Z) the sample and the encoder's q(z|x).
    Returns:
      (B,). With K samples, -(logsumexp_k log w_k - log K) is the importance-weighted
      bound on -log p(x) (Burda et al. 2016): for K = 1 it is the single-sample -ELBO,
      and it does not increase (in expectation) as K grows.
    """
    return -nll + log_normal(z, tf.zeros_like(z), tf.zeros_like(z)) - log_normal(z, mu, log_var)


def bits_per_dim(nats, num_values, log_scale):
    """Nats per image of a density on the data scale -> bits per value on the 0-255 scale.

    Mapping [-1, 1] to [0, 255] multiplies by 127.5, which divides the density
    by 127.5 per value: (nats + D ln 127.5) / (D ln 2); log_scale is the likelihood's
    log_data_scale (ln 127.5 for [-1, 1], ln 255 for [0, 1]). A probability of 8-bit values
    needs no shift: log_scale = 0.
    """
    return (nats + num_values * log_scale) / (num_values * math.log(2.0))


def log_ndtr(t):
    """log Phi(t), the log CDF of N(0, 1), accurate in float32 from t = -inf to +inf.

    log(0.5 erfc(-t / sqrt 2)) in [-10, 5]; above, log1p(-Phi(-t)); below, the asymptotic
    series log Phi(t) = -t^2/2 - log(-t) - log(2 pi)/2 + log(1 - 1/t^2 + 3/t^4 - 15/t^6 + 105/t^8),
    whose next term is below 1e-7 there. Each branch sees a clamped t, so that the branches
    not taken give no inf or nan gradient.
    """
    low, high = -10.0, 5.0
    ndtr = lambda u: 0.5 * tf.math.erfc(-u / math.sqrt(2.0))
    middle = tf.math.log(ndtr(tf.clip_by_value(t, low, high)))
    above = tf.math.log1p(-ndtr(-tf.maximum(t, high)))
    u = tf.minimum(t, low)
    r = 1.0 / tf.square(u)
    series = 1.0 + r * (-1.0 + r * (3.0 + r * (-15.0 + r * 105.0)))
    below = -0.5 * tf.square(u) - tf.math.log(-u) - 0.5 * LOG_2PI + tf.math.log(series)
    return tf.where(t > high, above, tf.where(t < low, below, middle))


def log_diff_exp(a, b):
    """log(exp(a) - exp(b)) for a > b, without forming exp(a) - exp(b)."""
    return a + tf.math.log(-tf.math.expm1(tf.minimum(b - a, -1e-12)))


def log_bin_mass(log_cdf, lower, upper, first, last):
    """log P(lower < t < upper) of a distribution symmetric about 0, from its log CDF.

    Args:
      log_cdf: elementwise log F(t) of the standardized distribution (F(-t) = 1 - F(t)).
      lower, upper: standardized bin edges, (x - w/2 - loc) / scale and (x + w/2 - loc) / scale.
      first, last: booleans of the same shape; the first bin is open to -inf, the last to +inf.
    Returns:
      log(F(upper) - F(lower)), computed in the lower tail (a bin above the centre is
      mirrored), where log F keeps its precision: F(upper) - F(lower) itself loses
      everything in float32 when both are close to 1.
    """
    mirrored = lower + upper > 0
    lo = tf.where(mirrored, -upper, lower)
    hi = tf.where(mirrored, -lower, upper)
    inner = log_diff_exp(log_cdf(hi), log_cdf(lo))
    return tf.where(first, log_cdf(upper), tf.where(last, log_cdf(-lower), inner))


# ---- the metrics ---------------------------------------------------------------

# The names of the metrics of training and test alike (per-image means; `summarize`).
METRICS = ('loss', 'rec', 'kl', 'neg_elbo', 'bits_per_dim', 'log_sigma')


def summarize(rec, kl, log_sigma, beta, num_values, log_scale):
    """Per-image means (nats, on the data scale) -> {name: value} of METRICS.

    rec = -log p(x|z), kl = KL(q(z|x) || p(z)); neg_elbo = rec + kl, loss = rec + beta kl,
    bits_per_dim = neg_elbo in bits per value on the 0-255 scale (see bits_per_dim);
    log_sigma is the likelihood's (the mean over values where sigma is predicted per value).
    """
    return {'loss': rec + beta * kl, 'rec': rec, 'kl': kl, 'neg_elbo': rec + kl,
            'bits_per_dim': bits_per_dim(rec + kl, num_values, log_scale), 'log_sigma': log_sigma}


# ---- the heuristics of deep VAEs ------------------------------------------------

def kl_weight(beta, step, warmup):
    """The KL weight at `step` (0 for the first update) of a linear warm-up over `warmup` steps:
    beta min(1, step / warmup), from 0 to beta (Sonderby et al. 2016); beta itself when warmup
    is None. A float32 scalar tensor (or beta)."""
    if warmup is None:
        return beta
    ramp = tf.minimum(1.0, tf.cast(step, tf.float32) / float(warmup))
    return beta * ramp


def free_bits_kl(kl_groups, free_bits, global_mean=tf.reduce_mean):
    """Free bits (Kingma et al. 2016, IAF-VAE): the KL of each latent group counts as
    max(lambda, its mean over the global batch), and a group below lambda gets no gradient.

    Args:
      kl_groups: a list of (b, Z_l) per-dimension KLs, one per latent group (one group, the
        whole z, for a network with a single latent).
      free_bits: lambda, nats per group (per image).
      global_mean: (b,) -> their mean over the global batch (see vae_loss).
    Returns:
      A list of (b, Z_l) to use as the KL values of the loss: a group's own values where its
      batch mean is above lambda, else the constant lambda / Z_l everywhere. Summed over the
      dimensions of a group and the global batch's n images it is n max(lambda, mean KL_l),
      and its gradient is the KL's where the mean is above lambda, 0 below (a replica's sum
      is its share: the replicas' sums add up to the global batch's).
    """
    out = []
    for kl in kl_groups:
        mean = global_mean(tf.reduce_sum(kl, -1))
        floor = tf.fill(tf.shape(kl), free_bits / tf.cast(tf.shape(kl)[-1], kl.dtype))
        out.append(tf.where(tf.stop_gradient(mean) > free_bits, kl, floor))
    return out


# ---- one step's loss: what every training loop calls ---------------------------

def vae_loss(likelihood, x, params, mu, log_var, beta=1.0, global_mean=None, global_batch=None,
             *, training, reduction='sum', free_bits=None, groups=None):
    """The loss of one batch and its metrics, for any decoder of DECODERS, on one device or
    on each replica of a tf.distribute strategy.

    Args:
      likelihood: a Likelihood (e.g. DECODERS['optimal'](data_range=(-1, 1))); x outside its
        data range is refused (InvalidArgumentError, where TensorFlow runs asserts: not in XLA).
      x: (b, H, W, C) images in the likelihood's data range: this replica's part of the batch.
      params: (b, H, W, C * likelihood.params_per_value) the decoder's output at a z drawn
        from q(z|x) (the mean first, see Likelihood).
      mu, log_var: (b, Z) the encoder's q(z|x).
      beta: the weight of the KL term (1 for the sigma-VAE).
      global_mean: (b,) per-image values of this replica -> their mean over the global
        batch, a scalar; None: `replica_mean`, the global batch's under the strategy that
        runs the step (the batch itself on one device). The optimal sigma* and the metrics
        are means over the global batch.
      global_batch: the number of images of the global batch (int or scalar tensor); None:
        `replica_batch(x)`.
      training: True for a training step (train_terms: the batch's sigma*, running
        statistics updated); False for evaluation (test_terms: no look at x to pick sigma:
        a test step must say False, or `optimal` would pick its sigma from the test batch).
      reduction: 'sum' (the paper's objective: summed over the images, values and latent
        dimensions; `mse`'s the original's means) or 'mean' (that, per image of the global
        batch: what a Keras user expects of a loss, the same minimisers, gradients 1/N the size).
      free_bits: None, or lambda of free_bits_kl: the training loss counts the KL of each
        latent group as max(lambda, its batch mean); the metrics keep the true KL.
      groups: the sizes Z_l of the latent groups whose concatenation is z, for free bits
        (networks.Hierarchical: the KL of each is KL(N(mu, exp(log_var)) || N(0, I)) over its
        dimensions); None: one group, the whole z.
    Returns:
      (loss, metrics). loss, a scalar: what to minimise, this replica's share of the global
      batch's objective (see `reduction` and Likelihood.reduce), so that the replicas'
      gradients add up to the global batch's; training=False gives rec + beta kl summed (or
      averaged) over the replica's images. metrics: {name: scalar} of METRICS, per-image means
      over the global batch (see summarize), the same on every replica; with training=False
      also bits_per_dim_discrete, the bits/dim of the 8-bit values.
    """
    if reduction not in ('sum', 'mean'):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    global_mean = global_mean or replica_mean
    global_batch = replica_batch(x) if global_batch is None else global_batch
    likelihood.check_range(x)
    num_values = math.prod(x.shape[1:])  # D, values per image (static)
    if training:
        objective, rec, log_sigma = likelihood.train_terms(x, params, global_mean)
        kl = kl_loss = kl_divergence(mu, log_var)
        if free_bits is not None:
            kl_loss = tf.concat(free_bits_kl([kl] if groups is None else tf.split(kl, groups, -1),
                                             free_bits, global_mean), -1)
        rec_term, kl_term = likelihood.reduce(objective, kl_loss, global_batch,
                                              mean=reduction == 'mean')
        loss = rec_term + beta * kl_term
        kl_image = tf.reduce_sum(kl, -1)
    else:
        rec, discrete, log_sigma = likelihood.test_terms(x, params)
        kl_image = tf.reduce_sum(kl_divergence(mu, log_var), -1)
        loss = tf.reduce_sum(rec) + beta * tf.reduce_sum(kl_image)
        if reduction == 'mean':
            loss = loss / tf.cast(global_batch, loss.dtype)
    metrics = summarize(global_mean(rec), global_mean(kl_image), global_mean(log_sigma), beta,
                        num_values, likelihood.log_data_scale)
    if not training:
        metrics['bits_per_dim_discrete'] = bits_per_dim(global_mean(discrete) + metrics['kl'],
                                                        num_values, 0.0)
    return loss, metrics


def replica_mean(values):
    """(b,) per-image values of this replica -> their mean over the global batch of all
    replicas (an all-reduce of sums and counts; the mean itself on one device). Call it
    inside strategy.run (Keras 3's fit runs train_step there); in a cross-replica context,
    the mean of `values`."""
    replica = tf.distribute.get_replica_context()
    if replica is None:
        return tf.reduce_mean(values)
    sums = replica.all_reduce('sum', [tf.reduce_sum(values), tf.cast(tf.size(values), tf.float32)])
    return sums[0] / sums[1]


def replica_batch(x):
    """The number of images of the global batch, from this replica's part x (b, ...): every
    replica gets b of them (batches with drop_remainder)."""
    replica = tf.distribute.get_replica_context()
    return tf.shape(x)[0] * (1 if replica is None else replica.num_replicas_in_sync)


# ---- the decoders -------------------------------------------------------------

class Likelihood(keras.layers.Layer):
    """A decoder likelihood p(x|z): one entry of DECODERS, everything that differs by model.

    The decoder outputs `params_per_value` numbers for every value of x, stacked along the
    channel axis as `params` (B, H, W, C * params_per_value): the first C are the mean
    (after the output activation), the others are raw (e.g. a log scale). A likelihood
    may hold weights (a trainable log sigma, running statistics); the VAE tracks them, so
    they are trained and checkpointed with the networks.

    A subclass defines `nll_values` and `discrete_log_prob`; it may override
    `train_terms` (what the training objective sums) and `reduce` (sum or mean).
    `global_mean` is the trainer's hook: (B,) per-image values of this replica -> their
    mean over the global batch of all replicas (tf.reduce_mean on one device).
    """
    params_per_value = 1

    def __init__(self, data_range, log_sigma_min=-6.0, **kwargs):
        """data_range: (low, high) of the data, (-1, 1) or (0, 1): stated, not assumed, since
        bits/dim and the 8-bit bins are on it; log_sigma_min: the soft lower bound of log sigma
        (None: none)."""
        super().__init__(dtype='float32', **kwargs)
        self.low, self.high = (float(v) for v in data_range)
        if not self.low < self.high:
            raise ValueError(f'data_range must be (low, high) with low < high, got {data_range}')
        self.bin_width = (self.high - self.low) / 255.0  # one 8-bit level on the data scale
        # ln of the factor from the data scale to 0-255, for bits/dim (see bits_per_dim)
        self.log_data_scale = math.log(255.0 / (self.high - self.low))
        self.log_sigma_min = log_sigma_min

    def get_config(self):  # for Keras' saving of a whole model (.keras)
        config = {k: v for k, v in super().get_config().items() if k != 'dtype'}
        return {**config, 'data_range': (self.low, self.high), 'log_sigma_min': self.log_sigma_min}

    def check_range(self, x):
        """Refuses (InvalidArgumentError) images x outside [low, high], beyond rounding: the
        likelihood of data on another scale is silently wrong (its bits/dim, its 8-bit bins).
        TensorFlow runs these asserts eagerly and in graphs, not in XLA."""
        slack = 1e-3 * (self.high - self.low)
        message = (f'x holds values outside the likelihood\'s data range [{self.low:g}, '
                   f'{self.high:g}]: make the likelihood with the range of the data')
        tf.debugging.assert_greater_equal(tf.reduce_min(x), self.low - slack, message=message)
        tf.debugging.assert_less_equal(tf.reduce_max(x), self.high + slack, message=message)

    def split(self, params):
        """params (B, H, W, C * P) -> P tensors (B, H, W, C); the first is the mean."""
        return tf.split(params, self.params_per_value, axis=-1)

    def mean(self, params):
        """The decoder mean x_hat (B, H, W, C): what images and the test MSE show."""
        return self.split(params)[0]

    def nll_values(self, x, params, training=False, global_mean=tf.reduce_mean):
        """Elementwise -log p(x|z) (x's shape; nats, density on the data scale) and the
        log sigma used, broadcastable to x. training=True may update running statistics."""
        raise NotImplementedError

    def discrete_log_prob(self, x, params):
        """Elementwise log probability of the 8-bit value of x (x's shape)."""
        raise NotImplementedError

    def train_terms(self, x, params, global_mean=tf.reduce_mean):
        """One training batch: (objective values of x's shape, -log p(x|z) (B,), log sigma (B,))."""
        values, log_sigma = self.nll_values(x, params, True, global_mean)
        return values, per_image_sum(values), per_image_mean(log_sigma + tf.zeros_like(x))

    def fit_statistics(self, batches):
        """Sets the running statistics this likelihood keeps in training (none here) to their
        averages over `batches`, pairs (x, params) of training images and the decoder's output
        under the weights to evaluate (models.recompute_statistics)."""

    def test_terms(self, x, params):
        """Evaluation: (-log p(x|z) (B,), -log P(8-bit x|z) (B,), log sigma (B,)), in nats."""
        values, log_sigma = self.nll_values(x, params)
        return (per_image_sum(values), -per_image_sum(self.discrete_log_prob(x, params)),
                per_image_mean(log_sigma + tf.zeros_like(x)))

    def reduce(self, objective_values, kl_values, global_batch, mean=False):
        """The two terms of this replica's training loss: sums over its images, values and
        latent dimensions, so that the replicas' gradients add up to the global batch's; with
        `mean`, divided by the global batch's number of images."""
        rec, kl = tf.reduce_sum(objective_values), tf.reduce_sum(kl_values)
        if mean:
            n = tf.cast(global_batch, tf.float32)
            rec, kl = rec / n, kl / n
        return rec, kl

    def effective_beta(self, beta, log_sigma, num_values, z_dim):
        """The KL weight of the `gaussian` decoder (sigma = 1) whose objective has the same
        minimisers as this decoder's with KL weight beta and (test) log sigma, or a summary of
        it where no single weight does; None for a likelihood that is not Gaussian."""
        return None

    def bins(self, x, loc, scale):
        """Standardized edges of the 8-bit bin of every value of x, and the open edge bins.

        Returns (lower, upper, first, last): (edge - loc) / scale for the edges x -+ w/2 of
        the level nearest to x, and booleans marking level 0 and level 255.
        """
        level = tf.clip_by_value(tf.round((x - self.low) / self.bin_width), 0.0, 255.0)
        # Each edge from its own index (level -+ 1/2), so that the upper edge of one bin is the
        # lower edge of the next to the last bit: centre -+ w/2 rounds the two differently in
        # float32, and with a scale near e^-6 the 256 masses then missed 1 by up to 2e-5.
        lower = (self.low + (level - 0.5) * self.bin_width - loc) / scale
        upper = (self.low + (level + 0.5) * self.bin_width - loc) / scale
        return lower, upper, level <= 0.0, level >= 255.0


class Gaussian(Likelihood):
    """N(x_hat, sigma^2) for every value with sigma = 1 (`gaussian`); subclasses choose sigma."""

    def choose_log_sigma(self, x, params, training, global_mean):
        """log sigma, broadcastable to x. training: one training batch, else evaluation."""
        return tf.zeros(())

    def nll_values(self, x, params, training=False, global_mean=tf.reduce_mean):
        log_sigma = self.choose_log_sigma(x, params, training, global_mean)
        return gaussian_nll(x, self.mean(params), log_sigma), log_sigma

    def discrete_log_prob(self, x, params):
        log_sigma = self.choose_log_sigma(x, params, False, None)
        return log_bin_mass(log_ndtr, *self.bins(x, self.mean(params), tf.exp(log_sigma)))

    def effective_beta(self, beta, log_sigma, num_values, z_dim):
        """sum (x - x_hat)^2 / (2 sigma^2) + beta KL is sigma^-2 (sum (x - x_hat)^2 / 2 + beta
        sigma^2 KL): the gaussian objective with KL weight beta sigma^2, scaled. Exact for a sigma
        shared by the values of a batch; where sigma differs by image or by value (optimal_image,
        sigma_pixel) the squared errors are weighted unequally and no beta gives the same
        objective: then log_sigma is the mean log sigma and beta sigma^2 (a geometric mean) only
        a summary."""
        return beta * math.exp(2.0 * log_sigma)


class MSE(Gaussian):
    """The original's "don't do this" baseline: the mean over batch and values of
    (x - x_hat)^2, with the KL averaged over batch and latent dimensions. It has no
    sigma; it is evaluated as a Gaussian with sigma = 1."""

    def train_terms(self, x, params, global_mean=tf.reduce_mean):
        values, nll, log_sigma = super().train_terms(x, params, global_mean)
        return tf.square(x - self.mean(params)), nll, log_sigma

    def effective_beta(self, beta, log_sigma, num_values, z_dim):
        """mean (x - x_hat)^2 + beta mean KL = 2 / (N D) (sum (x - x_hat)^2 / 2 + beta D / (2 Z)
        sum KL): the gaussian objective with KL weight beta D / (2 Z), scaled."""
        return beta * num_values / (2.0 * z_dim)

    def reduce(self, objective_values, kl_values, global_batch, mean=False):
        """Means over the global batch (whose size a replica's sums are divided by), whatever
        `mean` says: the original's objective is a mean already."""
        n = tf.cast(global_batch, tf.float32)
        values_per_image = tf.cast(tf.size(objective_values[0]), tf.float32)
        return (tf.reduce_sum(objective_values) / (n * values_per_image),
                tf.reduce_sum(kl_values) / (n * tf.cast(tf.shape(kl_values)[-1], tf.float32)))


class SharedSigma(Gaussian):
    """One trainable log sigma shared by all values, initialised at 0 (soft-clipped)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.log_sigma = self.add_weight(shape=(), initializer='zeros', name='log_sigma')

    def choose_log_sigma(self, x, params, training, global_mean):
        return clip_log_sigma(self.log_sigma, self.log_sigma_min)


class OptimalSigma(Gaussian):
    """sigma*^2 = the MSE of the global batch, in closed form (soft-clipped).

    The gradient flows through sigma*; at the optimum dL/dsigma = 0, so stopping it would
    give the network the same gradient. Evaluation uses a debiased exponential moving
    average of the training batches' sigma*^2 (0.99 a step): a likelihood must not look at
    the test image to choose its sigma. A loaded model recomputes it under the weights it
    evaluates (`fit_statistics`): the moving average of the weights (--ema) has another MSE.
    """
    decay = 0.99

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Every replica sees the same global average: the first replica's update is kept.
        self.sigma2_avg, self.sigma2_weight = (
            self.add_weight(shape=(), initializer='zeros', trainable=False, name=name,
                            aggregation='only_first_replica')
            for name in ('sigma2_avg', 'sigma2_weight'))

    def batch_log_sigma(self, x, params, global_mean):
        """The training batch's sigma* (before the clip), broadcastable to x."""
        return optimal_log_sigma(global_mean(per_image_mean(tf.square(x - self.mean(params)))))

    def choose_log_sigma(self, x, params, training, global_mean):
        if not training:
            w = self.sigma2_weight
            return tf.where(w > 0, 0.5 * tf.math.log(self.sigma2_avg / tf.maximum(w, 1e-12)), 0.0)
        log_sigma, sigma2 = self.batch_sigma(x, params, global_mean)
        self.sigma2_avg.assign(self.decay * self.sigma2_avg + (1 - self.decay) * sigma2)
        self.sigma2_weight.assign(self.decay * self.sigma2_weight + (1 - self.decay))
        return log_sigma

    def batch_sigma(self, x, params, global_mean):
        """The batch's clipped log sigma* (broadcastable to x) and its mean sigma*^2."""
        log_sigma = clip_log_sigma(self.batch_log_sigma(x, params, global_mean), self.log_sigma_min)
        return log_sigma, global_mean(per_image_mean(tf.exp(2.0 * log_sigma) + tf.zeros_like(x)))

    def fit_statistics(self, batches):
        """The average sigma*^2 of the batches, with weight 1 (the debiased average's)."""
        sigma2 = [float(self.batch_sigma(x, params, tf.reduce_mean)[1]) for x, params in batches]
        if sigma2:
            self.sigma2_avg.assign(sum(sigma2) / len(sigma2))
            self.sigma2_weight.assign(1.0)


class OptimalImageSigma(OptimalSigma):
    """sigma_i*^2 = the MSE of each image (not of the batch); evaluated as `optimal`."""

    def batch_log_sigma(self, x, params, global_mean):
        mse = per_image_mean(tf.square(x - self.mean(params)))
        return optimal_log_sigma(mse)[:, None, None, None]


class PixelSigma(Gaussian):
    """log sigma(z) for every value, the decoder's second output (soft-clipped)."""
    params_per_value = 2

    def choose_log_sigma(self, x, params, training, global_mean):
        return clip_log_sigma(self.split(params)[1], self.log_sigma_min)


class DiscretizedLogistic(Likelihood):
    """The probability of each 8-bit value under a logistic(x_hat, s) with log s predicted
    for every value (soft-clipped), its CDF sigmoid((t - x_hat) / s) integrated over the
    value's bin; the first and last bins are open (PixelCNN++, Salimans et al. 2017).

    As a density on the data scale it is P / w inside each bin (w = one level), so its
    continuous and discrete bits/dim are the same number.
    """
    params_per_value = 2

    def log_scale(self, params):
        return clip_log_sigma(self.split(params)[1], self.log_sigma_min)

    def discrete_log_prob(self, x, params):
        scale = tf.exp(self.log_scale(params))
        return log_bin_mass(tf.math.log_sigmoid, *self.bins(x, self.mean(params), scale))

    def nll_values(self, x, params, training=False, global_mean=tf.reduce_mean):
        return (-self.discrete_log_prob(x, params) + math.log(self.bin_width),
                self.log_scale(params))


# name -> Likelihood class; constructed as cls(data_range=(low, high), log_sigma_min=m).
DECODERS = {
    'mse': MSE,
    'gaussian': Gaussian,
    'sigma': SharedSigma,
    'optimal': OptimalSigma,
    'optimal_image': OptimalImageSigma,
    'sigma_pixel': PixelSigma,
    'logistic': DiscretizedLogistic,
}
for _cls in DECODERS.values():  # known to keras.saving by name, e.g. 'sigma_vae>OptimalSigma'
    keras.saving.register_keras_serializable('sigma_vae')(_cls)

"""The VAE: a Keras model of an encoder, a decoder (networks.py) and a likelihood (losses.py),
with its objective and test metrics, and what the commands do with a run's VAE (make it, encode
and decode in batches, recompute batch norm's statistics).
"""
import contextlib
import functools
import math
import warnings

import keras
import numpy as np
import tensorflow as tf

import data
import losses
import networks
import utils


def reparameterize(mu, log_var, eps):
    """z = mu + sigma * eps, sigma = exp(log_var / 2): a sample of q(z|x) = N(mu, sigma^2)
    that gradients flow through (Kingma and Welling 2014). Any leading shape."""
    return mu + tf.exp(0.5 * log_var) * eps


def forward(encoder, decoder, x, eps=None, training=False):
    """x (B, S, S, C) -> (params, mu, log_var) of a VAE's encoder and decoder: the decoder's
    output at z = reparameterize(mu, log_var, eps), or at the posterior's mean when eps is None.

    An encoder of one input gives q(z|x) = N(mu, exp(log_var)) and the decoder maps z. An
    encoder of two inputs (x, eps) runs the whole pass itself, as a hierarchical one must (the
    posterior of a lower group depends on the sampled groups above): it returns the decoder's
    output first, and (mu, log_var) of the sampled path (Hierarchical).

    eps (K, B, Z), K samples per image: params, mu and log_var of the K B pairs, sample k of
    image b at row k B + b (an encoder of one input runs once).
    """
    several = eps is not None and len(eps.shape) == 3
    repeat = lambda t: tf.reshape(tf.repeat(t[None], tf.shape(eps)[0], axis=0),
                                  (-1,) + tuple(t.shape[1:]))
    if len(encoder.inputs) == 2:
        if eps is None:
            eps = tf.zeros((tf.shape(x)[0], encoder.inputs[1].shape[-1]))
        if several:
            x, eps = repeat(x), tf.reshape(eps, (-1, eps.shape[-1]))
        return tuple(encoder([x, eps], training=training)[:3])
    mu, log_var = encoder(x, training=training)[:2]  # a third output (a z of its own): unused
    z = mu if eps is None else reparameterize(mu, log_var, eps)
    if several:
        z, mu, log_var = tf.reshape(z, (-1, z.shape[-1])), repeat(mu), repeat(log_var)
    return decoder(z, training=training), mu, log_var


def replica_noise(shape, seed, step):
    """eps ~ N(0, I) for this replica's rows of the global batch, drawn from (seed, step).

    shape: (b, Z), this replica's part (b images) of a global batch of b * replicas. The
    global batch's noise is one draw, whatever the number of replicas: replica r gets its
    rows r b to (r + 1) b, so one step on several devices is the step on one.
    """
    replica = tf.distribute.get_replica_context()
    b = shape[0]
    eps = tf.random.stateless_normal(
        (b * replica.num_replicas_in_sync, shape[1]),
        seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)]))
    return eps[replica.replica_id_in_sync_group * b:][:b]


@keras.saving.register_keras_serializable('sigma_vae')
class VAE(keras.Model):
    """A VAE of any encoder, decoder and decoder likelihood, and its objective: trained by
    train.py's Trainer (trainer.py), or by Keras' compile / fit / evaluate.

    encoder: (B, H, W, C) -> (mu, log_var), each (B, Z) (or a whole pass, see `forward`);
    decoder: (B, Z) -> (B, H, W, C * likelihood.params_per_value), the mean first (see
    losses.Likelihood); likelihood: a losses.DECODERS entry, e.g. losses.DECODERS['optimal']((-1, 1))
    for the sigma-VAE, whose weights (a trainable log sigma, running statistics) are trained and
    checkpointed with the networks. groups: the sizes of the latent groups that z concatenates,
    top first (None: one group of Z). beta, kl_warmup (steps) and free_bits (nats): train.py's
    --beta, --kl_warmup and --free_bits (losses.kl_weight, losses.free_bits_kl).

        vae = VAE(encoder, decoder, losses.DECODERS['optimal'](data_range=(-1, 1)))
        vae.compile(keras.optimizers.Adam(1e-3))
        vae.fit(train_ds, epochs=1); vae.evaluate(test_ds, return_dict=True)

    `objective` is one step's loss and metrics (losses.vae_loss), with the tf.distribute hooks
    (losses.replica_mean, losses.replica_batch): under a strategy (build and compile in its
    scope) the optimal sigma* and the metrics are the global batch's, and the replicas'
    gradients add up to the global batch's. The noise of step s is drawn for the global batch
    from (seed, s); `fit`'s step is the optimizer's iteration count. `test_sums` are the test
    metrics of a batch, which `test_metrics` (the Trainer, evaluate.py) and Keras' evaluate()
    average alike; evaluate() draws its noise from (seed, -1 - iterations).
    """

    def __init__(self, encoder, decoder, likelihood, beta=1.0, seed=0, kl_warmup=None,
                 free_bits=None, groups=None, **kwargs):
        check_objective(likelihood, beta, kl_warmup, free_bits)
        if len(encoder.inputs) == 1 and len(encoder.outputs) == 3:
            warnings.warn('the encoder\'s third output (a z of its own) is not used: the VAE '
                          'draws z from its (mu, log_var) itself', stacklevel=2)
        # The VAE's own inputs, noise and outputs stay float32 under mixed precision; its
        # encoder and decoder compute in the global policy's dtype.
        kwargs.setdefault('dtype', 'float32')
        super().__init__(**kwargs)
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.beta, self.seed = float(beta), int(seed)
        self.kl_warmup, self.free_bits = kl_warmup, free_bits
        self.z_dim = decoder.inputs[0].shape[-1]
        self.groups = [self.z_dim] if groups is None else list(groups)  # top first
        self.image_shape = tuple(encoder.inputs[0].shape[1:])
        # Keras' metrics of fit and evaluate (their variables are not in a checkpoint's graph).
        self.trackers = {k: keras.metrics.Mean(name=k) for k in losses.METRICS + (
            'discrete', 'mse') + tuple(f'kl_group{l}' for l in range(len(self.groups))
                                       if len(self.groups) > 1)}
        self.built = True  # the encoder and decoder are built networks

    def get_config(self):  # for Keras' saving of the whole model (.keras, ModelCheckpoint)
        nets = {k: keras.saving.serialize_keras_object(getattr(self, k))
                for k in ('encoder', 'decoder', 'likelihood')}
        return {'name': self.name, **nets, 'beta': self.beta, 'seed': self.seed,
                'kl_warmup': self.kl_warmup, 'free_bits': self.free_bits, 'groups': self.groups}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for k in ('encoder', 'decoder', 'likelihood'):
            config[k] = keras.saving.deserialize_keras_object(config[k])
        return cls(**config)

    def call(self, x, eps=None, training=False):
        """x (B, S, S, C) -> (params, mu, log_var), float32; z = mu when eps is None.

        params: the decoder's output, (B, S, S, C * params_per_value); see losses.Likelihood.
        """
        return forward(self.encoder, self.decoder, x, eps, training)

    def decode(self, z):
        """z (B, Z) -> the decoder mean x_hat (B, S, S, C), in evaluation mode."""
        return self.likelihood.mean(self.decoder(z, training=False))

    def reconstruct(self, x):
        """x (B, S, S, C) -> the decoder mean at z = mu, in evaluation mode."""
        return self.likelihood.mean(self(x)[0])

    # ---- training -------------------------------------------------------------------

    def objective(self, x, step):
        """This replica's part x (b, S, S, C) of a global training batch at `step` -> (loss, this
        replica's share of the global batch's objective; {name: value} of losses.METRICS, the
        global batch's)."""
        eps = replica_noise((tf.shape(x)[0], self.z_dim), self.seed, step)
        params, mu, log_var = self(x, eps, training=True)
        return losses.vae_loss(
            self.likelihood, x, params, mu, log_var,
            losses.kl_weight(self.beta, step, self.kl_warmup), losses.replica_mean,
            losses.replica_batch(x), training=True, free_bits=self.free_bits, groups=self.groups)

    def train_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data  # images, or (images, labels)
        with tf.GradientTape() as tape:
            loss, stats = self.objective(x, self.optimizer.iterations)
            scaled = self.optimizer.scale_loss(loss)
        gradients = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        for name, value in stats.items():
            self.trackers[name].update_state(value)
        return {name: self.trackers[name].result() for name in stats}

    # ---- test metrics ----------------------------------------------------------------

    def test_sums(self, x, eps):
        """{name: sum over a test batch x}: rec, kl, log sigma, discrete (the 8-bit values' rec),
        mse (per value, of the reconstruction from z = mu), with several latent groups the KL
        of each (kl_group<l>, top first), and count (the images); eps: the noise of z."""
        params, mu, log_var = self(x, eps, training=False)
        rec, discrete, log_sigma = self.likelihood.test_terms(x, params)
        kl = losses.kl_divergence(mu, log_var)
        terms = {'rec': rec, 'kl': tf.reduce_sum(kl, -1), 'log_sigma': log_sigma,
                 'discrete': discrete,
                 'mse': losses.per_image_mean(tf.square(x - self.reconstruct(x)))}
        if len(self.groups) > 1:
            terms.update((f'kl_group{l}', tf.reduce_sum(k, -1))
                         for l, k in enumerate(tf.split(kl, self.groups, -1)))
        sums = {k: tf.reduce_sum(v) for k, v in terms.items()}
        sums['count'] = tf.cast(tf.shape(x)[0], tf.float32)
        return sums

    def summarize(self, means):
        """Per-image means of test_sums -> the test metrics: losses.METRICS (losses.summarize),
        bits_per_dim_discrete (the 8-bit values), mse and the KL of each group."""
        num_values = math.prod(self.image_shape)
        stats = losses.summarize(means['rec'], means['kl'], means['log_sigma'], self.beta,
                                 num_values, self.likelihood.log_data_scale)
        stats['bits_per_dim_discrete'] = losses.bits_per_dim(means['discrete'] + means['kl'],
                                                             num_values, 0.0)
        stats['mse'] = means['mse']
        stats.update((k, v) for k, v in means.items() if k.startswith('kl_group'))
        return stats

    def test_metrics(self, test_ds, seed=0):
        """The metrics of a test split, named test_<metric> (see summarize): per-image means in
        nats, bits/dim of the density and of the 8-bit values, the MSE per value of the
        reconstructions; batch i's z drawn from (seed, i)."""
        sums = None
        for i, x in enumerate(utils.progress(test_ds, desc='test metrics', unit='batch',
                                             leave=False)):  # sums stay on the device
            eps = tf.random.stateless_normal((tf.shape(x)[0], self.z_dim), seed=[seed, i])
            batch = self.compiled_test_sums(x, eps)
            sums = batch if sums is None else {k: sums[k] + v for k, v in batch.items()}
        means = {k: float(v / sums['count']) for k, v in sums.items()}
        return {'test_' + k: v for k, v in self.summarize(means).items()}

    @functools.cached_property  # in the instance's __dict__: traced once, not tracked by Keras
    def compiled_test_sums(self):
        return tf.function(self.test_sums, reduce_retracing=True)

    def test_step(self, data):
        x = data[0] if isinstance(data, (tuple, list)) else data
        sums = self.test_sums(x, replica_noise((tf.shape(x)[0], self.z_dim), self.seed,
                                               -1 - self.optimizer.iterations))
        count = sums.pop('count')
        for name, value in sums.items():  # a replica's mean, weighted by its images
            self.trackers[name].update_state(value / count, sample_weight=count)
        return self.summarize({name: self.trackers[name].result() for name in sums})

    @property
    def metrics(self):
        return list(self.trackers.values())  # reset by Keras at each epoch and evaluation

    def predict_step(self, data):
        """predict(): the reconstructions, the decoder mean at z = mu (B, H, W, C)."""
        x = data[0] if isinstance(data, (tuple, list)) else data
        return self.reconstruct(x)

    # Data outside the likelihood's range is refused before Keras' compiled steps, in which
    # XLA would drop the likelihood's own asserts (Likelihood.check_range).
    def fit(self, x=None, *args, validation_data=None, **kwargs):
        return super().fit(self._checked(x), *args, validation_data=self._checked(
            validation_data), **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        return super().evaluate(self._checked(x), *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        return super().predict(self._checked(x), *args, **kwargs)

    def _checked(self, x):
        """x (images, a tuple whose first item are images, or a tf.data set of them) whose
        images are refused, as they come, when outside the likelihood's data range."""
        if isinstance(x, tf.data.Dataset):
            def check(*batch):
                self.likelihood.check_range(batch[0])
                return batch if len(batch) > 1 else batch[0]
            return x.map(check)
        if isinstance(x, np.ndarray) and x.size:
            self.likelihood.check_range(tf.constant([x.min(), x.max()], tf.float32))
        return x


def check_objective(likelihood, beta, kl_warmup, free_bits):
    """ValueError (TypeError for a likelihood of another kind) for settings of the objective
    that cannot train: the checks of train.py's flags, for a VAE made in Python."""
    if not isinstance(likelihood, losses.Likelihood):
        raise TypeError(f"likelihood must be a losses.Likelihood, e.g. losses.DECODERS['optimal']"
                        f"(data_range=(-1, 1)), got {likelihood!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f'beta must be a finite number of at least 0, got {beta!r}')
    if kl_warmup is not None and not (isinstance(kl_warmup, int)
                                      and 0 < kl_warmup <= utils.MAX_INT):
        raise ValueError(f'kl_warmup must be a positive integer (steps) or None, got {kl_warmup!r}')
    if free_bits is not None and not (isinstance(free_bits, (int, float))
                                      and math.isfinite(free_bits) and free_bits > 0):
        raise ValueError(f'free_bits must be a positive number (nats) or None, got {free_bits!r}')


@keras.saving.register_keras_serializable('sigma_vae')
class FitVAE(VAE):
    """VAE under its earlier name, which .keras files saved by earlier versions name."""


# ---- the VAE of a run ---------------------------------------------------------------

def make_vae(config, sync_batch_norm=False):
    """The VAE of a run's Config (its network, likelihood and objective), under the current
    distribution strategy's scope, if any."""
    return network_vae(config.image_size, config.channels, config.z_dim,
                       losses.DECODERS[config.model](data.DATA_RANGES[config.data_range],
                                                     config.log_sigma_min),
                       config.arch, config.width, config.depth, sync_batch_norm,
                       config.posterior, beta=config.beta, seed=config.seed,
                       kl_warmup=config.kl_warmup, free_bits=config.free_bits)


def network_vae(image_size, channels, z_dim, likelihood, arch='original', width=None,
                depth=None, sync_batch_norm=False, posterior=None, **objective):
    """The VAE of a network of networks.NETWORKS (width, depth, posterior None: its defaults)
    for images of image_size x image_size x channels, with `likelihood`, whose data range
    decides the decoder's output (tanh for [-1, 1], sigmoid for [0, 1]); objective: VAE's beta,
    seed, kl_warmup, free_bits. sync_batch_norm: batch norm statistics over the global batch
    of all replicas."""
    ranges = {value: name for name, value in data.DATA_RANGES.items()}
    data_range = ranges.get((likelihood.low, likelihood.high))
    if data_range is None:
        raise ValueError(f'the networks output data in {list(data.DATA_RANGES.values())}, not '
                         f'({likelihood.low:g}, {likelihood.high:g})')
    network = networks.NETWORKS[arch]
    encoder, decoder = network.build(
        image_size, channels, z_dim, likelihood.params_per_value,
        networks.OUTPUT_ACTIVATIONS[data_range], sync_batch_norm, width, depth, posterior)
    return VAE(encoder, decoder, likelihood,
               groups=network.groups(image_size, z_dim, width, depth), **objective)


@keras.saving.register_keras_serializable('sigma_vae')
class Adam(keras.optimizers.Adam):
    """Keras' Adam (the same variables, formula and checkpoints) whose update of a variable is
    TensorFlow's one fused op, ResourceApplyAdam, instead of Keras' ~25 elementwise ones (1,500
    ops per step for the hierarchical network's 56 variables). Both compute, in this order,
    alpha = lr sqrt(1 - beta_2^t) / (1 - beta_1^t), m += (g - m)(1 - beta_1),
    v += (g^2 - v)(1 - beta_2), w -= alpha m / (sqrt(v) + epsilon). Keras' own update under a
    tf.distribute strategy (mirrored variables), for amsgrad and for sparse gradients."""

    def update_step(self, gradient, variable, learning_rate):
        if (self.amsgrad or tf.distribute.has_strategy() or not isinstance(gradient, tf.Tensor)
                or not isinstance(variable, tf.Variable)):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        cast = lambda value: tf.cast(value, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=tf.pow(cast(self.beta_1), step),
            beta2_power=tf.pow(cast(self.beta_2), step), lr=cast(learning_rate),
            beta1=cast(self.beta_1), beta2=cast(self.beta_2), epsilon=cast(self.epsilon),
            grad=cast(gradient))

    def _update_model_variables_moving_average(self, trainable_variables):
        """--ema with a warm-up (TensorFlow's ExponentialMovingAverage with num_updates): the
        n-th update (n = 0, 1, ...) uses the decay min(ema_momentum, (1 + n) / (10 + n)), and
        the first copies the weights. Keras' own uses ema_momentum from the second update on,
        so the first weights keep a share of ema_momentum^(steps - 1): 15% after 1,874 steps
        at 0.999."""
        if not self.use_ema:
            return
        n = tf.cast(self.iterations, tf.float32)
        decay = tf.where(n > 0, tf.minimum(tf.cast(self.ema_momentum, tf.float32),
                                           (1 + n) / (10 + n)), 0.0)
        for variable, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                d = tf.cast(decay, variable.dtype)
                average.assign(d * average + (1 - d) * variable)


def make_optimizer(config):
    """Adam (Keras', fused: `Adam`) of a run's Config: its --lr, an exponential moving average
    of the weights with --ema (Keras': the optimizer keeps it), loss scaling under float16
    (bfloat16 has float32's range: none)."""
    optimizer = Adam(config.lr, use_ema=config.ema is not None,
                     ema_momentum=0.99 if config.ema is None else config.ema)
    if config.mixed_precision == 'float16':
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


@contextlib.contextmanager
def averaged(vae, optimizer, batches=None, seed=0, total=None):
    """Within the block, the VAE's trainable weights are the optimizer's moving average of them
    (--ema), and with `batches` (training images) the statistics that training keeps of the
    weights are recomputed for the average (`recompute_statistics`); all are put back after it.
    Nothing changes without an average."""
    inner = getattr(optimizer, 'inner_optimizer', optimizer)
    if not inner.use_ema:
        yield
        return
    kept = vae.trainable_variables + (statistics(vae) if batches is not None else [])
    values = [v.numpy() for v in kept]
    inner.finalize_variable_values(vae.trainable_variables)
    try:
        if batches is not None:
            recompute_statistics(vae, batches, seed, total)
        yield
    finally:
        for variable, value in zip(kept, values):
            variable.assign(value)


def latent_groups(config):
    """The sizes of a run's latent groups, top first (the VAE's `groups`, without building it):
    [z_dim] but for Hierarchical; z has their sum."""
    return networks.NETWORKS[config.arch].groups(config.image_size, config.z_dim, config.width,
                                        config.depth)


def check_memory(config, copies):
    """UsageError if `copies` float32 copies of the run's weights next to z (latent_weights)
    are more than this machine's memory: 1 to load a checkpoint, 6 to train (the weights, their
    gradients, Adam's two moments, the initial values, a checkpoint being written)."""
    width, _ = networks.NETWORKS[config.arch].resolve(config.width, config.depth)
    needed = 4 * copies * networks.latent_weights(config.image_size, config.z_dim, config.arch,
                                         config.width, config.depth)
    utils.check_memory(needed, f'--z_dim {config.z_dim} with --arch {config.arch} --width {width}',
                       'the layers next to z alone' + (' (to train)' if copies > 1 else ''))


BATCH = 500  # images per encoder or decoder call
PROGRESS_MIN = 5000  # images from which a progress bar is shown


def decode_images(vae, z, data_range, desc='decoding'):
    """z (N, Z) -> the decoder means as uint8 (N, S, S, C), in batches of BATCH (a progress
    bar when N is large)."""
    z = np.asarray(z, np.float32)
    batches = range(0, len(z), BATCH)
    out = []
    for i in utils.progress(batches, len(z) >= PROGRESS_MIN, desc=desc, unit='batch', leave=False):
        decoded = np.asarray(vae.decode(z[i:i + BATCH]))
        if not np.all(np.isfinite(decoded)):  # to_uint8 would make them black, silently
            raise utils.UsageError('the decoder gives values that are not finite for these z (they '
                             'are too far from the prior): ask for z nearer 0')
        out.append(data.to_uint8(decoded, data_range))  # uint8 per batch: N float64 would not fit
    return np.concatenate(out)


def encode_images(vae, images, num_images, config, dims=None):
    """mu and log_var (N, Z), float32, of uint8 images (an unbatched tf.data set of num_images
    or an array), in evaluation mode (the posterior's mean path: see models.forward), in
    batches of BATCH (a progress bar when N is large); only the first `dims` of z if given."""
    if isinstance(images, np.ndarray):
        images = tf.data.Dataset.from_tensor_slices(images)
    encode = tf.function(lambda x: [t[:, :dims] for t in vae(x)[1:]], reduce_retracing=True)
    batches = data.make_pipeline(images, config.image_size, BATCH, drop_remainder=False,
                                 data_range=config.data_range)
    out = [[t.numpy() for t in encode(x)] for x in utils.progress(
        batches, desc='encoding', unit='batch', total=math.ceil(num_images / BATCH), leave=False,
        show=num_images >= PROGRESS_MIN)]
    return tuple(np.concatenate(t) for t in zip(*out))


def batch_norm_layers(vae):
    """The batch norm layers of the VAE's encoder and decoder, each once (the hierarchical
    network's top-down path is shared by both), in a fixed order."""
    return list({id(layer): layer for model in (vae.encoder, vae.decoder)
                 for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)}
                .values())


def statistics(vae):
    """The variables that training keeps as running statistics of the weights, in a fixed
    order: batch norm's moving mean and variance, then the likelihood's (`optimal`'s average
    sigma*^2)."""
    return ([v for layer in batch_norm_layers(vae) for v in (layer.moving_mean,
                                                             layer.moving_variance)]
            + list(vae.likelihood.non_trainable_variables))


def recompute_statistics(vae, batches, seed=0, total=None):
    """Sets `statistics` to their averages over `batches` (B, S, S, C) of training images under
    the current weights, z sampled as in training (`total`: their number, for the progress bar).

    Training keeps them as moving averages (batch norm 0.999 a step, the original's; `optimal`
    0.99) of the weights of the last steps, not of the final ones or of their average (--ema):
    evaluation with them can be far off (see README). First Precise BN (Wu and Johnson 2021,
    "Rethinking 'Batch' in BatchNorm"): each layer reads `momentum` when it is called, so
    momentum k / (k + 1) on the k-th batch (from 0) makes its update the running average of the
    batches' statistics. Then, with batch norm's new statistics, the likelihood's
    (losses.Likelihood.fit_statistics), in a second pass only if it keeps any.
    """
    norms = batch_norm_layers(vae)
    momentum = [layer.momentum for layer in norms]
    noise = lambda x, k: tf.random.stateless_normal((tf.shape(x)[0], vae.z_dim), seed=[seed, k])
    try:
        for k, x in enumerate(utils.progress(batches, desc="batch norm's statistics",
                                             unit='batch', total=total, leave=False)):
            for layer in norms:
                layer.momentum = k / (k + 1)
            vae(x, noise(x, k), training=True)
    finally:
        for layer, m in zip(norms, momentum):
            layer.momentum = m
    if vae.likelihood.non_trainable_variables:
        vae.likelihood.fit_statistics(
            (x, vae(x, noise(x, k))[0]) for k, x in enumerate(utils.progress(
                batches, desc="the likelihood's statistics", unit='batch', total=total,
                leave=False)))

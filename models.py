"""Keras encoder and decoder of the original sigma-VAE code, and deeper variants.

For 28x28 images (MNIST, Fashion-MNIST, the original's resized SVHN):

  encoder: conv 5x5/2 (64) -> BN -> leaky ReLU -> conv 5x5/2 (128) -> BN
           -> leaky ReLU -> flatten -> dense mu (Z), dense log_var (Z)
  decoder: dense 7*7*128 -> ReLU -> reshape -> deconv 5x5/2 (64) -> BN -> ReLU
           -> deconv 5x5/2 (C) -> tanh

32x32 (CIFAR-10, SVHN at full size) and 64x64 (CelebA) add one and two more
stride-2 levels, doubling the filters each level (256, 512), down to 4x4.
Convolutions followed by batch norm have no bias (BN's shift replaces it; the
original's slim layers drop it too), and batch norm keeps its moving statistics with
the original's decay, 0.999 (slim.batch_norm's default; Keras' is 0.99). The decoder's
last layer outputs `likelihood.params_per_value` numbers per value: the mean, through
tanh for data in [-1, 1] (the original) or sigmoid for [0, 1] (the PyTorch sibling),
then any others (e.g. a log scale) as they are.
"""
import keras
import tensorflow as tf
from keras import layers

# image size -> (number of stride-2 levels, spatial size at the bottom)
ARCHITECTURES = {28: (2, 7), 32: (3, 4), 64: (4, 4)}
OUTPUT_ACTIVATIONS = {'-1,1': 'tanh', '0,1': 'sigmoid'}  # --data_range -> decoder output
LEAKY_SLOPE = 0.2  # tf.nn.leaky_relu's default, as in the original
BN_MOMENTUM = 0.999  # slim.batch_norm's decay, as in the original
BN_EPSILON = 0.001


def _filters(levels):
    return [64 * 2 ** i for i in range(levels)]


def latent_weights(image_size, z_dim):
    """The number of weights that grow with z_dim, without building anything: the encoder's
    two dense heads and the decoder's first dense layer (the rest is a few million at most)."""
    levels, base = ARCHITECTURES[image_size]
    features = base * base * _filters(levels)[-1]
    return z_dim * (3 * features + 2)


def make_encoder(image_size, channels, z_dim, sync_batch_norm=False):
    """(B, S, S, C) in [-1, 1] -> (mu, log_var), each (B, z_dim), float32."""
    levels, _ = ARCHITECTURES[image_size]
    x = inputs = keras.Input((image_size, image_size, channels))
    for filters in _filters(levels):
        x = layers.Conv2D(filters, 5, strides=2, padding='same', use_bias=False)(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                      synchronized=sync_batch_norm)(x)
        x = layers.LeakyReLU(LEAKY_SLOPE)(x)
    x = layers.Flatten()(x)
    # The heads compute in float32 under mixed precision: exp(log_var) overflows float16 early.
    mu = layers.Dense(z_dim, name='mu', dtype='float32')(x)
    log_var = layers.Dense(z_dim, name='log_var', dtype='float32')(x)
    return keras.Model(inputs, [mu, log_var], name='encoder')


class OutputHead(layers.Layer):
    """(B, S, S, C * P) -> float32 of the same shape, the activation applied to the first C
    channels (the mean); the other P - 1 groups (e.g. log scales) pass unchanged."""

    def __init__(self, channels, activation, **kwargs):
        super().__init__(dtype='float32', **kwargs)
        self.channels = channels
        self.activation = keras.activations.get(activation)

    def call(self, x):
        return tf.concat([self.activation(x[..., :self.channels]), x[..., self.channels:]], -1)


def make_decoder(image_size, channels, z_dim, activation='tanh', sync_batch_norm=False,
                 params_per_value=1):
    """(B, z_dim) -> (B, S, S, C * params_per_value): the mean ([-1, 1] with tanh, [0, 1]
    with sigmoid) and the likelihood's other parameters, float32."""
    levels, base = ARCHITECTURES[image_size]
    filters = _filters(levels)[::-1]
    z = inputs = keras.Input((z_dim,))
    x = layers.Dense(base * base * filters[0], activation='relu')(z)
    x = layers.Reshape((base, base, filters[0]))(x)
    for f in filters[1:]:
        x = layers.Conv2DTranspose(f, 5, strides=2, padding='same', use_bias=False)(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                      synchronized=sync_batch_norm)(x)
        x = layers.ReLU()(x)
    x = layers.Conv2DTranspose(channels * params_per_value, 5, strides=2, padding='same')(x)
    x = OutputHead(channels, activation)(x)
    return keras.Model(inputs, x, name='decoder')


class VAE(keras.Model):
    """Encoder, decoder and the decoder's likelihood (losses.DECODERS), whose weights
    (a trainable log sigma, running statistics) are trained and checkpointed with the rest.

    sync_batch_norm: batch norm statistics over the global batch of all replicas.
    """

    def __init__(self, image_size, channels, z_dim, likelihood, data_range='-1,1',
                 sync_batch_norm=False, **kwargs):
        # The VAE's own inputs, noise and outputs stay float32 under mixed precision; its
        # encoder and decoder compute in the global policy's dtype.
        super().__init__(dtype='float32', **kwargs)
        self.z_dim = z_dim
        self.likelihood = likelihood
        self.encoder = make_encoder(image_size, channels, z_dim, sync_batch_norm)
        self.decoder = make_decoder(image_size, channels, z_dim, OUTPUT_ACTIVATIONS[data_range],
                                    sync_batch_norm, likelihood.params_per_value)
        self.build((None, image_size, image_size, channels))

    def build(self, input_shape):
        self.built = True

    def call(self, x, eps=None, training=False):
        """x (B, S, S, C) -> (params, mu, log_var), float32; z = mu when eps is None.

        params: the decoder's output, (B, S, S, C * params_per_value); see losses.Likelihood.
        """
        mu, log_var = self.encoder(x, training=training)
        z = mu if eps is None else mu + tf.exp(0.5 * log_var) * eps
        return self.decoder(z, training=training), mu, log_var

    def decode(self, z):
        """z (B, Z) -> the decoder mean x_hat (B, S, S, C), in evaluation mode."""
        return self.likelihood.mean(self.decoder(z, training=False))

    def reconstruct(self, x):
        """x (B, S, S, C) -> the decoder mean at z = mu, in evaluation mode."""
        return self.decode(self.encoder(x, training=False)[0])


def recompute_batch_norm(vae, batches, seed=0):
    """Precise BN (Wu and Johnson 2021, "Rethinking 'Batch' in BatchNorm"): sets the moving mean
    and variance of every batch norm layer to their averages over `batches` (B, S, S, C) of
    training images under the current weights, z sampled as in training.

    The moving averages that training keeps (decay 0.999, the original's) describe the weights
    of the last ~1000 steps, not the final ones; evaluation with them can be far off (see
    README). Each layer reads `momentum` when it is called, so momentum k / (k + 1) on the k-th
    batch (from 0) makes its update the running average of the batches' statistics.
    """
    norms = [layer for model in (vae.encoder, vae.decoder) for layer in model.layers
             if isinstance(layer, layers.BatchNormalization)]
    momentum = [layer.momentum for layer in norms]
    try:
        for k, x in enumerate(batches):
            for layer in norms:
                layer.momentum = k / (k + 1)
            vae(x, tf.random.stateless_normal((tf.shape(x)[0], vae.z_dim), seed=[seed, k]),
                training=True)
    finally:
        for layer, m in zip(norms, momentum):
            layer.momentum = m


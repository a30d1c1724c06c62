"""Keras encoder and decoder of the original sigma-VAE code, and deeper variants.

For 28x28 images (MNIST, Fashion-MNIST, the original's resized SVHN):

  encoder: conv 5x5/2 (64) -> BN -> leaky ReLU -> conv 5x5/2 (128) -> BN
           -> leaky ReLU -> flatten -> dense mu (Z), dense log_var (Z)
  decoder: dense 7*7*128 -> ReLU -> reshape -> deconv 5x5/2 (64) -> BN -> ReLU
           -> deconv 5x5/2 (C) -> tanh

32x32 (CIFAR-10, SVHN at full size) and 64x64 (CelebA) add one and two more
stride-2 levels, doubling the filters each level (256, 512), down to 4x4.
Convolutions followed by batch norm have no bias (BN's shift replaces it; the
original's slim layers drop it too). The decoder's output activation is tanh for data in [-1, 1] (the original) and
sigmoid for data in [0, 1] (the PyTorch sibling).
"""
import keras
import tensorflow as tf
from keras import layers

# image size -> (number of stride-2 levels, spatial size at the bottom)
ARCHITECTURES = {28: (2, 7), 32: (3, 4), 64: (4, 4)}
OUTPUT_ACTIVATIONS = {'-1,1': 'tanh', '0,1': 'sigmoid'}  # --data_range -> decoder output
LEAKY_SLOPE = 0.2  # tf.nn.leaky_relu's default, as in the original


def _filters(levels):
    return [64 * 2 ** i for i in range(levels)]


def make_encoder(image_size, channels, z_dim, sync_batch_norm=False):
    """(B, S, S, C) in [-1, 1] -> (mu, log_var), each (B, z_dim), float32."""
    levels, _ = ARCHITECTURES[image_size]
    x = inputs = keras.Input((image_size, image_size, channels))
    for filters in _filters(levels):
        x = layers.Conv2D(filters, 5, strides=2, padding='same', use_bias=False)(x)
        x = layers.BatchNormalization(synchronized=sync_batch_norm)(x)
        x = layers.LeakyReLU(LEAKY_SLOPE)(x)
    x = layers.Flatten()(x)
    # The heads compute in float32 under mixed precision: exp(log_var) overflows float16 early.
    mu = layers.Dense(z_dim, name='mu', dtype='float32')(x)
    log_var = layers.Dense(z_dim, name='log_var', dtype='float32')(x)
    return keras.Model(inputs, [mu, log_var], name='encoder')


def make_decoder(image_size, channels, z_dim, activation='tanh', sync_batch_norm=False):
    """(B, z_dim) -> (B, S, S, C) decoder mean ([-1, 1] with tanh, [0, 1] with sigmoid)."""
    levels, base = ARCHITECTURES[image_size]
    filters = _filters(levels)[::-1]
    z = inputs = keras.Input((z_dim,))
    x = layers.Dense(base * base * filters[0], activation='relu')(z)
    x = layers.Reshape((base, base, filters[0]))(x)
    for f in filters[1:]:
        x = layers.Conv2DTranspose(f, 5, strides=2, padding='same', use_bias=False)(x)
        x = layers.BatchNormalization(synchronized=sync_batch_norm)(x)
        x = layers.ReLU()(x)
    x = layers.Conv2DTranspose(channels, 5, strides=2, padding='same')(x)
    x = layers.Activation(activation, dtype='float32')(x)
    return keras.Model(inputs, x, name='decoder')


class VAE(keras.Model):
    """Encoder, decoder and the decoder's log sigma state.

    log_sigma: the `sigma` model's trainable scalar (initialised at 0; frozen for
      the other models, so that every model has the same checkpoint layout).
    sigma2_avg, sigma2_weight: a debiased exponential moving average of the
      `optimal` model's training sigma*^2, the sigma used at test time (every replica
      sees the same global sigma*, so the first replica's update is kept).
    sync_batch_norm: batch norm statistics over the global batch of all replicas.
    """

    def __init__(self, image_size, channels, z_dim, learn_sigma=False, data_range='-1,1',
                 sync_batch_norm=False, **kwargs):
        # The VAE's own inputs, noise and outputs stay float32 under mixed precision; its
        # encoder and decoder compute in the global policy's dtype.
        super().__init__(dtype='float32', **kwargs)
        self.z_dim = z_dim
        self.encoder = make_encoder(image_size, channels, z_dim, sync_batch_norm)
        self.decoder = make_decoder(image_size, channels, z_dim, OUTPUT_ACTIVATIONS[data_range],
                                    sync_batch_norm)
        self.log_sigma = self.add_weight(shape=(), initializer='zeros', trainable=learn_sigma,
                                         name='log_sigma', dtype='float32', autocast=False)
        self.sigma2_avg, self.sigma2_weight = (
            self.add_weight(shape=(), initializer='zeros', trainable=False, name=name,
                            dtype='float32', autocast=False, aggregation='only_first_replica')
            for name in ('sigma2_avg', 'sigma2_weight'))
        self.build((None, image_size, image_size, channels))

    def build(self, input_shape):
        self.built = True

    def call(self, x, eps=None, training=False):
        """x (B, S, S, C) -> (x_hat, mu, log_var), float32; z = mu when eps is None."""
        mu, log_var = self.encoder(x, training=training)
        z = mu if eps is None else mu + tf.exp(0.5 * log_var) * eps
        return self.decoder(z, training=training), mu, log_var

    def update_sigma2_average(self, log_sigma, decay=0.99):
        """Feeds one training batch's log sigma* into the moving average."""
        self.sigma2_avg.assign(decay * self.sigma2_avg + (1 - decay) * tf.exp(2 * log_sigma))
        self.sigma2_weight.assign(decay * self.sigma2_weight + (1 - decay))

    def average_log_sigma(self):
        """log of the debiased average sigma*^2 / 2; 0 before any update."""
        w = self.sigma2_weight
        return tf.where(w > 0, 0.5 * tf.math.log(self.sigma2_avg / tf.maximum(w, 1e-12)), 0.0)

"""The encoders and decoders: the original sigma-VAE code's, and deeper variants (--arch).

For 28x28 images (MNIST, Fashion-MNIST, the original's resized SVHN):

  encoder: conv 5x5/2 (64) -> BN -> leaky ReLU -> conv 5x5/2 (128) -> BN
           -> leaky ReLU -> flatten -> dense mu (Z), dense log_var (Z)
  decoder: dense 7*7*128 -> ReLU -> reshape -> deconv 5x5/2 (64) -> BN -> ReLU
           -> deconv 5x5/2 (C) -> tanh

32x32 (CIFAR-10, SVHN at full size) and 64x64 (CelebA) add one and two more
stride-2 levels, doubling the filters each level (256, 512), down to 4x4.
Convolutions followed by batch norm have no bias (BN's shift replaces it; the
original's slim layers drop it too), and batch norm keeps its moving statistics with
the original's decay, 0.999 (slim.batch_norm's default; Keras' is 0.99), computed by
TensorFlow's fused kernel (BatchNorm: Keras' layer, ~1.2x faster steps on CPU). The decoder's
last layer outputs `likelihood.params_per_value` numbers per value: the mean, through
tanh for data in [-1, 1] (the original) or sigmoid for [0, 1] (the PyTorch sibling),
then any others (e.g. a log scale) as they are.

The networks are a registry, NETWORKS (--arch), as the decoders are in losses.py: `original`
(the above; --width its first level's filters, 64), `resnet` (stride-2 stages of --depth
residual blocks each, --width base channels, one latent) and `hierarchical` (latent groups
at several resolutions with a learned conditional prior; see Hierarchical). Adding a network
is a class with the methods of `Network` and one line of NETWORKS; `forward` runs either kind
of encoder (docs/networks.md).
"""
import math

import keras
import numpy as np
import tensorflow as tf
from keras import layers

# image size -> (number of stride-2 levels, spatial size at the bottom)
ARCHITECTURES = {28: (2, 7), 32: (3, 4), 64: (4, 4)}
OUTPUT_ACTIVATIONS = {'-1,1': 'tanh', '0,1': 'sigmoid'}  # --data_range -> decoder output
LEAKY_SLOPE = 0.2  # tf.nn.leaky_relu's default, as in the original
BN_MOMENTUM = 0.999  # slim.batch_norm's decay, as in the original
BN_EPSILON = 0.001


def _filters(levels, width=64):
    return [width * 2 ** i for i in range(levels)]


@keras.saving.register_keras_serializable('sigma_vae')
class BatchNorm(layers.BatchNormalization):
    """Keras' batch norm (the same weights, statistics and outputs) computed by TensorFlow's
    fused kernel, FusedBatchNormV3 (oneDNN on CPU, cuDNN on GPU): one op forward and one
    backward instead of Keras' ~20 elementwise ones, which took a quarter of the hierarchical
    network's step on CPU (REPORT_speed.md). Keras' own computation where the kernel does not
    apply: synchronized statistics (several replicas), a mask, another axis, not 4-D.

    In float32 (inputs cast, as Keras does), for training's batch statistics (the moving
    statistics are updated with the biased variance, as Keras does) and for inference's moving
    ones."""

    def call(self, inputs, training=None, mask=None):
        if (mask is not None or self.synchronized or self.renorm or len(inputs.shape) != 4
                or self.axis not in (-1, 3) or not (self.center and self.scale)):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)
            # The kernel returns the unbiased variance (n / (n - 1) times the biased one)
            n = tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32)
            variance = variance * tf.maximum(n - 1.0, 1.0) / tf.maximum(n, 1.0)
            self.moving_mean.assign(self.moving_mean * self.momentum
                                    + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum
                                        + variance * (1.0 - self.momentum))
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, self.gamma, self.beta, self.moving_mean, self.moving_variance,
                epsilon=self.epsilon, is_training=False)
        return tf.cast(y, self.compute_dtype)


def _batch_norm(sync_batch_norm, **kwargs):
    return BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=sync_batch_norm,
                     **kwargs)


def _latent_heads(x, z_dim):
    """Features (B, F) -> (mu, log_var), each (B, z_dim). The heads compute in float32 under
    mixed precision: exp(log_var) overflows float16 early."""
    mu = layers.Dense(z_dim, name='mu', dtype='float32')(x)
    log_var = layers.Dense(z_dim, name='log_var', dtype='float32')(x)
    return mu, log_var


def latent_weights(image_size, z_dim, arch='original', width=None, depth=None):
    """The number of weights that grow with z_dim, without building anything: the encoder's
    two dense heads and the decoder's first dense layer (the rest is a few million at most)."""
    network = NETWORKS[arch]
    width, depth = network.resolve(width, depth)
    return z_dim * (3 * network.bottom_features(image_size, width, depth) + 2)


def make_encoder(image_size, channels, z_dim, sync_batch_norm=False, width=64):
    """(B, S, S, C) in [-1, 1] -> (mu, log_var), each (B, z_dim), float32."""
    levels, _ = ARCHITECTURES[image_size]
    x = inputs = keras.Input((image_size, image_size, channels))
    for filters in _filters(levels, width):
        x = layers.Conv2D(filters, 5, strides=2, padding='same', use_bias=False)(x)
        x = _batch_norm(sync_batch_norm)(x)
        x = layers.LeakyReLU(LEAKY_SLOPE)(x)
    x = layers.Flatten()(x)
    return keras.Model(inputs, _latent_heads(x, z_dim), name='encoder')


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
                 params_per_value=1, width=64):
    """(B, z_dim) -> (B, S, S, C * params_per_value): the mean ([-1, 1] with tanh, [0, 1]
    with sigmoid) and the likelihood's other parameters, float32."""
    levels, base = ARCHITECTURES[image_size]
    filters = _filters(levels, width)[::-1]
    z = inputs = keras.Input((z_dim,))
    x = layers.Dense(base * base * filters[0], activation='relu')(z)
    x = layers.Reshape((base, base, filters[0]))(x)
    for f in filters[1:]:
        x = layers.Conv2DTranspose(f, 5, strides=2, padding='same', use_bias=False)(x)
        x = _batch_norm(sync_batch_norm)(x)
        x = layers.ReLU()(x)
    x = layers.Conv2DTranspose(channels * params_per_value, 5, strides=2, padding='same')(x)
    x = OutputHead(channels, activation)(x)
    return keras.Model(inputs, x, name='decoder')


class Network:
    """An encoder and decoder of one kind (a NETWORKS entry), one latent z of z_dim.

    width, depth, posterior: the defaults of --width, --depth and --posterior; None: the
    network has no such setting (--depth: fixed levels; --posterior: no lower latent groups).
    """
    width, depth, posterior = 64, None, None

    @classmethod
    def resolve(cls, width=None, depth=None):
        """--width and --depth, None meaning this network's default -> (width, depth)."""
        return (cls.width if width is None else width), (cls.depth if depth is None else depth)

    @staticmethod
    def bottom_features(image_size, width, depth):
        """The number of features at the bottom, next to z (flattened)."""
        levels, base = ARCHITECTURES[image_size]
        return base * base * _filters(levels, width)[-1]

    @classmethod
    def groups(cls, image_size, z_dim, width=None, depth=None):
        """The sizes of the latent groups, top first, which z (B, sum of them) concatenates
        (flattened): one group of z_dim for a network with one latent."""
        return [z_dim]

    @classmethod
    def build(cls, image_size, channels, z_dim, params_per_value=1, activation='tanh',
              sync_batch_norm=False, width=None, depth=None, posterior=None):
        """-> (encoder, decoder) (see models.forward): an encoder (B, S, S, C) -> (mu, log_var),
        (B, Z) each, or (x, eps) -> (params, mu, log_var, ...); a decoder (B, Z) ->
        params (B, S, S, C * params_per_value), the mean through `activation` first; float32
        out, Z the sum of `groups`."""
        raise NotImplementedError


class Original(Network):
    """The original's network (the module docstring); --width: the first level's filters."""

    @classmethod
    def build(cls, image_size, channels, z_dim, params_per_value=1, activation='tanh',
              sync_batch_norm=False, width=None, depth=None, posterior=None):
        width, _ = cls.resolve(width, depth)
        return (make_encoder(image_size, channels, z_dim, sync_batch_norm, width),
                make_decoder(image_size, channels, z_dim, activation, sync_batch_norm,
                             params_per_value, width))


def residual_block(filters, sync_batch_norm):
    """-> a function x (B, H, W, filters) -> relu(x + BN(conv(relu(BN(conv(x)))))), two 3x3
    convolutions (He et al. 2016), whose layers are made once: calling it on several inputs
    shares them. The second batch norm starts at scale 0 (Goyal et al. 2017), so that every
    block starts as the identity and a deep stack trains from the first step."""
    conv1 = layers.Conv2D(filters, 3, padding='same', use_bias=False)
    norm1 = _batch_norm(sync_batch_norm)
    conv2 = layers.Conv2D(filters, 3, padding='same', use_bias=False)
    norm2 = _batch_norm(sync_batch_norm, gamma_initializer='zeros')

    def block(x):
        h = layers.ReLU()(norm1(conv1(x)))
        return layers.ReLU()(layers.Add()([x, norm2(conv2(h))]))
    return block


class ResNet(Network):
    """A residual encoder and decoder with one latent.

    encoder: conv 3x3 (width) -> per level: conv 3x3/2 (width 2^l) -> BN -> ReLU -> `depth`
             residual blocks; flatten -> dense mu, log_var
    decoder: dense (bottom) -> ReLU -> reshape -> per level, from the bottom: `depth` residual
             blocks -> deconv 3x3/2 (half the filters; C * params_per_value at the top) [-> BN
             -> ReLU, all but the last]

    The levels and the bottom's size are the original's (ARCHITECTURES): 28 -> 7, 32 and 64 -> 4.
    """
    width, depth = 32, 2

    @classmethod
    def build(cls, image_size, channels, z_dim, params_per_value=1, activation='tanh',
              sync_batch_norm=False, width=None, depth=None, posterior=None):
        width, depth = cls.resolve(width, depth)
        levels, base = ARCHITECTURES[image_size]
        filters = _filters(levels, width)

        x = inputs = keras.Input((image_size, image_size, channels))
        x = layers.Conv2D(width, 3, padding='same')(x)
        for f in filters:
            x = layers.Conv2D(f, 3, strides=2, padding='same', use_bias=False)(x)
            x = layers.ReLU()(_batch_norm(sync_batch_norm)(x))
            for _ in range(depth):
                x = residual_block(f, sync_batch_norm)(x)
        encoder = keras.Model(inputs, _latent_heads(layers.Flatten()(x), z_dim), name='encoder')

        z = inputs = keras.Input((z_dim,))
        x = layers.Dense(base * base * filters[-1], activation='relu')(z)
        x = layers.Reshape((base, base, filters[-1]))(x)
        for i, f in reversed(list(enumerate(filters))):
            for _ in range(depth):
                x = residual_block(f, sync_batch_norm)(x)
            if i == 0:
                x = layers.Conv2DTranspose(channels * params_per_value, 3, strides=2,
                                           padding='same')(x)
            else:
                x = layers.Conv2DTranspose(filters[i - 1], 3, strides=2, padding='same',
                                           use_bias=False)(x)
                x = layers.ReLU()(_batch_norm(sync_batch_norm)(x))
        decoder = keras.Model(inputs, OutputHead(channels, activation)(x), name='decoder')
        return encoder, decoder


class Hierarchical(Network):
    """A top-down hierarchy of latent groups (a ladder VAE: Sønderby et al. 2016; NVAE, Vahdat
    and Kautz 2020; VDVAE, Child 2021) with a learned conditional prior.

    Groups: the top one, z_dim numbers as in the other networks (the ex-post mixture is fitted
    to it), then one spatial group of LATENT_CHANNELS channels at each level of the original's
    resolutions, from the bottom up: 7x7 and 14x14 at 28; 4, 8, 16 (and 32 at 64).

    encoder, bottom-up: conv 3x3 (width) -> per level: conv 3x3/2 (width 2^l) -> BN -> ReLU ->
      `depth` residual blocks (the level's features); flatten -> dense m, log s^2 of the top.
    top-down (shared by both paths): dense (bottom) -> ReLU -> reshape; per level, from the
      bottom: prior conv 3x3 -> (mu_p, log sigma_p); z = mu_p + sigma_p u; h += conv 1x1 (z);
      `depth` residual blocks; deconv 3x3/2 (-> BN -> ReLU, all but the last, which gives
      C * params_per_value channels).
    posterior (--posterior): a conv 3x3 of [h, the level's features], starting at 0, gives
      'z' (the default): (mu_q, log sigma_q^2) of z itself (VDVAE), the prior conv starting at
        0 too (q = p = N(0, I) at the start); in u: m = (mu_q - mu_p) / sigma_p,
        log s^2 = log sigma_q^2 - 2 log sigma_p;
      'residual' (NVAE's; runs before this version): (m, log s^2) relative to the prior,
        q(z_l | x, z_<l) = N(mu_p + sigma_p m, (sigma_p s)^2), the prior conv starting at random
        weights. Its KL, KL(N(m, s^2) || N(0, I)), does not depend on sigma_p, so the decoder
        can mute a group for free by shrinking sigma_p, and does while q = p makes the group
        pure noise: the 14x14 group's log sigma_p fell to -2.5 in 50 steps and the group never
        opened (docs/networks.md). With q of z itself a sigma_p below sigma_q costs KL.

    The latent the rest of the tool sees is u = (u_top, u_1, ...), flattened, of the whitened
    groups u_l = (z_l - mu_p) / sigma_p. Under the prior every u_l is N(0, I) whatever the
    groups above, so p(u) = N(0, I); q(u_l | x, u_<l) = N(m, s^2); and KL(q(z_l) || p(z_l))
    = KL(N(m, s^2) || N(0, I)), per group in closed form, given the groups above. So the
    decoder maps u ~ N(0, I) to an image through the conditional prior, and the KL,
    the IW-NLL and the priors of the other networks hold as they are, with (mu, log_var) the
    (m, log s^2) of the sampled path. The encoder takes (x, eps) and returns the decoder's
    output with them (the posterior of each group needs the top-down path above it), and
    the prior's (mu_p, 2 log sigma_p) of the path (0 for the top group).
    """
    width, depth, posterior = 32, 1, 'z'
    latent_channels = 4
    POSTERIORS = ('z', 'residual')

    @classmethod
    def groups(cls, image_size, z_dim, width=None, depth=None):
        levels, base = ARCHITECTURES[image_size]
        return [z_dim] + [cls.latent_channels * (base * 2 ** i) ** 2 for i in range(levels)]

    @classmethod
    def build(cls, image_size, channels, z_dim, params_per_value=1, activation='tanh',
              sync_batch_norm=False, width=None, depth=None, posterior=None):
        width, depth = cls.resolve(width, depth)
        of_z = (posterior or cls.posterior) == 'z'
        levels, base = ARCHITECTURES[image_size]
        filters = _filters(levels, width)  # level l: (image_size / 2^(l+1))^2 x filters[l]
        sizes = cls.groups(image_size, z_dim)
        c = cls.latent_channels
        norm = lambda **kw: _batch_norm(sync_batch_norm, **kw)

        # The top-down layers, made once: both paths call them.
        top = layers.Dense(base * base * filters[-1], activation='relu')
        prior = [layers.Conv2D(2 * c, 3, padding='same', dtype='float32', name=f'prior_{l}',
                               kernel_initializer='zeros' if of_z else 'glorot_uniform')
                 for l in range(levels)]
        posterior = [layers.Conv2D(2 * c, 3, padding='same', dtype='float32',
                                   kernel_initializer='zeros', name=f'posterior_{l}')
                     for l in range(levels)]
        project = [layers.Conv2D(f, 1) for f in filters]
        blocks = [[residual_block(f, sync_batch_norm) for _ in range(depth)] for f in filters]
        up = [layers.Conv2DTranspose(filters[l - 1], 3, strides=2, padding='same',
                                     use_bias=False) for l in range(1, levels)]
        up_norm = [norm() for _ in range(1, levels)]
        out = layers.Conv2DTranspose(channels * params_per_value, 3, strides=2, padding='same')
        head = OutputHead(channels, activation)

        def top_down(u_top, group):
            """u_top (B, z_dim) and group(l, h, mu_p, log_sigma_p) -> z_l (B, r, r, c) ->
            (decoder output, the prior's (mu_p, log var_p) of each level)."""
            h = keras.ops.reshape(top(u_top), (-1, base, base, filters[-1]))
            priors = []
            for l in reversed(range(levels)):
                mu_p, log_sigma_p = keras.ops.split(prior[l](h), 2, axis=-1)
                z = group(l, h, mu_p, log_sigma_p)
                h = layers.Add()([h, project[l](z)])
                for block in blocks[l]:
                    h = block(h)
                h = out(h) if l == 0 else layers.ReLU()(up_norm[l - 1](up[l - 1](h)))
                priors.append((mu_p, 2.0 * log_sigma_p))
            return head(h), priors

        flat = lambda t: keras.ops.reshape(t, (-1, math.prod(t.shape[1:])))
        offsets = np.cumsum(sizes)[:-1].tolist()

        def unflatten(u, l):  # level l's part of the flat u (B, sum(sizes)) -> (B, r, r, c)
            r = base * 2 ** (levels - 1 - l)
            i = 1 + levels - 1 - l  # groups are ordered top first, then from the bottom
            return keras.ops.reshape(keras.ops.split(u, offsets, axis=-1)[i], (-1, r, r, c))

        # The encoder: bottom-up features, then the top-down path with q of each group.
        x = image = keras.Input((image_size, image_size, channels))
        eps = keras.Input((sum(sizes),))
        x = layers.Conv2D(width, 3, padding='same')(x)
        features = []
        for l, f in enumerate(filters):
            x = layers.Conv2D(f, 3, strides=2, padding='same', use_bias=False)(x)
            x = layers.ReLU()(norm()(x))
            for _ in range(depth):
                x = residual_block(f, sync_batch_norm)(x)
            features.append(x)
        mu_top, log_var_top = _latent_heads(layers.Flatten()(x), z_dim)
        q = {}

        def sample_posterior(l, h, mu_p, log_sigma_p):
            a, b = keras.ops.split(posterior[l](layers.Concatenate()([h, features[l]])), 2,
                                   axis=-1)
            if not of_z:  # (m, log s^2) of u itself
                q[l] = (a, b)
                return mu_p + keras.ops.exp(log_sigma_p) * (
                    a + keras.ops.exp(0.5 * b) * unflatten(eps, l))
            # (mu_q, log sigma_q^2) of z, whitened for the rest of the tool; z is drawn without
            # the prior, which cancels: the prior's gradient is then exactly the KL's
            q[l] = ((a - mu_p) * keras.ops.exp(-log_sigma_p), b - 2.0 * log_sigma_p)
            return a + keras.ops.exp(0.5 * b) * unflatten(eps, l)

        u_top = mu_top + keras.ops.exp(0.5 * log_var_top) * keras.ops.split(eps, offsets,
                                                                              axis=-1)[0]
        params, priors = top_down(u_top, sample_posterior)
        order = list(reversed(range(levels)))  # the groups below the top, as in u
        zeros = keras.ops.zeros_like(mu_top)
        outputs = [params] + [
            keras.ops.concatenate([top_part] + [flat(t) for t in parts], axis=-1)
            for top_part, parts in (
                (mu_top, [q[l][0] for l in order]), (log_var_top, [q[l][1] for l in order]),
                (zeros, [p[0] for p in priors]), (zeros, [p[1] for p in priors]))]
        encoder = keras.Model([image, eps], outputs, name='encoder')

        u = keras.Input((sum(sizes),))
        params, _ = top_down(keras.ops.split(u, offsets, axis=-1)[0],
                             lambda l, h, mu_p, log_sigma_p:
                             mu_p + keras.ops.exp(log_sigma_p) * unflatten(u, l))
        decoder = keras.Model(u, params, name='decoder')
        return encoder, decoder


# --arch -> Network: its encoder and decoder.
NETWORKS = {
    'original': Original,
    'resnet': ResNet,
    'hierarchical': Hierarchical,
}

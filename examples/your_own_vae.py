"""Your own VAE made a sigma-VAE, trained with Keras' fit: python examples/your_own_vae.py

The encoder and decoder below are any Keras networks (not this project's models.py); the
sigma-VAE is the three lines marked `# sigma-VAE`: import, the decoder's likelihood with the
optimal shared sigma* (Rybkin et al. 2021), and the Keras model whose train_step calls
losses.vae_loss. Trains one epoch of Fashion-MNIST (read offline from Debian's IDX files),
prints the test bits/dim (density and 8-bit values) and writes a 10x10 grid of samples
(output/your_own_vae_samples.png).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import files
import utils  # noqa: E402  (the project's, after its path: quiet TensorFlow, one-line errors)
utils.quiet_tensorflow()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

import data  # noqa: E402
import losses, models  # noqa: E401,E402  # sigma-VAE


def make_encoder(image_size, channels, z_dim):
    """(B, S, S, C) in [-1, 1] -> (mu, log_var), each (B, z_dim)."""
    x = inputs = keras.Input((image_size, image_size, channels))
    x = layers.Conv2D(32, 3, strides=2, padding='same', activation='relu')(x)
    x = layers.Conv2D(64, 3, strides=2, padding='same', activation='relu')(x)
    x = layers.Dense(256, activation='relu')(layers.Flatten()(x))
    return keras.Model(inputs, [layers.Dense(z_dim)(x), layers.Dense(z_dim)(x)])


def make_decoder(image_size, channels, z_dim):
    """(B, z_dim) -> the mean of x, (B, S, S, C) in [-1, 1]."""
    s = image_size // 4
    x = inputs = keras.Input((z_dim,))
    x = layers.Reshape((s, s, 64))(layers.Dense(s * s * 64, activation='relu')(x))
    x = layers.Conv2DTranspose(32, 3, strides=2, padding='same', activation='relu')(x)
    x = layers.Conv2DTranspose(channels, 3, strides=2, padding='same', activation='tanh')(x)
    return keras.Model(inputs, x)


def parse_args(argv=None):
    """The flags, and the paths they name checked before any work (one line, exit status 2)."""
    p = utils.ArgumentParser(prog='your_own_vae.py', description=__doc__.splitlines()[0])
    p.add_argument('--dataset', default='fashion_mnist',
                   help='fashion_mnist, or the path of a folder of images (tests)')
    p.add_argument('--steps', '--max_steps', dest='steps', type=utils.positive(), default=None,
                   help='training steps (default: one epoch)')
    p.add_argument('--batch_size', type=utils.positive(), default=64)
    p.add_argument('--z_dim', type=utils.positive(), default=20)
    p.add_argument('--lr', type=utils.positive(float), default=1e-3)
    p.add_argument('--seed', type=utils.number(int, 0, 2 ** 31 - 1), default=0)
    p.add_argument('--samples', default='output/your_own_vae_samples.png',
                   help='the PNG of the sample grid')
    args = p.parse_args(argv)
    if os.sep in args.dataset:
        files.check_input(args.dataset, '--dataset', 'folder')
    files.check_output(args.samples, '--samples')
    return args


def train(args):
    keras.utils.set_random_seed(args.seed)
    size = 28
    splits = data.load(args.dataset, image_size=size, seed=args.seed)
    train_ds = data.make_pipeline(splits.train, size, args.batch_size, shuffle_seed=args.seed)
    test_ds = data.make_pipeline(splits.test, size, args.batch_size, drop_remainder=False)
    encoder = make_encoder(size, splits.channels, args.z_dim)
    decoder = make_decoder(size, splits.channels, args.z_dim)

    # N(x_hat, sigma*^2), sigma* the batch RMSE, for data in [-1, 1] (the pipeline's)
    likelihood = losses.DECODERS['optimal'](data_range=(-1, 1))  # sigma-VAE
    vae = models.VAE(encoder, decoder, likelihood, seed=args.seed)  # sigma-VAE
    vae.compile(keras.optimizers.Adam(args.lr))
    start = time.time()
    vae.fit(train_ds, epochs=1, steps_per_epoch=args.steps, verbose=0, shuffle=False)
    test = vae.evaluate(test_ds, return_dict=True, verbose=0)
    print(f'{splits.source}: trained {int(vae.optimizer.iterations.numpy())} steps in '
          f'{time.time() - start:.0f} s; test -ELBO {test["neg_elbo"]:.2f} nats/image, '
          f'{test["bits_per_dim"]:.3f} bits/dim (density), '
          f'{test["bits_per_dim_discrete"]:.3f} bits/dim (8-bit values), '
          f'sigma* {float(tf.exp(test["log_sigma"])):.4f}')

    z = tf.random.stateless_normal((100, args.z_dim), seed=[args.seed, 2])
    os.makedirs(os.path.dirname(os.path.abspath(args.samples)), exist_ok=True)
    files.save_png(args.samples, utils.image_grid(data.to_uint8(vae.decode(z)), 10, 10))
    print(f'wrote {args.samples}')
    return test


def main(argv=None):
    return utils.run_command('your_own_vae.py', parse_args, train, argv)


if __name__ == '__main__':
    sys.exit(main())

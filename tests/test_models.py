import numpy as np
import pytest
import tensorflow as tf

import models


@pytest.mark.parametrize('size', sorted(models.ARCHITECTURES))
@pytest.mark.parametrize('channels', [1, 3])
def test_shapes_and_range(size, channels):
    vae = models.VAE(size, channels, z_dim=5)
    x = tf.random.uniform((3, size, size, channels), -1, 1)
    x_hat, mu, log_var = vae(x, tf.random.normal((3, 5)), training=True)
    assert x_hat.shape == x.shape and mu.shape == (3, 5) and log_var.shape == (3, 5)
    assert np.all(np.abs(x_hat.numpy()) <= 1.0)
    assert vae.decoder(tf.random.normal((7, 5))).shape == (7, size, size, channels)


def test_original_28x28_layers():
    vae = models.VAE(28, 3, z_dim=20)
    convs = [l for l in vae.encoder.layers if isinstance(l, tf.keras.layers.Conv2D)]
    assert [(l.filters, l.kernel_size, l.strides) for l in convs] == [(64, (5, 5), (2, 2)),
                                                                       (128, (5, 5), (2, 2))]
    assert vae.decoder.layers[1].units == 7 * 7 * 128


@pytest.mark.parametrize('learn', [True, False])
def test_log_sigma_trainable_only_for_sigma(learn):
    vae = models.VAE(28, 1, z_dim=2, learn_sigma=learn)
    names = [v.name for v in vae.trainable_variables]
    assert ('log_sigma' in names) == learn
    assert float(vae.log_sigma) == 0.0


def test_sigma2_average_is_debiased():
    vae = models.VAE(28, 1, z_dim=2)
    assert float(vae.average_log_sigma()) == 0.0
    for _ in range(3):
        vae.update_sigma2_average(tf.constant(np.log(0.25), tf.float32))
    assert float(vae.average_log_sigma()) == pytest.approx(np.log(0.25), rel=1e-5)


def test_zero_one_range_uses_a_sigmoid_output():
    vae = models.VAE(28, 1, z_dim=3, data_range='0,1')
    x_hat = vae.decoder(tf.random.normal((64, 3)) * 10).numpy()
    assert x_hat.min() >= 0.0 and x_hat.max() <= 1.0 and x_hat.min() < 0.5
    assert vae.decoder.layers[-1].activation.__name__ == 'sigmoid'

import numpy as np
import pytest
import tensorflow as tf

import losses
import models
import networks


@pytest.mark.parametrize('size', sorted(networks.ARCHITECTURES))
@pytest.mark.parametrize('channels', [1, 3])
def test_shapes_and_range(size, channels):
    vae = models.network_vae(size, channels, 5, losses.Gaussian((-1, 1)))
    x = tf.random.uniform((3, size, size, channels), -1, 1)
    x_hat, mu, log_var = vae(x, tf.random.normal((3, 5)), training=True)
    assert x_hat.shape == x.shape and mu.shape == (3, 5) and log_var.shape == (3, 5)
    assert np.all(np.abs(x_hat.numpy()) <= 1.0)
    assert vae.decode(tf.random.normal((7, 5))).shape == (7, size, size, channels)


def test_original_28x28_layers():
    vae = models.network_vae(28, 3, 20, losses.Gaussian((-1, 1)))
    convs = [l for l in vae.encoder.layers if isinstance(l, tf.keras.layers.Conv2D)]
    assert [(l.filters, l.kernel_size, l.strides) for l in convs] == [(64, (5, 5), (2, 2)),
                                                                       (128, (5, 5), (2, 2))]
    assert vae.decoder.layers[1].units == 7 * 7 * 128


def test_batch_norm_keeps_the_originals_decay():
    vae = models.network_vae(28, 1, 2, losses.Gaussian((-1, 1)))
    norms = [l for m in (vae.encoder, vae.decoder) for l in m.layers
             if isinstance(l, tf.keras.layers.BatchNormalization)]
    assert len(norms) == 3 and all((l.momentum, l.epsilon) == (0.999, 0.001) for l in norms)


@pytest.mark.parametrize('name', ['gaussian', 'sigma', 'optimal', 'sigma_pixel'])
def test_only_the_likelihoods_own_weights_join_the_networks(name):
    vae = models.network_vae(28, 1, 2, losses.DECODERS[name]((-1, 1)))
    own = [v.name for v in vae.likelihood.trainable_variables]
    assert own == (['log_sigma'] if name == 'sigma' else [])
    assert len(vae.trainable_variables) == len(vae.encoder.trainable_variables) + len(
        vae.decoder.trainable_variables) + len(own)


def test_optimal_sigma_running_average_is_debiased():
    likelihood = losses.OptimalSigma((-1, 1), log_sigma_min=None)
    x = tf.zeros((2, 3, 3, 1))
    assert float(likelihood.test_terms(x, x)[2][0]) == 0.0  # sigma = 1 before any update
    for _ in range(3):
        likelihood.train_terms(x, x + 0.5)  # sigma*^2 = 0.25 on every batch
    assert float(likelihood.test_terms(x, x)[2][0]) == pytest.approx(np.log(0.5), rel=1e-5)


def test_zero_one_range_uses_a_sigmoid_output():
    vae = models.network_vae(28, 1, 3, losses.Gaussian((0, 1)))
    x_hat = vae.decode(tf.random.normal((64, 3)) * 10).numpy()
    assert x_hat.min() >= 0.0 and x_hat.max() <= 1.0 and x_hat.min() < 0.5
    assert vae.decoder.layers[-1].activation.__name__ == 'sigmoid'


def test_recompute_statistics_averages_the_batch_statistics_under_the_current_weights():
    vae = models.network_vae(28, 1, 3, losses.OptimalSigma((-1, 1)))
    rng = np.random.default_rng(0)
    batches = [tf.constant(rng.uniform(-1, 1, (16, 28, 28, 1)), tf.float32) for _ in range(3)]
    conv, norm = vae.encoder.layers[1], vae.encoder.layers[2]
    assert isinstance(norm, tf.keras.layers.BatchNormalization)
    # The statistics of the first batch norm's inputs, batch by batch, in NumPy.
    inputs = [conv(x).numpy().astype(np.float64) for x in batches]
    mean = np.mean([a.mean(axis=(0, 1, 2)) for a in inputs], axis=0)
    variance = np.mean([a.var(axis=(0, 1, 2)) for a in inputs], axis=0)
    decoder_norm = [l for l in vae.decoder.layers if isinstance(l, tf.keras.layers.BatchNormalization)][0]
    models.recompute_statistics(vae, batches, seed=5)
    np.testing.assert_allclose(norm.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norm.moving_variance.numpy(), variance, rtol=1e-4, atol=1e-6)
    assert not np.allclose(decoder_norm.moving_variance.numpy(), 1.0)  # the decoder's too
    assert norm.momentum == decoder_norm.momentum == networks.BN_MOMENTUM  # restored
    # Then optimal's sigma*^2: the mean over the batches of each one's MSE, soft-clipped as in
    # training, under the new batch norm statistics, z drawn as in training from (seed, k).
    mse = []
    for k, x in enumerate(batches):
        eps = tf.random.stateless_normal((16, 3), seed=[5, k])
        mu, log_var = (t.numpy().astype(np.float64) for t in vae.encoder(x, training=False))
        z = mu + np.exp(0.5 * log_var) * eps.numpy()
        x_hat = vae.decoder(tf.constant(z, tf.float32), training=False).numpy()
        mse.append(np.mean((x.numpy().astype(np.float64) - x_hat) ** 2))
    log_sigma = -6.0 + np.logaddexp(0.0, 0.5 * np.log(mse) + 6.0)  # softclip at -6
    np.testing.assert_allclose(vae.likelihood.sigma2_avg.numpy(), np.mean(np.exp(2 * log_sigma)),
                               rtol=1e-4)
    assert abs(np.mean(np.exp(2 * log_sigma)) / np.mean(mse) - 1) > 1e-3  # the clip is seen
    assert vae.likelihood.sigma2_weight.numpy() == 1.0
    assert vae.likelihood.non_trainable_variables  # what models.statistics stores with them


@pytest.mark.parametrize('shape', [(16, 7, 7, 8), (1, 1, 1, 3)])
def test_fused_batch_norm_is_keras_batch_norm(shape):
    # networks.BatchNorm computes Keras' BatchNormalization with TensorFlow's fused kernel: the
    # same outputs, gradients and moving statistics (the biased variance), in training and after.
    x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, shape), tf.float32)
    w = tf.constant(np.random.default_rng(1).normal(size=shape), tf.float32)
    fused = networks.BatchNorm(momentum=0.9, gamma_initializer='random_normal',
                               beta_initializer='random_normal')
    keras_bn = tf.keras.layers.BatchNormalization(momentum=0.9)
    for layer in (fused, keras_bn):
        layer.build(shape)
    for a, b in zip(fused.weights, keras_bn.weights):
        b.assign(a)
    seen = []
    for layer in (fused, keras_bn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * w)
        grads = tape.gradient(loss, [x] + layer.trainable_weights)
        seen.append([layer(x, training=True), *grads, layer.moving_mean, layer.moving_variance,
                     layer(x, training=False)])
    for a, b in zip(*seen):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fused_adam_is_keras_adam():
    # models.Adam updates each variable with one fused op, by Keras' formula: the same weights
    # and moments after a few steps. (Its moving average of the weights, --ema, warms up, unlike
    # Keras': test_deep.py checks it against NumPy.)
    shapes = [(3, 4), (5,)]
    seen = []
    for cls in (models.Adam, tf.keras.optimizers.Adam):
        variables = [tf.Variable(np.ones(s, np.float32)) for s in shapes]
        optimizer = cls(0.01)
        optimizer.build(variables)
        step = tf.function(lambda g: optimizer.apply_gradients(zip(g, variables)))
        grads = [[tf.constant(np.sin(np.arange(np.prod(s)) + i).reshape(s), tf.float32)
                  for s in shapes] for i in range(4)]
        for g in grads:
            step(g)
        ops = {op.type for op in step.get_concrete_function(grads[0]).graph.get_operations()}
        assert ('ResourceApplyAdam' in ops) == (cls is models.Adam)
        seen.append([v.numpy() for v in variables + optimizer.variables])
    assert not np.allclose(seen[0][0], 1.0)
    for a, b in zip(*seen):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

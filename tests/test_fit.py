"""losses.vae_loss, the one step loss of both drivers: training.Trainer and Keras' fit (models.FitVAE)."""
import ast
import math
import os
import re
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import config as settings
import losses
import models
from conftest import on_two_cpus
import trainer as training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_losses_imports_only_math_keras_and_tensorflow():
    tree = ast.parse(open(os.path.join(REPO, 'losses.py')).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add('.' if node.level else node.module.split('.')[0])
    assert imported == {'math', 'keras', 'tensorflow'}


@pytest.mark.parametrize('model', list(losses.DECODERS))
def test_vae_loss_is_the_decoders_objective_and_its_metrics(model):
    likelihood = losses.DECODERS[model]((-1, 1))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(-1, 1, (4, 6, 6, 1)), tf.float32)
    params = tf.constant(rng.uniform(-0.9, 0.9, (4, 6, 6, likelihood.params_per_value)), tf.float32)
    mu, log_var = (tf.constant(rng.normal(size=(4, 3)), tf.float32) for _ in range(2))
    beta = 0.5
    loss, stats = losses.vae_loss(likelihood, x, params, mu, log_var, beta, training=True)
    assert set(stats) == set(losses.METRICS)
    kl = tf.reduce_sum(losses.kl_divergence(mu, log_var), -1)
    if model == 'mse':  # the original's means over batch and values
        expected = (np.mean(np.square(x - params)) + beta * np.mean(losses.kl_divergence(mu, log_var)))
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    else:  # sums over the batch of -log p(x|z) + beta kl
        np.testing.assert_allclose(float(loss), 4 * float(stats['rec']) + beta * float(tf.reduce_sum(kl)),
                                   rtol=1e-5)
    np.testing.assert_allclose(float(stats['kl']), float(tf.reduce_mean(kl)), rtol=1e-6)
    np.testing.assert_allclose(float(stats['neg_elbo']), float(stats['rec'] + stats['kl']), rtol=1e-6)
    np.testing.assert_allclose(float(stats['loss']), float(stats['rec'] + beta * stats['kl']), rtol=1e-6)
    bits = (float(stats['neg_elbo']) + 36 * math.log(127.5)) / (36 * math.log(2))
    np.testing.assert_allclose(float(stats['bits_per_dim']), bits, rtol=1e-6)
    if model == 'optimal':  # sigma* is the batch RMSE (soft-clipped at log sigma = -6)
        rmse = 0.5 * math.log(np.mean(np.square(x - params)))
        np.testing.assert_allclose(float(stats['log_sigma']), float(losses.softclip(rmse, -6.0)),
                                   rtol=1e-5)
    _, test = losses.vae_loss(likelihood, x, params, mu, log_var, beta, training=False)
    assert set(test) == set(losses.METRICS) | {'bits_per_dim_discrete'}
    assert np.isfinite(float(test['bits_per_dim_discrete']))


def _trainer_and_fit(model, tmp_path, optimizer=keras.optimizers.Adam, lr=1e-3):
    """A Trainer and a FitVAE of the same weights, seed and optimizer; the FitVAE's VAE too."""
    config = settings.Config(model=model, batch_size=8, z_dim=4, seed=3, lr=lr, channels=1,
                               output_dir=str(tmp_path), experiment_name=model)
    trainer = training.Trainer(config)
    trainer.optimizer = optimizer(lr)
    trainer.optimizer.build(trainer.vae.trainable_variables)
    vae = models.make_vae(config)
    vae.set_weights(trainer.vae.get_weights())
    fit = models.FitVAE(vae.encoder, vae.decoder, vae.likelihood, config.beta, config.seed)
    fit.compile(optimizer(lr))
    return trainer, vae, fit


# Plain SGD: the update is the summed gradient itself. (With Adam, g / rms(g) turns the float32
# rounding of a near-zero gradient, which differs between the two graphs, into up to a whole
# step of lr: 1 weight in 204,800 then differed by 3% of a step after 3 steps.)
STEPS, LR = 3, 1e-5  # the losses are sums over 8 x 784 values: larger steps diverge


def assert_same_weights(before, one, two):
    """The weights two equal one to float tolerance: their changes from `before` agree to 0.1%
    of the change (and of the largest change of the tensor) plus 4 ulp of the weight."""
    for w, a, b in zip(before, one, two):
        change = np.abs(a - w)
        tolerance = 1e-3 * change + 1e-3 * change.max() + 4 * np.spacing(np.abs(w) + change)
        assert np.all(np.abs(b - a) <= tolerance), np.max(np.abs(b - a) - tolerance)


@pytest.mark.parametrize('model', ['mse', 'sigma', 'optimal', 'logistic'])
def test_fit_trains_the_weights_of_the_trainer(model, tmp_path):
    trainer, vae, fit = _trainer_and_fit(model, tmp_path, keras.optimizers.SGD, LR)
    before = [np.asarray(v) for v in vae.weights]
    x = np.random.default_rng(0).uniform(-1, 1, (STEPS * 8, 28, 28, 1)).astype('float32')
    for i in range(STEPS):
        trainer.train_step(tf.constant(x[8 * i:8 * (i + 1)]))
    history = fit.fit(tf.data.Dataset.from_tensor_slices(x).batch(8), epochs=1, shuffle=False,
                      verbose=0).history
    assert int(fit.optimizer.iterations.numpy()) == STEPS
    assert_same_weights(before, [np.asarray(v) for v in trainer.vae.weights],
                        [np.asarray(v) for v in vae.weights])
    # fit logs the mean over the epoch's steps; the Trainer's running sums hold the same.
    for k, v in trainer.train_means().items():
        assert history[k][-1] == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_evaluate_reports_the_test_elbo_and_bits_per_dim(tmp_path):
    trainer, vae, fit = _trainer_and_fit('optimal', tmp_path)
    x = np.random.default_rng(1).uniform(-1, 1, (20, 28, 28, 1)).astype('float32')
    fit.fit(tf.data.Dataset.from_tensor_slices(x[:16]).batch(8), verbose=0)
    test = fit.evaluate(tf.data.Dataset.from_tensor_slices(x).batch(8), return_dict=True, verbose=0)
    # Per-image means over all 20 images (the short last batch weighted by its 4), from test_terms.
    params, mu, log_var = vae(x, None)
    assert test['bits_per_dim'] == pytest.approx(
        losses.bits_per_dim(test['neg_elbo'], 784, math.log(127.5)), rel=1e-6)
    assert np.isfinite(test['bits_per_dim_discrete'])
    assert test['log_sigma'] == pytest.approx(float(vae.likelihood.choose_log_sigma(x, params, False, None)),
                                              rel=1e-5)
    # One path for the test metrics: Keras' evaluate() and the Trainer's (vae.test_metrics) agree
    # where the noise plays no part (the reconstruction from z = mu), closely elsewhere (evaluate()
    # draws its z from (seed, -1 - iterations), test_metrics from (seed, batch)).
    expected = vae.test_metrics(tf.data.Dataset.from_tensor_slices(x).batch(20))
    assert test['mse'] == pytest.approx(expected['test_mse'], rel=1e-5)
    assert test['rec'] == pytest.approx(expected['test_rec'], rel=0.02)


# Runs on two logical CPUs (conftest.on_two_cpus).
MIRRORED_FIT = r'''
import config as settings
import models

x = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype('float32')
result = {}
mirrored = MIRRORED
for model in sys.argv[3].split(','):
    runs = []
    for strategy in (tf.distribute.get_strategy(), mirrored):
        config = settings.Config(model=model, batch_size=8, z_dim=4, channels=1)
        keras.utils.set_random_seed(0)
        with strategy.scope():
            vae = models.make_vae(config, strategy.num_replicas_in_sync > 1)
            fit = models.FitVAE(vae.encoder, vae.decoder, vae.likelihood, seed=5)
            fit.compile(keras.optimizers.SGD(1e-5))  # the update is the summed gradient itself
        before = [np.asarray(v) for v in vae.weights]
        history = fit.fit(tf.data.Dataset.from_tensor_slices(x).batch(8).repeat(2), epochs=1,
                          shuffle=False, verbose=0).history
        test = fit.evaluate(tf.data.Dataset.from_tensor_slices(x).batch(8), return_dict=True,
                            verbose=0)
        runs.append({'replicas': strategy.num_replicas_in_sync,
                     'train': {k: v[-1] for k, v in history.items()}, 'test': test,
                     'before': [w.tolist() for w in before],
                     'change': [(np.asarray(v) - w).tolist() for v, w in zip(vae.weights, before)]})
    result[model] = runs
json.dump(result, open(os.path.join(sys.argv[2], 'result.json'), 'w'))
'''

MIRRORED_MODELS = ['mse', 'optimal', 'sigma']


@pytest.fixture(scope='module')
def mirrored_fit(tmp_path_factory):
    out = tmp_path_factory.mktemp('mirrored_fit')
    return on_two_cpus(MIRRORED_FIT, out, ','.join(MIRRORED_MODELS))


@pytest.mark.parametrize('model', MIRRORED_MODELS)
def test_mirrored_fit_step_equals_one_device(mirrored_fit, model):
    one, two = mirrored_fit[model]
    assert (one['replicas'], two['replicas']) == (1, 2)
    for stage in ('train', 'test'):  # sigma* and the metrics are the global batch's
        for key, value in one[stage].items():
            assert two[stage][key] == pytest.approx(value, rel=1e-4, abs=1e-5), (stage, key)
    for a, b in zip(one['before'], two['before']):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    for w, a, b in zip(one['before'], one['change'], two['change']):
        w, a, b = (np.asarray(t, np.float32) for t in (w, a, b))
        # As in test_distribute.py, but 1% (not 0.1%) of the tensor's largest change: synchronized
        # batch norm's statistics of the global batch round differently from one device's, and
        # one kernel entry in 204,800 of `sigma` differed by more than 0.1% of it after 2 steps.
        tolerance = 1e-3 * np.abs(a) + 1e-2 * np.abs(a).max() + 4 * np.spacing(np.abs(w) + np.abs(a))
        assert np.all(np.abs(b - a) <= tolerance), np.max(np.abs(b - a) - tolerance)


def test_the_example_trains_with_fit_and_writes_samples(image_folder, tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO, 'examples'))
    try:
        import your_own_vae
    finally:
        sys.path.pop(0)
    png = tmp_path / 'samples.png'
    test = your_own_vae.train(your_own_vae.parse_args([
        '--dataset', image_folder, '--steps', '3', '--batch_size', '8', '--z_dim', '4',
        '--samples', str(png)]))
    captured = capsys.readouterr()
    out = captured.out
    assert 'trained 3 steps' in out and 'bits/dim (density)' in out and 'bits/dim (8-bit values)' in out
    assert np.isfinite(test['bits_per_dim']) and np.isfinite(test['bits_per_dim_discrete'])
    assert captured.err == ''  # only its own lines: no warning of Keras' (shuffle=True)
    from PIL import Image
    assert Image.open(png).size == (280, 280)


def test_example_adds_the_sigma_vae_in_at_most_five_lines():
    text = open(os.path.join(REPO, 'examples', 'your_own_vae.py')).read()
    marked = [line for line in text.splitlines() if re.search(r'\S  # (noqa: \S+  # )?sigma-VAE', line)]
    assert len(marked) == 3, marked  # import, the likelihood, the Keras model
    assert 'make_encoder(image_size, channels, z_dim)' in text and 'models.make_' not in text


def test_keras_callbacks_checkpoint_log_stop_and_resume(tmp_path):
    sys.path.insert(0, os.path.join(REPO, 'examples'))
    try:
        import your_own_vae
    finally:
        sys.path.pop(0)

    def make():
        keras.utils.set_random_seed(0)
        vae = models.FitVAE(your_own_vae.make_encoder(28, 1, 4), your_own_vae.make_decoder(28, 1, 4),
                            losses.DECODERS['optimal']((-1, 1), log_sigma_min=-5.0), seed=2)
        vae.compile(keras.optimizers.Adam(1e-3))
        return vae

    x = np.random.default_rng(0).uniform(-1, 1, (16, 28, 28, 1)).astype('float32')
    ds = tf.data.Dataset.from_tensor_slices(x).batch(8)
    vae = make()
    history = vae.fit(ds, validation_data=ds, epochs=2, verbose=0, shuffle=False, callbacks=[
        keras.callbacks.ModelCheckpoint(str(tmp_path / 'vae.keras')),
        keras.callbacks.TensorBoard(str(tmp_path / 'logs')),
        keras.callbacks.EarlyStopping(monitor='val_neg_elbo', mode='min', patience=5)]).history
    assert set(history) >= {'neg_elbo', 'val_neg_elbo', 'val_bits_per_dim_discrete'}
    assert os.listdir(tmp_path / 'logs' / 'train')
    loaded = keras.models.load_model(tmp_path / 'vae.keras')  # the whole model, optimizer too
    assert type(loaded.likelihood) is losses.OptimalSigma and loaded.likelihood.log_sigma_min == -5.0
    assert int(loaded.optimizer.iterations.numpy()) == 4
    for a, b in zip(vae.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / 'backup'))
    with pytest.raises(KeyboardInterrupt):
        make().fit(ds, epochs=3, verbose=0, callbacks=[backup, Interrupt()])
    resumed = make()
    history = resumed.fit(ds, epochs=3, verbose=0, callbacks=[backup]).history
    assert len(history['loss']) == 2 and int(resumed.optimizer.iterations.numpy()) == 6

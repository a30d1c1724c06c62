"""The networks of networks.NETWORKS (--arch) and the heuristics of deep VAEs (--kl_warmup,
--free_bits, --skip_threshold), with tiny widths."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import checkpoints
import config as settings
import evaluation
import losses
import models
import networks
import run_folder
import train
import trainer as training
from conftest import on_two_cpus, random_batch as _batch, tiny_trainer as _trainer
from utils import UsageError

TINY_NET = dict(width=4, depth=1)


@pytest.mark.parametrize('model', list(losses.DECODERS))
@pytest.mark.parametrize('arch', list(networks.NETWORKS))
def test_shapes_at_28_and_32(arch, model):
    ppv = losses.DECODERS[model].params_per_value
    for size, channels in ((28, 1), (32, 3)):
        network = networks.NETWORKS[arch]
        encoder, decoder = network.build(size, channels, 5, ppv, **TINY_NET)
        z_dim = sum(network.groups(size, 5, **TINY_NET))
        assert network.groups(size, 5)[0] == 5  # the top group: --z_dim
        params, mu, log_var = models.forward(encoder, decoder, _batch(0, 2, size, channels))
        assert mu.shape == log_var.shape == (2, z_dim) and mu.dtype == tf.float32
        assert params.shape == (2, size, size, channels * ppv)
        np.testing.assert_allclose(decoder(mu), params, atol=1e-5)  # z = mu: the mean's path
        mean = params[..., :channels].numpy()
        assert np.all(np.abs(mean) <= 1.0)  # tanh on the mean only


def test_every_network_at_64_and_resnets_latent_weights():
    for arch, network in networks.NETWORKS.items():
        encoder, decoder = network.build(64, 3, 6, 2, **TINY_NET)
        assert models.forward(encoder, decoder, _batch(0, 1, 64, 3))[0].shape == (1, 64, 64, 6)
    encoder, decoder = networks.NETWORKS['resnet'].build(64, 3, 6, 2, **TINY_NET)
    # The dense heads and the decoder's first dense layer: 4 x 4 x (4 * 2^3) features at 64.
    assert networks.latent_weights(64, 6, 'resnet', 4, 1) == 6 * (3 * 4 * 4 * 32 + 2)
    dense = sum(int(np.prod(w.shape)) for m in (encoder, decoder) for layer in m.layers
                if isinstance(layer, keras.layers.Dense) for w in layer.weights)
    assert dense == networks.latent_weights(64, 6, 'resnet', 4, 1) + 4 * 4 * 32  # + its bias


def test_original_is_the_default_network():
    keras.utils.set_random_seed(0)
    a = models.network_vae(28, 1, 3, losses.Gaussian((-1, 1)))
    keras.utils.set_random_seed(0)
    b = models.network_vae(28, 1, 3, losses.Gaussian((-1, 1)), arch='original', width=64)
    assert [w.shape for w in a.weights] == [w.shape for w in b.weights]
    for u, v in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(u, v)
    assert networks.latent_weights(28, 3) == 3 * (3 * 7 * 7 * 128 + 2)


@pytest.mark.parametrize('model', list(losses.DECODERS))
@pytest.mark.parametrize('arch', list(networks.NETWORKS))
def test_a_few_steps_lower_the_loss(arch, model):
    """Eager Adam steps on one batch and one noise draw: finite, the weights move, the loss drops."""
    keras.utils.set_random_seed(1)
    vae = models.network_vae(28, 1, 3, losses.DECODERS[model]((-1, 1)), arch=arch, **TINY_NET)
    optimizer = keras.optimizers.Adam(3e-3)
    x = _batch(1)
    eps = tf.random.stateless_normal((8, vae.z_dim), seed=[1, 2])
    before = [w.numpy() for w in vae.trainable_variables]
    history = []
    for _ in range(6):
        with tf.GradientTape() as tape:
            params, mu, log_var = vae(x, eps, training=True)
            loss, stats = losses.vae_loss(vae.likelihood, x, params, mu, log_var, training=True)
        grads = tape.gradient(loss, vae.trainable_variables)
        optimizer.apply_gradients(zip(grads, vae.trainable_variables))
        history.append(float(stats['neg_elbo']))
    assert np.all(np.isfinite(history))
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, vae.trainable_variables))
    assert history[-1] < history[0]


@pytest.mark.parametrize('model', list(losses.DECODERS))
@pytest.mark.parametrize('arch', list(networks.NETWORKS))
def test_iw_nll_with_one_sample_is_the_negative_elbo_of_the_same_z(arch, model):
    """K = 1: log w = log p(x|z) + log p(z) - log q(z|x) of the one z, whose q (for a
    hierarchical network, the path's) comes from models.forward; log densities by hand."""
    keras.utils.set_random_seed(2)
    vae = models.network_vae(28, 1, 3, losses.DECODERS[model]((-1, 1)), arch=arch, **TINY_NET)
    x = tf.constant(np.round(np.random.default_rng(4).uniform(0, 255, (4, 28, 28, 1)))
                    / 127.5 - 1, tf.float32)
    nll, discrete, seen = evaluation.importance_weighted_nll(
        vae, tf.data.Dataset.from_tensor_slices(x).batch(4), 1, seed=5)
    eps = tf.random.stateless_normal((1, 4, vae.z_dim), seed=[5, 0])[0]
    params, mu, log_var = vae(x, eps)
    z = mu + np.exp(0.5 * log_var.numpy()) * eps.numpy()
    log_q = -0.5 * np.sum(eps.numpy() ** 2 + log_var.numpy() + np.log(2 * np.pi), -1)
    log_p = -0.5 * np.sum(z ** 2 + np.log(2 * np.pi), -1)
    rec, rec_discrete, _ = vae.likelihood.test_terms(x, params)
    assert seen == 4
    assert nll == pytest.approx(np.mean(rec.numpy() + log_q - log_p), rel=1e-5, abs=1e-3)
    assert discrete == pytest.approx(np.mean(rec_discrete.numpy() + log_q - log_p), rel=1e-5,
                                     abs=1e-3)


def test_hierarchical_kl_is_each_groups_gaussian_kl_in_numpy():
    """The KL the loss and the test metrics take, KL(N(m, s^2) || N(0, I)) of the whitened groups,
    against the KL of each group's z in float64: q = N(mu_p + sigma_p m, (sigma_p s)^2) and
    the conditional prior p = N(mu_p, sigma_p^2) the encoder reports for the sampled path; and
    the decoder, given that path's u, gives the encoder's output (one top-down path)."""
    keras.utils.set_random_seed(3)
    vae = models.network_vae(28, 1, 3, losses.Gaussian((-1, 1)), arch='hierarchical', **TINY_NET)
    x = _batch(5, 4)
    # Training moves the posterior heads off their start (q = p) and the prior off N(0, 1).
    optimizer = keras.optimizers.Adam(1e-2)
    for i in range(5):
        with tf.GradientTape() as tape:
            eps = tf.random.stateless_normal((4, vae.z_dim), seed=[i, 1])
            params, mu, log_var = vae(x, eps, training=True)
            loss, _ = losses.vae_loss(vae.likelihood, x, params, mu, log_var, training=True)
        optimizer.apply_gradients(zip(tape.gradient(loss, vae.trainable_variables),
                                      vae.trainable_variables))
    eps = tf.random.stateless_normal((4, vae.z_dim), seed=[9, 9])
    params, m, log_s2, mu_p, log_var_p = (t.numpy().astype(np.float64)
                                          for t in vae.encoder([x, eps]))
    assert vae.groups == [3, 4 * 7 * 7, 4 * 14 * 14]
    edges = np.cumsum(vae.groups)[:-1]
    assert np.all(mu_p[:, :3] == 0) and np.all(log_var_p[:, :3] == 0)  # the top: N(0, I)
    assert np.std(log_var_p[:, 3:]) > 1e-3 and np.std(log_s2[:, 3:]) > 1e-3
    mu_q, var_q = mu_p + np.exp(0.5 * log_var_p) * m, np.exp(log_var_p + log_s2)
    kl_z = 0.5 * (log_var_p - np.log(var_q) + (var_q + (mu_q - mu_p) ** 2) / np.exp(log_var_p)
                  - 1)
    expected = [g.sum(-1) for g in np.split(kl_z, edges, axis=1)]
    kl = losses.kl_divergence(tf.constant(m, tf.float32), tf.constant(log_s2, tf.float32))
    for got, want in zip(tf.split(kl, vae.groups, -1), expected):
        np.testing.assert_allclose(tf.reduce_sum(got, -1).numpy(), want, rtol=1e-4, atol=1e-4)
    assert all(np.all(e > 0) for e in expected)
    u = m + np.exp(0.5 * log_s2) * eps.numpy()
    np.testing.assert_allclose(vae.decoder(tf.constant(u, tf.float32)).numpy(), params,
                               atol=1e-4)
    # The test metrics' per-group KLs are the same sums (their own noise: not the values above).
    stats = vae.test_metrics(tf.data.Dataset.from_tensor_slices(x).batch(4))
    assert stats['test_kl'] == pytest.approx(sum(stats[f'test_kl_group{l}'] for l in range(3)),
                                             rel=1e-5)


# ---- the config: --arch, --width, --depth, and runs written before them ------------------

def test_flags_and_their_checks():
    config = train.parse_args(['--arch', 'resnet', '--width', '16', '--depth', '3',
                               '--kl_warmup', '100', '--free_bits', '0.25',
                               '--skip_threshold', '400'])
    assert (config.arch, config.width, config.depth) == ('resnet', 16, 3)
    assert (config.kl_warmup, config.free_bits, config.skip_threshold) == (100, 0.25, 400.0)
    default = train.parse_args([])
    assert (default.arch, default.width, default.depth) == ('original', None, None)
    assert default.kl_warmup is default.free_bits is default.skip_threshold is None
    with pytest.raises(UsageError, match='no --depth'):
        settings.Config(arch='original', depth=2).check()
    with pytest.raises(UsageError, match='--arch'):
        settings.Config(arch='nope').check()
    for key in ('arch', 'width', 'depth'):
        assert settings.Config.__dataclass_fields__[key].metadata['resume'] == settings.MODEL
    import compare
    assert {'arch', 'width', 'depth'} <= set(compare.SHARED_FLAGS)


@pytest.mark.parametrize('argv, words', [
    (['--arch', 'vgg'], "invalid choice: 'vgg'"),
    (['--depth', '2'], '--arch original has no --depth'),
    (['--arch', 'resnet', '--width', '0'], "--width: must be a positive integer, got '0'"),
    (['--kl_warmup', '-1'], "--kl_warmup: must be a positive integer, got '-1'"),
    (['--free_bits', 'inf'], "--free_bits: must be a positive number, got 'inf'"),
    (['--skip_threshold', '0'], "--skip_threshold: must be a positive number, got '0'"),
])
def test_bad_flags_exit_2_with_one_line(argv, words, capsys):
    from conftest import run
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and 'Traceback' not in ''.join(err)


def _fake_run(tmp_path, saved):
    """A run folder with config.json `saved` and one (meaningless) checkpoint."""
    run_dir = tmp_path / 'old'
    os.makedirs(run_dir / 'checkpoints')
    (run_dir / 'config.json').write_text(json.dumps(saved))
    tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1)),
                               str(run_dir / 'checkpoints'), 3).save(checkpoint_number=1)
    return run_dir


def test_a_config_json_without_arch_is_the_original(tmp_path):
    fields = settings.Config(channels=1, output_dir=str(tmp_path), experiment_name='old')
    saved = {k: v for k, v in vars(fields).items()
             if k not in ('arch', 'width', 'depth', 'kl_warmup', 'free_bits', 'skip_threshold')}
    run_dir = _fake_run(tmp_path, saved)
    assert run_folder.read_config(str(run_dir)).arch == 'original'
    same = settings.Config(**{**saved, 'width': 64})  # the original's own width
    assert training.check_resume(same) == []
    with pytest.raises(UsageError, match='--arch original, not resnet'):
        training.check_resume(settings.Config(**{**saved, 'arch': 'resnet'}))
    with pytest.raises(UsageError, match='--width 64, not 32'):
        training.check_resume(settings.Config(**{**saved, 'width': 32}))
    # The heuristics may change on resume: they are said, not refused.
    assert training.check_resume(settings.Config(**{**saved, 'free_bits': 1.0})) == [
        '--free_bits None -> 1.0']


# ---- the heuristics ------------------------------------------------------------------------

@pytest.mark.parametrize('step', [0, 1, 7, 10, 25])
def test_kl_warmup_weight_is_linear_then_beta(step):
    expected = 0.5 * min(1.0, step / 10)
    np.testing.assert_allclose(float(losses.kl_weight(0.5, tf.constant(step, tf.int64), 10)),
                               expected, rtol=1e-6)
    assert losses.kl_weight(0.5, step, None) == 0.5


def test_free_bits_value_and_no_gradient_below_lambda():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(-1, 1, (4, 6, 6, 1)), tf.float32)
    params = tf.constant(rng.uniform(-0.9, 0.9, (4, 6, 6, 1)), tf.float32)
    # Group 1 (dims 0-1) has a small KL, group 2 (dims 2-4) a large one.
    mu = tf.Variable(np.concatenate([rng.normal(0, 0.1, (4, 2)), rng.normal(0, 3, (4, 3))], -1),
                     dtype=tf.float32)
    log_var = tf.Variable(np.zeros((4, 5)), dtype=tf.float32)
    lam = 1.0
    with tf.GradientTape(persistent=True) as tape:
        groups = [losses.kl_divergence(mu[:, :2], log_var[:, :2]),
                  losses.kl_divergence(mu[:, 2:], log_var[:, 2:])]
        gaussian = losses.Gaussian((-1, 1))
        plain, stats = losses.vae_loss(gaussian, x, params, mu, log_var, training=True,
                                       groups=[2, 3])
        loss, fb_stats = losses.vae_loss(gaussian, x, params, mu, log_var, training=True,
                                         free_bits=lam, groups=[2, 3])
        big = tf.reduce_sum(groups[1])
    small_mean = float(tf.reduce_mean(tf.reduce_sum(groups[0], -1)))
    assert small_mean < lam < float(tf.reduce_mean(tf.reduce_sum(groups[1], -1)))
    rec = 4 * float(stats['rec'])
    np.testing.assert_allclose(float(plain), rec + float(tf.reduce_sum(groups[0])) + float(big),
                               rtol=1e-5)
    np.testing.assert_allclose(float(loss), rec + 4 * max(lam, small_mean) + float(big), rtol=1e-5)
    assert float(fb_stats['kl']) == float(stats['kl'])  # the metrics keep the true KL
    grad = tape.gradient(loss, mu).numpy()
    np.testing.assert_array_equal(grad[:, :2], 0.0)  # below lambda: no gradient
    np.testing.assert_allclose(grad[:, 2:], tape.gradient(big, mu).numpy()[:, 2:], rtol=1e-6)
    # One group (a single-latent network): the whole z, below lambda here.
    loss1, _ = losses.vae_loss(losses.Gaussian((-1, 1)), x, params, mu[:, :2], log_var[:, :2],
                               training=True, free_bits=lam)
    np.testing.assert_allclose(float(loss1), rec + 4 * lam, rtol=1e-5)
    # mse's means: the floor is a mean too (lambda / Z per dimension, averaged).
    loss_mse, _ = losses.vae_loss(losses.MSE((-1, 1)), x, params, mu[:, :2], log_var[:, :2],
                                  training=True, free_bits=lam)
    np.testing.assert_allclose(float(loss_mse), float(tf.reduce_mean(tf.square(x - params)))
                               + lam / 2, rtol=1e-5)


def test_skip_threshold_skips_the_update_and_counts_it(tmp_path):
    trainer = _trainer(tmp_path, 'skip', width=4, skip_threshold=1e-6)
    before = [w.numpy() for w in trainer.vae.trainable_variables]
    stats = trainer.train_step(_batch(0))
    assert np.isfinite(float(stats['loss']))
    for b, w in zip(before, trainer.vae.trainable_variables):
        np.testing.assert_array_equal(b, w.numpy())
    assert int(trainer.skipped_updates.numpy()) == 1 and int(trainer.optimizer.iterations) == 0
    assert int(trainer.step.numpy()) == 1  # a step was taken, its update skipped
    trainer.config.skip_threshold = 1e12  # read when traced: a new trainer would see it
    trainer.train_step = tf.function(trainer._train_step)
    trainer.train_step(_batch(1))
    assert int(trainer.skipped_updates.numpy()) == 1 and int(trainer.optimizer.iterations) == 1
    assert any(not np.array_equal(b, w.numpy())
               for b, w in zip(before, trainer.vae.trainable_variables))


@pytest.mark.parametrize('arch, ema', [('resnet', None), ('hierarchical', None),
                                       ('hierarchical', 0.9)])
def test_resume_equals_an_uninterrupted_run(tmp_path, arch, ema):
    """Two steps, a checkpoint, a new process's trainer restoring it, two more steps: the
    weights of four uninterrupted steps (batch norm statistics, optimizer and --ema's average,
    step and counters)."""
    options = dict(arch=arch, **TINY_NET, kl_warmup=3, free_bits=0.1, skip_threshold=1e6, ema=ema)
    batches = [_batch(i) for i in range(4)]
    whole = _trainer(tmp_path, 'whole', **options)
    for x in batches:
        whole.train_step(x)
    first = _trainer(tmp_path, 'parts', **options)
    for x in batches[:2]:
        first.train_step(x)
    first.save()
    second = _trainer(tmp_path, 'parts', **options)
    assert second.restore()
    assert int(second.step.numpy()) == 2
    for x in batches[2:]:
        second.train_step(x)
    for a, b in zip(whole.optimizer.variables, second.optimizer.variables):  # the average too
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(whole.vae.weights, second.vae.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(second.skipped_updates.numpy()) == int(whole.skipped_updates.numpy()) == 0


# Runs on two logical CPUs (conftest.on_two_cpus).
MIRRORED_HEURISTICS = r'''
import config as settings
import trainer as training

x = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype('float32')
mirrored = MIRRORED
result = []
for arch, name, strategy, threshold in (
        ('resnet', 'one', tf.distribute.get_strategy(), 1e9), ('resnet', 'two', mirrored, 1e9),
        ('resnet', 'skip', mirrored, 1e-6),
        ('hierarchical', 'one', tf.distribute.get_strategy(), 1e9),
        ('hierarchical', 'two', mirrored, 1e9)):
    config = settings.Config(model='optimal', batch_size=8, z_dim=4, output_dir=sys.argv[2],
                               experiment_name=arch + name, channels=1, arch=arch, width=4, depth=1,
                               kl_warmup=1, free_bits=0.5, skip_threshold=threshold)
    trainer = training.Trainer(config, strategy)
    with strategy.scope():
        trainer.optimizer = keras.optimizers.SGD(1e-5)
        trainer.optimizer.build(trainer.vae.trainable_variables)
    before = [np.asarray(v) for v in trainer.vae.trainable_variables]
    batches = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(8))
    for _ in range(2):
        for batch in batches:
            stats = trainer.train_step(batch)
    result.append({'loss': float(stats['loss']), 'skipped': int(trainer.skipped_updates.numpy()),
                   'change': [(np.asarray(v) - w).tolist()
                              for v, w in zip(trainer.vae.trainable_variables, before)]})
json.dump(result, open(os.path.join(sys.argv[2], 'result.json'), 'w'))
'''


def test_the_heuristics_on_two_replicas_equal_one_device(tmp_path):
    """kl_warmup, free_bits and skip_threshold under MirroredStrategy: the step of one device
    (the free-bits test and the gradient norm are the global batch's), and a skip is a skip."""
    results = on_two_cpus(MIRRORED_HEURISTICS, tmp_path)
    for one, two in (results[:2], results[3:]):  # resnet, hierarchical (its free bits per group)
        assert two['loss'] == pytest.approx(one['loss'], rel=1e-4)
        assert one['skipped'] == two['skipped'] == 0
        for a, b in zip(one['change'], two['change']):
            a, b = np.asarray(a), np.asarray(b)
            assert np.abs(a).max() > 0 or np.abs(b).max() == 0
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max() + 1e-9)
    skip = results[2]
    assert skip['skipped'] == 2
    assert all(np.abs(np.asarray(c)).max() == 0 for c in skip['change'])


@pytest.mark.parametrize('arch', ['resnet', 'hierarchical'])
def test_fit_with_kl_warmup_and_free_bits_trains_the_weights_of_the_trainer(tmp_path, arch):
    from test_fit import LR, STEPS, assert_same_weights
    options = dict(arch=arch, **TINY_NET, kl_warmup=2, free_bits=0.5)
    trainer = _trainer(tmp_path, 'heuristics', lr=LR, **options)
    trainer.optimizer = keras.optimizers.SGD(LR)
    trainer.optimizer.build(trainer.vae.trainable_variables)
    vae = models.make_vae(trainer.config)
    vae.set_weights(trainer.vae.get_weights())
    fit = models.FitVAE(vae.encoder, vae.decoder, vae.likelihood, seed=3, kl_warmup=2,
                        free_bits=0.5, groups=vae.groups)
    fit.compile(keras.optimizers.SGD(LR))
    assert (fit.get_config()['kl_warmup'], fit.get_config()['free_bits']) == (2, 0.5)
    before = [np.asarray(v) for v in vae.weights]
    x = np.random.default_rng(0).uniform(-1, 1, (STEPS * 8, 28, 28, 1)).astype('float32')
    for i in range(STEPS):
        trainer.train_step(tf.constant(x[8 * i:8 * (i + 1)]))
    history = fit.fit(tf.data.Dataset.from_tensor_slices(x).batch(8), epochs=1, shuffle=False,
                      verbose=0).history
    assert_same_weights(before, [np.asarray(v) for v in trainer.vae.weights],
                        [np.asarray(v) for v in vae.weights])
    for k, v in trainer.train_means().items():
        assert history[k][-1] == pytest.approx(v, rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize('precision, scaled', [('float16', True), ('bfloat16', False)])
@pytest.mark.parametrize('arch', ['resnet', 'hierarchical'])
def test_mixed_precision_computes_in_half_and_keeps_the_loss_terms_float32(tmp_path, arch,
                                                                          precision, scaled):
    keras.mixed_precision.set_dtype_policy(training.POLICIES[precision])
    try:
        trainer = _trainer(tmp_path, 'mp', arch=arch, **TINY_NET, mixed_precision=precision)
        convolutions = [layer for layer in trainer.vae.encoder.layers
                        if isinstance(layer, keras.layers.Conv2D)]
        assert convolutions[0].compute_dtype == precision
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer) == scaled
        x = _batch(0)
        outputs = trainer.vae(x, tf.zeros((8, trainer.vae.z_dim)), training=True)
        assert [t.dtype for t in outputs] == [tf.float32] * 3
        stats = trainer.train_step(x)
        for name, value in stats.items():
            assert value.dtype == tf.float32 and np.isfinite(float(value)), name
        assert all(v.dtype == 'float32' for v in trainer.vae.weights)
    finally:
        keras.mixed_precision.set_dtype_policy('float32')


def test_skipped_updates_in_the_metrics_rows_across_a_resume(image_folder, tmp_path, monkeypatch):
    import trainer
    from conftest import TINY, run
    # Every update is skipped, which stops a run (test_train.py tests that): not here, where
    # the counter is the subject.
    monkeypatch.setattr(trainer.Loop, 'check_skipping', lambda self, step: None)
    args = ['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 's',
            '--width', '4', '--skip_threshold', '1e-6'] + TINY
    assert run(args + ['--max_steps', '2']) == 0
    assert run(args + ['--max_steps', '3']) == 0  # restores the counter from the checkpoint
    rows = [json.loads(line) for line in open(tmp_path / 's' / 'metrics.jsonl')]
    assert [(r['step'], r['skipped_updates']) for r in rows] == [(2, 2), (3, 3)]


def test_a_checkpoint_without_counters_restores_them_at_zero(tmp_path):
    step = tf.Variable(5, dtype=tf.int64)
    checkpoints.Checkpoints(str(tmp_path), dict(step=step)).save(5, [])
    skipped = tf.Variable(7, dtype=tf.int64)
    folder = checkpoints.Checkpoints(str(tmp_path), dict(step=step),
                                         counters=dict(skipped_updates=skipped))
    assert folder.restore().endswith("ckpt-5")
    assert int(skipped.numpy()) == 0


def test_compare_gives_the_heuristics_to_their_runs_only(tmp_path, capsys):
    import compare
    common = ['--output_dir', str(tmp_path), '--models', 'sigma', '--arch', 'hierarchical']
    args = compare.parse_args(common + ['--heuristics', 'gaussian', '--kl_warmup', '10',
                                        '--free_bits', '0.5'])
    assert [(label, c.model, c.experiment_name, c.arch, c.kl_warmup, c.free_bits,
             c.skip_threshold) for label, c, _ in compare.runs(args)] == [
        ('sigma', 'sigma', 'sigma', 'hierarchical', None, None, None),
        ('gaussian + kl_warmup, free_bits', 'gaussian', 'gaussian_heuristics', 'hierarchical',
         10, 0.5, None)]
    with pytest.raises(SystemExit):  # --heuristics without a heuristic
        compare.parse_args(common + ['--heuristics', 'gaussian'])
    assert '--heuristics needs at least one of' in capsys.readouterr().err
    result = {'test_kl_group0': 19.44, 'test_kl_group1': 71.5, 'active_units_group0': 20,
              'active_units_group1': 0}
    assert compare.group_summary(result) == {'kl_per_group': '19.4 / 71.5',
                                             'active_per_group': '20 / 0'}
    assert compare.group_summary({'test_kl': 3.0}) == {'kl_per_group': None,
                                                       'active_per_group': None}

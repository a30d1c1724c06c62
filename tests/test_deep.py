"""The deep sigma-VAE's tools: the posterior of the hierarchical network's lower groups, the
moving average of the weights (--ema)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import checkpoints
import config as settings
import losses
import models
import run_folder
import trainer as training
from conftest import REPO, random_batch as _batch, run, tiny_trainer as _trainer, trained_run

TINY_NET = dict(width=4, depth=1)


# ---- the posterior of the lower groups ------------------------------------------------------

def test_a_new_hierarchical_network_starts_with_every_lower_group_at_the_prior():
    # posterior 'z': the prior and the posterior convolutions start at 0, so q = p = N(0, I)
    # in every lower group: their KL is 0 exactly, whatever the image.
    vae = models.network_vae(28, 1, 3, losses.Gaussian((-1, 1)), arch='hierarchical', **TINY_NET)
    x = tf.constant(np.random.default_rng(1).uniform(-1, 1, (4, 28, 28, 1)), tf.float32)
    _, m, log_s2, mu_p, log_var_p = vae.encoder([x, tf.zeros((4, vae.z_dim))])
    lower = slice(vae.groups[0], None)
    for t in (m, log_s2, mu_p, log_var_p):
        assert np.all(t.numpy()[:, lower] == 0)
    residual = models.network_vae(28, 1, 3, losses.Gaussian((-1, 1)), arch='hierarchical',
                                  posterior='residual', **TINY_NET)
    _, _, _, mu_p, _ = residual.encoder([x, tf.zeros((4, vae.z_dim))])
    assert np.std(mu_p.numpy()[:, lower]) > 1e-3  # the earlier design: a random prior


def test_a_hierarchical_config_json_written_before_the_setting_is_the_residual_design(tmp_path):
    saved = {k: v for k, v in vars(settings.Config(arch='hierarchical', channels=1)).items()
             if k not in ('posterior', 'ema')}
    config = settings.config_from_dict(saved, 'config.json')
    assert config.posterior == 'residual' and config.network()['posterior'] == 'residual'
    assert settings.Config(arch='hierarchical').network()['posterior'] == 'z'
    with pytest.raises(settings.UsageError, match='--posterior residual, not z'):
        settings.resume_changes(config, settings.Config(arch='hierarchical', channels=1,
                                                        experiment_name='r'))
    with pytest.raises(settings.UsageError, match='--arch original has no --posterior'):
        settings.Config(posterior='z').check()


# ---- the moving average of the weights ------------------------------------------------------

def test_the_average_is_numpys_moving_average_of_the_trained_weights(tmp_path):
    decay = 0.3
    trainer = _trainer(tmp_path, 'ema', arch='hierarchical', ema=decay, **TINY_NET)
    average = None
    for n in range(6):
        trainer.train_step(_batch(n))
        trained = [v.numpy().astype(np.float64) for v in trainer.vae.trainable_variables]
        # The first step's average is its weights; then avg = d avg + (1 - d) w with
        # TensorFlow's warm-up d = min(decay, (1 + n) / (10 + n)): 2/11, 3/12, then 0.3.
        d = min(decay, (1 + n) / (10 + n))
        average = trained if average is None else [d * a + (1 - d) * w
                                                   for a, w in zip(average, trained)]
    with models.averaged(trainer.vae, trainer.optimizer):
        for a, v in zip(average, trainer.vae.trainable_variables):
            np.testing.assert_allclose(v.numpy(), a, rtol=1e-5, atol=1e-6)
    for w, v in zip(trained, trainer.vae.trainable_variables):  # the trained weights are back
        np.testing.assert_array_equal(v.numpy(), w.astype(np.float32))


def test_evaluation_and_generation_use_the_average_and_say_so(image_folder, tmp_path, capsys):
    run_dir = trained_run(tmp_path, image_folder, 'e', '--ema', '0.5', '--max_steps', '3')
    assert 'moving average of the weights (--ema 0.5)' in capsys.readouterr().out
    config = run_folder.read_config(str(run_dir))
    trainer = training.Trainer(config)
    trainer.restore()
    with models.averaged(trainer.vae, trainer.optimizer):
        expected = [v.numpy() for v in trainer.vae.trainable_variables]
    trained = [v.numpy() for v in trainer.vae.trainable_variables]
    _, vae, _ = checkpoints.load_model(str(run_dir), statistics=False)
    assert 'the moving average of the weights (--ema 0.5) of ckpt-3' in capsys.readouterr().out
    for a, v in zip(expected, vae.trainable_variables):
        np.testing.assert_array_equal(v.numpy(), a)
    # The weights trained, on request (benchmarks/ema_vs_trained.py): their statistics are
    # recomputed but not stored, since the file beside ckpt-3 would be the average's.
    before = sorted(os.listdir(run_dir / 'checkpoints'))
    _, vae, _ = checkpoints.load_model(str(run_dir), average=False)
    assert 'the weights trained (not their moving average, --ema 0.5) of ckpt-3' in (
        capsys.readouterr().out)
    assert sorted(os.listdir(run_dir / 'checkpoints')) == before
    for w, a, v in zip(trained, expected, vae.trainable_variables):
        np.testing.assert_array_equal(v.numpy(), w)
    assert any(not np.array_equal(w, a) for w, a in zip(trained, expected))
    # A run's average is part of its model: another --ema is refused on resume.
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name',
                'e', '--ema', '0.9', '--max_steps', '4', '--batch_size', '8', '--z_dim', '4',
                '--sample_every', '2', '--seed', '1']) == 2
    assert '--ema 0.5, not 0.9' in capsys.readouterr().err
    assert json.load(open(run_dir / 'config.json'))['ema'] == 0.5


def test_the_epoch_end_evaluates_the_average_as_evaluate_does(image_folder, tmp_path):
    # optimal's sigma for evaluation is a running average of the training batches' sigma*, of
    # the weights trained; the average of the weights has another MSE. The metrics row, like
    # load_model, recomputes it (and batch norm's statistics) for the average.
    import data
    run_dir = trained_run(tmp_path, image_folder, 'o', '--model', 'optimal', '--ema', '0.5',
                          '--max_steps', '3')
    row = [json.loads(line) for line in open(run_dir / 'metrics.jsonl')][-1]
    config, vae, state = checkpoints.load_model(str(run_dir))
    test_ds = data.make_pipeline(state.splits.test, config.image_size, config.batch_size,
                                 drop_remainder=False, data_range=config.data_range)
    evaluated = vae.test_metrics(test_ds, config.seed)
    for key in ('test_log_sigma', 'test_neg_elbo', 'test_mse', 'test_bits_per_dim_discrete'):
        np.testing.assert_allclose(row[key], evaluated[key], rtol=1e-5, err_msg=key)
    trainer = training.Trainer(run_folder.read_config(str(run_dir)))
    trainer.restore()  # the sigma that training kept, of the weights trained
    likelihood = trainer.vae.likelihood
    kept = 0.5 * np.log(likelihood.sigma2_avg.numpy() / likelihood.sigma2_weight.numpy())
    assert abs(kept - row['test_log_sigma']) > 1e-3


def test_statistics_of_gone_checkpoints_are_deleted_in_either_format(tmp_path):
    # Earlier versions stored batch norm's statistics alone as ckpt-N.batch_norm.npz: never
    # read now, and deleted with their checkpoint like the present ckpt-N.statistics.npz.
    for name in ('ckpt-2.index', 'ckpt-2.batch_norm.npz', 'ckpt-2.statistics.npz',
                 'ckpt-1.batch_norm.npz', 'ckpt-1.statistics.npz', 'notes.npz'):
        (tmp_path / name).write_bytes(b'x')
    checkpoints.remove_orphan_statistics(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['ckpt-2.batch_norm.npz', 'ckpt-2.index',
                                            'ckpt-2.statistics.npz', 'notes.npz']


# ---- sampling temperature -------------------------------------------------------------------

def test_a_temperature_scales_each_groups_draw(image_folder, tmp_path):
    import generate
    import priors
    run_dir = str(trained_run(tmp_path, image_folder, 'h', '--arch', 'hierarchical', '--width',
                              '4', '--max_steps', '2'))
    config, vae, _ = checkpoints.load_model(run_dir)
    t = [1.0, 0.5, 0.25]  # top, 7x7, 14x14
    z = priors.prior_z(6, vae.z_dim, 3) * np.repeat(t, vae.groups)
    want = models.decode_images(vae, z, config.data_range)
    out = tmp_path / 's.npz'
    assert generate.main(['sample', '--run', run_dir, '--n', '6', '--seed', '3', '--temperature',
                          '1,0.5,0.25', '--out', str(out)]) == 0
    np.testing.assert_array_equal(np.load(out)['images'], want)
    assert generate.main(['sample', '--run', run_dir, '--temperature', '0.5,0.5', '--out',
                          str(out)]) == 2
    with pytest.raises(ValueError):
        priors.temperatures([1.0, 0.0, 1.0], vae.groups)
    # The SavedModel's sample_at: sample itself at t = 1, the same scaled draw otherwise.
    assert generate.main(['export', '--run', run_dir, '--out', str(tmp_path / 'm')]) == 0
    loaded = tf.saved_model.load(str(tmp_path / 'm'))
    at = loaded.sample_at(n=6, seed=np.int64(3), temperature=np.float32(t))['images'].numpy()
    assert np.abs(at.astype(int) - want.astype(int)).max() <= 1  # float32 against float64 rounding
    np.testing.assert_array_equal(
        loaded.sample(n=4, seed=np.int64(1))['images'].numpy(),
        loaded.sample_at(n=4, seed=np.int64(1), temperature=np.ones(3, np.float32))['images'].numpy())
    # examples/sample_pretrained.py: the same draw at one temperature for every group, as a grid,
    # in a process that imports no module of this project.
    grid = tmp_path / 'grid.png'
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'examples', 'sample_pretrained.py'),
                           str(tmp_path / 'm'), '--n', '4', '--seed', '1', '--temperature', '0.5',
                           '--out', str(grid)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    half = loaded.sample_at(n=4, seed=np.int64(1), temperature=np.full(3, 0.5, np.float32))
    cells = np.asarray(Image.open(grid))
    np.testing.assert_array_equal(cells[:28, :28], half['images'].numpy()[0, ..., 0])
    np.testing.assert_array_equal(cells[28:, 28:], half['images'].numpy()[3, ..., 0])


# ---- batch norm's statistics, stored beside their checkpoint ---------------------------------

def test_batch_norm_statistics_are_recomputed_once_per_checkpoint(image_folder, tmp_path, capsys):
    run_dir = trained_run(tmp_path, image_folder, 'b', '--max_steps', '2')
    capsys.readouterr()
    _, first, _ = checkpoints.load_model(str(run_dir))
    assert "recomputing batch norm's and the likelihood's statistics for ckpt-2" in (
        capsys.readouterr().out)
    stored = run_dir / 'checkpoints' / ('ckpt-2' + checkpoints.STATISTICS_SUFFIX)
    assert stored.exists()
    _, second, _ = checkpoints.load_model(str(run_dir))
    assert 'recomputing' not in capsys.readouterr().out
    for a, b in zip(models.batch_norm_layers(first), models.batch_norm_layers(second)):
        np.testing.assert_array_equal(a.moving_mean.numpy(), b.moving_mean.numpy())
        np.testing.assert_array_equal(a.moving_variance.numpy(), b.moving_variance.numpy())
    # Another checkpoint of the same step (a restart) has another index: computed again.
    index = run_dir / 'checkpoints' / 'ckpt-2.index'
    index.write_bytes(index.read_bytes())  # the same bytes: still served
    checkpoints.load_model(str(run_dir))
    assert 'recomputing' not in capsys.readouterr().out
    np.savez(stored, **{**dict(np.load(stored)), 'index_sha256': np.array('another')})
    checkpoints.load_model(str(run_dir))
    assert 'recomputing' in capsys.readouterr().out
    # Rotated out with its checkpoint: a resume saves ckpt-3..5, keeps 3, and the statistics
    # of a checkpoint that is gone go with it.
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name',
                'b', '--max_steps', '5', '--checkpoint_every', '1', '--batch_size', '8',
                '--z_dim', '4', '--sample_every', '2', '--seed', '1']) == 0
    assert not stored.exists()

"""evaluate.py and compare.py against closed forms, NumPy references and a tiny run."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import compare
import data
import evaluate
import losses
import models
import run_folder
from conftest import trained_run as tiny_run
import checkpoints
import config as settings
import evaluation
import features as features_module

RNG = np.random.default_rng(0)

def test_log_importance_weights_match_numpy():
    b, z_dim = 3, 4
    nll = RNG.normal(size=b)
    mu, log_var, z = (RNG.normal(size=(b, z_dim)) for _ in range(3))
    log_pz = -0.5 * np.sum(z ** 2 + np.log(2 * np.pi), axis=1)
    log_qz = -0.5 * np.sum((z - mu) ** 2 / np.exp(log_var) + log_var + np.log(2 * np.pi), axis=1)
    got = losses.log_importance_weights(*(tf.constant(v, tf.float64) for v in (nll, z, mu, log_var)))
    np.testing.assert_allclose(got.numpy(), -nll + log_pz - log_qz, rtol=1e-10)


@pytest.fixture(scope='module')
def trained_run(image_folder, tmp_path_factory):
    return str(tiny_run(tmp_path_factory.mktemp('runs'), image_folder, 'r', '--model',
                        'optimal', '--max_steps', '3'))


def test_iw_nll_does_not_increase_with_k(trained_run):
    config, vae, _ = checkpoints.load_model(trained_run)
    splits = data.load(config.dataset, image_size=28, seed=config.seed)
    train_ds = data.make_pipeline(splits.train, 28, 8, drop_remainder=False)
    nll = np.array([evaluation.importance_weighted_nll(vae, train_ds, k)[:2] for k in (1, 10, 100)])
    assert np.all(nll[0] >= nll[1]) and np.all(nll[1] >= nll[2]), nll  # density and 8-bit values


def test_evaluate_cli_writes_json_and_exports_samples(trained_run, capsys):
    assert evaluate.main(['--run', trained_run, '--iw_samples', '5', '--fid_samples', '4',
                          '--export']) == 0
    result = json.load(open(os.path.join(trained_run, 'evaluation.json')))
    for key in ('test_neg_elbo', 'iw_nll', 'iw_bits_per_dim', 'fid_domain', 'test_bits_per_dim',
                'test_bits_per_dim_discrete', 'iw_bits_per_dim_discrete'):
        assert np.isfinite(result[key]), key
    assert result['fid_domain'] >= 0 and result['fid_samples'] == 4
    # Both priors by default: the mixture, fitted first (10 components), gets its own FID.
    assert result['fid_domain_gmm'] >= 0 and result['fid_domain_gmm'] != result['fid_domain']
    assert result['gmm_components'] == 10
    # Both feature networks by default, each with every distance under both priors.
    for network in ('domain', 'vgg'):
        assert 0 <= result[f'{network}_classifier_test_accuracy'] <= 1
        for prior in ('', '_gmm', '_train_images'):
            for distance in ('fid', 'kid', 'kid_std', 'precision', 'recall'):
                assert np.isfinite(result[f'{distance}_{network}{prior}']), (distance, network, prior)
            assert 0 <= result[f'precision_{network}{prior}'] <= 1
            assert 0 <= result[f'recall_{network}{prior}'] <= 1
    # The reference of real images: the first 4 training images against the first 4 test
    # images, through the cached classifier's feature layer, by hand.
    import keras
    classifier = keras.models.load_model(result['domain_classifier'])
    features = keras.Model(classifier.input, classifier.get_layer('features').output)
    config = run_folder.read_config(trained_run)
    splits = data.load(config.dataset, image_size=28, seed=config.seed)
    train_x, test_x = (np.stack([x.numpy() for x in split.take(4)]) for split in (splits.train, splits.test))
    want = features_module.frechet_distance(
        *features_module.feature_statistics(features(train_x).numpy()),
        *features_module.feature_statistics(features(test_x).numpy()))
    assert result['fid_domain_train_images'] == pytest.approx(want, rel=1e-4, abs=1e-6)
    out = capsys.readouterr().out
    assert 'fid_domain_gmm' in out and 'fitted a 10-component Gaussian mixture' in out
    for name in ('samples', 'samples_gmm'):
        exported = np.load(os.path.join(trained_run, name + '.npz'))
        images = exported['images']
        assert images.dtype == np.uint8 and images.shape == (4, 28, 28, 1)
        assert str(exported['model_data_range']) == '-1,1'
        for i, image in enumerate(images):
            png = np.asarray(Image.open(os.path.join(trained_run, name + '_png', f'{i:06d}.png')))
            np.testing.assert_array_equal(png, image[..., 0])
    for name in ('evaluated_samples', 'evaluated_samples_gmm'):  # what each FID saw
        grid = np.asarray(Image.open(os.path.join(trained_run, 'images', name + '_00000003.png')))
        assert grid.shape == (280, 280) and not grid[28:].any()  # 4 samples in the first row
        exported = np.load(os.path.join(trained_run, name[10:] + '.npz'))['images']
        np.testing.assert_array_equal(grid[:28].reshape(28, 10, 28)[:, :4].transpose(1, 0, 2),
                                      exported[..., 0])

    # One prior alone; the mixture is not fitted again (it belongs to this checkpoint).
    assert evaluate.main(['--run', trained_run, '--iw_samples', '2', '--fid_samples', '4',
                          '--prior', 'gmm']) == 0
    result = json.load(open(os.path.join(trained_run, 'evaluation.json')))
    assert 'fid_domain' not in result and result['fid_domain_gmm'] >= 0
    assert 'fitted' not in capsys.readouterr().out


def test_evaluate_refuses_an_unknown_prior(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(['--run', 'r', '--prior', 'normal,uniform'])
    assert e.value.code == 2 and '--prior must list priors of normal, gmm' in capsys.readouterr().err


def test_inception_weights_that_cannot_serve_are_refused_before_the_work(trained_run, tmp_path,
                                                                         capsys, monkeypatch):
    import h5py
    monkeypatch.setattr(checkpoints, 'load_model', lambda *a, **k: pytest.fail('loaded'))
    (tmp_path / 'text.h5').write_text('not HDF5')
    with h5py.File(tmp_path / 'other.h5', 'w') as f:
        f.create_dataset('x', data=np.zeros(3))
    for weights, words in ((tmp_path / 'missing.h5', 'does not exist'),
                           (tmp_path, 'is a folder, not a file'),
                           (tmp_path / 'text.h5', 'is not an HDF5 file'),
                           (tmp_path / 'other.h5', 'cannot load the InceptionV3')):
        status = evaluate.main(['--run', trained_run, '--iw_samples', '2', '--fid_samples', '4',
                                '--features', 'inception', '--inception_weights', str(weights)])
        err = capsys.readouterr().err
        assert status == 2 and words in err and '--inception_weights' in err, err


def test_compare_takes_its_models_from_the_registry():
    assert compare.parse_args([]).models == list(losses.DECODERS)


def test_active_units_of_a_constructed_encoder():
    vae = models.network_vae(28, 1, 6, losses.Gaussian((-1, 1)))
    head = vae.encoder.get_layer('mu')
    kernel, bias = (w.numpy() for w in head.weights)
    kernel[:, [0, 3]] = 0.0  # mu_0 and mu_3 are their biases whatever the image: inactive
    kernel[:, [1, 2, 4, 5]] *= 50.0
    head.set_weights([kernel, bias])
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1)).astype(np.uint8)
    config = settings.Config(z_dim=6, channels=1)
    means, _ = models.encode_images(vae, images, len(images), config)
    assert np.var(means, axis=0)[[0, 3]].max() < 1e-10 and np.var(means, axis=0)[[1, 2, 4, 5]].min() > 0.01
    assert evaluation.active_units(means) == 4
    # The threshold is Burda et al.'s 0.01, strict.
    assert evaluation.active_units(np.array([[0.0, 0.0], [0.19, 0.21]])) == 1  # variances 0.009, 0.011


def test_a_beta_of_one_is_the_gaussian_run_not_a_second_one():
    plan = compare.runs(compare.parse_args(['--models', 'gaussian,sigma', '--beta_sweep', '1,0.1',
                                            '--beta_vae', '0.3']))
    assert [(label, c.model, c.beta, beta) for label, c, beta in plan] == [
        ('gaussian', 'gaussian', 1.0, 1.0), ('sigma', 'sigma', 1.0, None),
        ('beta-VAE (beta=0.1)', 'gaussian', 0.1, 0.1), ('beta-VAE (beta=0.3)', 'gaussian', 0.3, None)]


def test_compare_with_a_beta_sweep_end_to_end(image_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'cmp'
    monkeypatch.chdir(tmp_path)  # --output_dir relative to where it runs
    args = ['--dataset', image_folder, '--output_dir', 'cmp', '--max_steps', '2',
            '--batch_size', '8', '--z_dim', '4', '--iw_samples', '2', '--fid_samples', '4',
            '--models', 'sigma,logistic', '--beta_sweep', '0.1,1']
    assert compare.main(args) == 0
    results = json.load(open(out / 'results.json'))
    assert [(r['name'], r['model'], r['beta'], r['sweep_beta']) for r in results] == [
        ('sigma', 'sigma', 1.0, None), ('logistic', 'logistic', 1.0, None),
        ('beta-VAE (beta=0.1)', 'gaussian', 0.1, 0.1), ('beta-VAE (beta=1)', 'gaussian', 1.0, 1.0)]
    assert all(np.isfinite(r['fid']) and np.isfinite(r['fid_gmm']) for r in results)
    sigma, logistic = results[:2]
    assert sigma['effective_beta'] == pytest.approx(np.exp(2 * sigma['test_log_sigma']))
    assert logistic['effective_beta'] is None
    assert [r['effective_beta'] for r in results[2:]] == [0.1, 1.0]  # sigma = 1: beta itself
    assert all(0 <= r['active_units'] <= 4 for r in results)
    table, sweep_table = open(out / 'results.md').read().split('The beta sweep')
    assert '| FID N(0, I) domain | FID GMM domain | FID N(0, I) vgg | FID GMM vgg |' in table
    assert f"against the test images, FID {results[0]['fid_domain_train_images']:.2f}" in table
    assert all(f'| {r["name"]} |' in table for r in results)
    rows = [line for line in sweep_table.splitlines() if line.startswith('| ') and 'KL' not in line]
    assert len(rows) == 4 and sum('beta-VAE' in row for row in rows) == 2
    assert rows[-1].startswith('| logistic |')  # no effective beta: last
    figure = Image.open(out / 'samples.png')  # a row of grids per prior
    assert figure.width >= 2 * 280 and figure.height > 4 * 280  # a row per run, a column per prior
    assert Image.open(out / 'bits_per_dim.png').size == (700, 450)
    for figure in ('rate_distortion.png', 'fid_vs_beta.png'):
        assert Image.open(out / figure).size == (750, 500)

    # Run again (as after an interruption), from another folder: every evaluation of the same
    # checkpoint with the same settings is kept, its run folder found from here; another
    # setting evaluates again.
    capsys.readouterr()
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'elsewhere')
    args[args.index('cmp')] = str(out)
    os.remove(out / 'samples.png')
    assert compare.main(args) == 0
    assert capsys.readouterr().out.count('with these settings: kept') == 4
    again = json.load(open(out / 'results.json'))
    assert [r.pop('run') for r in again] == [str(out / r.pop('run')[len('cmp/'):]) for r in results]
    assert again == results and (out / 'samples.png').exists()
    assert compare.main(args[:-4] + ['--models', 'sigma', '--iw_samples', '3']) == 0
    assert '[1/1] sigma: evaluating' in capsys.readouterr().out
    assert json.load(open(out / 'sigma' / 'evaluation.json'))['iw_samples'] == 3


def test_compare_says_where_the_feature_networks_disagree():
    results = [{'name': 'a', 'fid_domain': 10.0, 'fid_vgg': 30.0, 'fid_domain_gmm': 1.0,
                'fid_vgg_gmm': 2.0},
               {'name': 'b', 'fid_domain': 20.0, 'fid_vgg': 25.0, 'fid_domain_gmm': 3.0,
                'fid_vgg_gmm': 4.0},
               {'name': 'c', 'fid_domain': 30.0, 'fid_vgg': 40.0, 'fid_domain_gmm': 5.0,
                'fid_vgg_gmm': 6.0}]
    lines = compare.disagreements(results, ['domain', 'vgg'])
    # Under N(0, I) domain ranks a < b < c, vgg b < a < c: only a and b swap; under the
    # mixture both agree.
    assert lines == ['- Under N(0, I) the feature networks disagree on a and b: domain puts a '
                     'first (10.00 against 20.00), vgg puts b first (25.00 against 30.00).']
    # FIDs within 2% are a tie: one network separating what the other ties is said too.
    tied = [{'name': 'g', 'fid_domain': 21.887, 'fid_vgg': 14.20},
            {'name': 'l', 'fid_domain': 21.892, 'fid_vgg': 12.76}]
    assert compare.disagreements(tied, ['domain', 'vgg']) == [
        '- Under N(0, I) the feature networks do not agree on g and l: domain ties them (21.89 '
        'and 21.89: within 2%), vgg puts l first (12.76 against 14.20).']
    results[0]['fid_domain_t0.8'] = 7.0
    assert compare.best_temperature(results[0], 'fid_domain') == (0.8, 7.0)
    assert compare.best_temperature(results[0], 'fid_domain_gmm') == (1.0, 1.0)

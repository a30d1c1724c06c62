"""generate.py on a tiny trained run, the mixture prior against NumPy, the SavedModel in a
fresh process, and the TensorBoard images."""
import glob
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import data
import files
import generate
import run_folder
from conftest import TINY, run, trained_run
import checkpoints
import priors

Z_DIM = 4  # TINY's


@pytest.fixture(scope='module')
def trained(image_folder, tmp_path_factory):
    """A sigma run of 3 steps (grids at steps 2 and 3) and its checkpoint's VAE."""
    run_dir = str(trained_run(tmp_path_factory.mktemp('gen'), image_folder, 'g', '--model',
                              'sigma', '--max_steps', '3'))
    config, vae, state = checkpoints.load_model(run_dir)
    return run_dir, config, vae, state


def gen(*argv):
    return generate.main([str(a) for a in argv])


def pil_images(paths):
    """Grayscale files at 28x28 -> uint8 (N, 28, 28, 1), read with PIL alone."""
    return np.stack([np.asarray(Image.open(p).convert('L').resize((28, 28)))[..., None]
                     for p in paths])


def folder_files(folder):
    return sorted(glob.glob(os.path.join(folder, '**', '*.png'), recursive=True))


def reference_decode(vae, z):
    return data.to_uint8(vae.decode(tf.constant(z, tf.float32)).numpy())


def reference_encode(vae, images):
    mu, log_var = vae.encoder(tf.constant(images / 127.5 - 1.0, tf.float32), training=False)
    return mu.numpy(), log_var.numpy()


def assert_close_uint8(got, expected):
    # The same float32 network run as batches in a tf.function or eagerly may round its last
    # bit differently; a value within that of a rounding tie then lands one level apart.
    assert got.shape == expected.shape and got.dtype == np.uint8
    difference = np.abs(got.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and np.mean(difference == 0) > 0.99


def cells(grid, rows, cols, h=28, w=28):
    """A (rows*h, cols*w) grayscale grid -> (rows, cols, h, w)."""
    return grid.reshape(rows, h, cols, w).transpose(0, 2, 1, 3)


# ---- the sub-commands end to end ----------------------------------------------

def test_sample_writes_npz_png_and_folder_deterministically(trained, tmp_path, capsys):
    run_dir, _, vae, _ = trained
    assert gen('sample', '--run', run_dir, '--n', 12, '--seed', 3, '--out', tmp_path / 's.npz') == 0
    images = np.load(tmp_path / 's.npz')['images']
    assert images.dtype == np.uint8 and images.shape == (12, 28, 28, 1)
    # z ~ N(0, I) drawn by the seed, as the SavedModel's sample(n, seed) draws it.
    z = tf.random.stateless_normal((12, Z_DIM), seed=[3, 2]).numpy()
    assert_close_uint8(images, reference_decode(vae, z))

    assert gen('sample', '--run', run_dir, '--n', 12, '--seed', 3, '--out', tmp_path / 's.png') == 0
    grid = np.asarray(Image.open(tmp_path / 's.png'))
    assert grid.shape == (2 * 28, 10 * 28)
    np.testing.assert_array_equal(cells(grid, 2, 10).reshape(20, 28, 28)[:12], images[..., 0])
    assert not grid[28:, 2 * 28:].any()  # the 8 cells after the 12 images stay black

    assert gen('sample', '--run', run_dir, '--n', 3, '--seed', 4, '--out', tmp_path / 'f') == 0
    assert sorted(os.listdir(tmp_path / 'f')) == [files.MARKER, '000000.png', '000001.png',
                                                  '000002.png']
    other = pil_images(folder_files(tmp_path / 'f'))
    assert not np.array_equal(other, images[:3])  # another seed, other samples
    assert capsys.readouterr().out.count('wrote') == 3


def test_sample_from_the_mixture_prior_fits_it_once_and_refits_when_stale(trained, tmp_path, capsys):
    run_dir, _, _, state = trained
    gmm_path = os.path.join(run_dir, run_folder.PRIOR_FILE)
    args = ['sample', '--run', run_dir, '--prior', 'gmm', '--components', 2, '--n', 6]
    assert gen(*args, '--out', tmp_path / 'a.npz') == 0
    assert 'fitted a 2-component Gaussian mixture' in capsys.readouterr().out
    with np.load(gmm_path, allow_pickle=False) as f:  # plain arrays, no pickle
        stored = {k: f[k] for k in f.files}
    assert stored['weights'].shape == (2,) and stored['covariances'].shape == (2, Z_DIM, Z_DIM)
    assert int(stored['step']) == int(state.step.numpy()) == 3 and int(stored['num_means']) == 40

    assert gen(*args, '--out', tmp_path / 'b.npz') == 0  # fresh: used as it is
    assert 'fitted' not in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / 'a.npz')['images'],
                                  np.load(tmp_path / 'b.npz')['images'])

    np.savez(gmm_path, **{**stored, 'step': np.array(1)})  # as if fitted before more training
    assert gen(*args, '--out', tmp_path / 'c.npz') == 0
    out = capsys.readouterr().out
    assert 'was fitted at step 1 and the checkpoint is at step 3' in out and 'fitted a 2-component' in out
    with np.load(gmm_path) as f:
        assert int(f['step']) == 3


def test_reconstruct_shows_inputs_beside_their_reconstructions(trained, image_folder, tmp_path):
    run_dir, _, vae, _ = trained
    assert gen('reconstruct', '--run', run_dir, '--images', image_folder, '--n', 6,
               '--out', tmp_path / 'r.npz') == 0
    saved = np.load(tmp_path / 'r.npz')
    files = folder_files(image_folder)[:6]
    np.testing.assert_array_equal(saved['inputs'], pil_images(files))
    assert list(saved['names']) == files
    mu, _ = reference_encode(vae, saved['inputs'])
    assert_close_uint8(saved['reconstructions'], reference_decode(vae, mu))

    assert gen('reconstruct', '--run', run_dir, '--images', image_folder, '--n', 6,
               '--out', tmp_path / 'r.png') == 0
    grid = cells(np.asarray(Image.open(tmp_path / 'r.png')), 2, 10)  # 5 pairs a row
    pairs = grid.reshape(10, 2, 28, 28)[:6]
    np.testing.assert_array_equal(pairs[:, 0], saved['inputs'][..., 0])
    np.testing.assert_array_equal(pairs[:, 1], saved['reconstructions'][..., 0])

    # The run's test split: the 4 held-out images of the 44, as train.py splits them.
    assert gen('reconstruct', '--run', run_dir, '--images', 'test', '--out', tmp_path / 't.npz') == 0
    test_images = np.stack(list(data.load(image_folder, 28, seed=1).test.as_numpy_iterator()))
    np.testing.assert_array_equal(np.load(tmp_path / 't.npz')['inputs'], test_images)

    # Test images by index; --plain: the reconstructions alone, 10 a row.
    assert gen('reconstruct', '--run', run_dir, '--test_images', '3,1', '--out', tmp_path / 'i.npz') == 0
    by_index = np.load(tmp_path / 'i.npz')
    np.testing.assert_array_equal(by_index['inputs'], test_images[[3, 1]])
    assert list(by_index['names']) == ['test:3', 'test:1']
    assert gen('reconstruct', '--run', run_dir, '--test_images', '3,1', '--plain',
               '--out', tmp_path / 'p.png') == 0
    plain = np.asarray(Image.open(tmp_path / 'p.png'))
    assert plain.shape == (28, 56)
    np.testing.assert_array_equal(cells(plain, 1, 2)[0], by_index['reconstructions'][..., 0])


def test_interpolation_endpoints_decode_to_the_reconstructions(trained, image_folder, tmp_path):
    run_dir, _, vae, _ = trained
    a, b = folder_files(image_folder)[2:4]
    assert gen('interpolate', '--run', run_dir, '--a', a, '--b', b, '--steps', 5,
               '--out', tmp_path / 'i.npz') == 0
    saved = np.load(tmp_path / 'i.npz')
    inputs = pil_images([a, b])
    mu, _ = reference_encode(vae, inputs)
    ends = reference_decode(vae, mu)
    for path in ('linear', 'spherical'):
        np.testing.assert_allclose(saved['z_' + path][[0, -1]], mu, atol=1e-5)
        assert_close_uint8(saved[path][[0, -1]], ends)
    np.testing.assert_allclose(saved['z_linear'][2], mu.mean(0), atol=1e-5)
    # slerp at t = 1/2 is (a + b) / (2 cos(omega / 2)), omega the angle between a and b.
    omega = np.arccos(mu[0] @ mu[1] / np.linalg.norm(mu[0]) / np.linalg.norm(mu[1]))
    np.testing.assert_allclose(saved['z_spherical'][2], mu.sum(0) / (2 * np.cos(omega / 2)),
                               atol=1e-5)

    # Two test images by index are the same as their files.
    test = data.load(image_folder, 28, seed=1).test
    pair = np.stack(list(test.as_numpy_iterator()))[[0, 2]]
    Image.fromarray(pair[0, ..., 0]).save(tmp_path / 'a.png')
    Image.fromarray(pair[1, ..., 0]).save(tmp_path / 'b.png')
    assert gen('interpolate', '--run', run_dir, '--test_images', '0,2', '--steps', 5,
               '--out', tmp_path / 'ti.npz') == 0
    assert gen('interpolate', '--run', run_dir, '--a', tmp_path / 'a.png', '--b', tmp_path / 'b.png',
               '--steps', 5, '--out', tmp_path / 'fi.npz') == 0
    np.testing.assert_array_equal(np.load(tmp_path / 'ti.npz')['linear'],
                                  np.load(tmp_path / 'fi.npz')['linear'])

    assert gen('interpolate', '--run', run_dir, '--a', a, '--b', b, '--steps', 5,
               '--out', tmp_path / 'i.png') == 0
    strips = cells(np.asarray(Image.open(tmp_path / 'i.png')), 2, 7)  # a, 5 steps, b; twice
    for row, path in enumerate(('linear', 'spherical')):
        np.testing.assert_array_equal(strips[row, [0, 6]], inputs[..., 0])
        np.testing.assert_array_equal(strips[row, 1:6], saved[path][..., 0])


def test_traverse_moves_one_dimension_at_a_time(trained, tmp_path):
    run_dir, _, vae, _ = trained
    assert gen('traverse', '--run', run_dir, '--dims', '0,2', '--range', 2, '--steps', 3,
               '--out', tmp_path / 't.npz') == 0
    saved = np.load(tmp_path / 't.npz')
    z = saved['z']
    assert z.shape == (2, 3, Z_DIM) and saved['images'].shape == (2, 3, 28, 28, 1)
    np.testing.assert_allclose(z[0, :, 0], [-2, 0, 2])
    np.testing.assert_allclose(z[1, :, 2], [-2, 0, 2])
    seed_z = tf.random.stateless_normal((1, Z_DIM), seed=[0, 2]).numpy()[0]
    for row, dim in enumerate((0, 2)):
        others = [d for d in range(Z_DIM) if d != dim]
        np.testing.assert_allclose(z[row][:, others], np.tile(seed_z[others], (3, 1)), atol=1e-6)
    assert_close_uint8(saved['images'].reshape(6, 28, 28, 1), reference_decode(vae, z.reshape(6, -1)))
    assert gen('traverse', '--run', run_dir, '--out', tmp_path / 't.png') == 0
    assert np.asarray(Image.open(tmp_path / 't.png')).shape == (Z_DIM * 28, 9 * 28)


def test_encode_gives_mu_and_log_var_of_each_image(trained, image_folder, tmp_path):
    run_dir, _, vae, _ = trained
    assert gen('encode', '--run', run_dir, '--images', image_folder, '--out', tmp_path / 'e.npz') == 0
    saved = np.load(tmp_path / 'e.npz')
    files = folder_files(image_folder)
    assert list(saved['names']) == files and saved['mu'].shape == (44, Z_DIM)
    mu, log_var = reference_encode(vae, pil_images(files))
    np.testing.assert_allclose(saved['mu'], mu, atol=1e-5)
    np.testing.assert_allclose(saved['log_var'], log_var, atol=1e-5)


# ---- the mixture prior ----------------------------------------------------------

def test_mixture_samples_have_the_mean_and_covariance_of_the_fitted_means():
    rng = np.random.default_rng(0)
    true_means = np.array([[0, 0, 0], [6, 0, 2], [0, -6, 4]], float)
    points = np.concatenate([rng.multivariate_normal(m, np.diag([1.0, 0.5, 2.0]) + 0.3, 2000)
                             for m in true_means])
    gmm = priors.fit_gmm(points, 3, seed=0)
    # The three clusters are recovered (they are far apart) ...
    nearest = [np.argmin(np.linalg.norm(gmm['means'] - m, axis=1)) for m in true_means]
    np.testing.assert_allclose(gmm['means'][nearest], true_means, atol=0.15)
    np.testing.assert_allclose(gmm['weights'], 1 / 3, atol=0.01)
    # ... and draws from the mixture have the points' mean and covariance, within a few
    # standard errors of N draws (which EM's moment matching leaves as the only difference).
    n = 200000
    draws = priors.sample_gmm(gmm, n, seed=1)
    assert draws.shape == (n, 3)
    se_mean = draws.std(0) / np.sqrt(n)
    assert np.all(np.abs(draws.mean(0) - points.mean(0)) < 4 * se_mean)
    centred = draws - draws.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    se_cov = products.std(0) / np.sqrt(n)
    assert np.all(np.abs(np.cov(draws, rowvar=False) - np.cov(points, rowvar=False, bias=True))
                  < 4 * se_cov + 1e-6)
    np.testing.assert_array_equal(draws, priors.sample_gmm(gmm, n, seed=1))  # by seed


# ---- the SavedModel ------------------------------------------------------------

FRESH_PROCESS = '''
import sys
import numpy as np
import tensorflow as tf
model_dir, given, out = sys.argv[1:]
model = tf.saved_model.load(model_dir)
given = np.load(given)
encoded = model.signatures['encode'](images=tf.constant(given['images']))
np.savez(out, decoded=model.signatures['decode'](z=tf.constant(given['z']))['images'].numpy(),
         mu=encoded['mu'].numpy(), log_var=encoded['log_var'].numpy(),
         sampled=model.signatures['sample'](n=tf.constant(5), seed=tf.constant(7, tf.int64))[
             'images'].numpy(),
         project=np.array([m for m in ('train', 'models', 'losses', 'data', 'evaluate', 'generate',
                                       'utils') if m in sys.modules], str))
'''


def test_saved_model_round_trip_in_a_fresh_process(trained, image_folder, tmp_path):
    run_dir, _, vae, _ = trained
    model_dir = tmp_path / 'saved_model'
    assert gen('export', '--run', run_dir, '--out', model_dir) == 0
    images = pil_images(folder_files(image_folder)[:6])
    z = np.random.default_rng(0).normal(size=(7, Z_DIM)).astype(np.float32)
    np.savez(tmp_path / 'given.npz', images=images, z=z)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, '-c', FRESH_PROCESS, str(model_dir),
                           str(tmp_path / 'given.npz'), str(tmp_path / 'out.npz')],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / 'out.npz')
    assert got['project'].size == 0  # only TensorFlow and NumPy were imported
    mu, log_var = reference_encode(vae, images)
    np.testing.assert_allclose(got['mu'], mu, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got['log_var'], log_var, atol=1e-5, rtol=0)
    assert_close_uint8(got['decoded'], reference_decode(vae, z))
    assert_close_uint8(got['sampled'], reference_decode(
        vae, tf.random.stateless_normal((5, Z_DIM), seed=[7, 2]).numpy()))
    # generate.py sample draws the same z for the same seed.
    assert gen('sample', '--run', run_dir, '--n', 5, '--seed', 7, '--out', tmp_path / 's.npz') == 0
    assert_close_uint8(got['sampled'], np.load(tmp_path / 's.npz')['images'])


# ---- TensorBoard --------------------------------------------------------------

def test_tensorboard_gets_the_grids_of_every_step_they_are_written(trained):
    run_dir = trained[0]
    found = {}
    for path in glob.glob(os.path.join(run_dir, 'logs', 'events.out.tfevents.*')):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag.startswith('images/'):
                    # An image summary: width, height, then the PNG.
                    png = value.tensor.string_val[2]
                    found[value.tag, event.step] = np.asarray(Image.open(io.BytesIO(png)))
    assert sorted(found) == [('images/reconstructions', 2), ('images/reconstructions', 3),
                             ('images/samples', 2), ('images/samples', 3)]
    for (tag, step), image in found.items():
        png = np.asarray(Image.open(os.path.join(run_dir, 'images', f'{tag[7:]}_{step:08d}.png')))
        np.testing.assert_array_equal(image, png)  # the same grid as the PNG file


# ---- bad input: one line, exit status 2, nothing written -----------------------

@pytest.fixture(scope='module')
def bad_places(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp('bad')
    (root / 'not_an_image.png').write_text('text')
    (root / 'no_ckpt').mkdir()
    (root / 'no_ckpt' / 'config.json').write_text(open(os.path.join(trained[0], 'config.json')).read())
    (root / 'full').mkdir()
    (root / 'full' / 'notes.txt').write_text('mine')
    return root


@pytest.mark.parametrize('argv, words', [
    (['sample', '--run', '{root}/nowhere', '--out', '{root}/x.png'], "--run '{root}/nowhere' does not exist"),
    (['sample', '--run', '{root}/no_ckpt', '--out', '{root}/x.png'], 'has no checkpoint'),
    (['reconstruct', '--run', '{run}', '--images', '{root}/missing', '--out', '{root}/x.png'],
     "--images '{root}/missing' does not exist"),
    (['encode', '--run', '{run}', '--images', '{root}/not_an_image.png', '--out', '{root}/x.npz'],
     'cannot read image'),
    (['interpolate', '--run', '{run}', '--a', '{root}/not_an_image.png', '--b', '{image}',
      '--out', '{root}/x.png'], 'cannot read image'),
    (['interpolate', '--run', '{run}', '--a', '{root}', '--b', '{image}', '--out', '{root}/x.png'],
     "--a '{root}' is a folder, not a file"),
    (['traverse', '--run', '{run}', '--dims', '1,4', '--out', '{root}/x.png'],
     '--dims must be between 0 and 3'),
    (['sample', '--run', '{run}', '--out', '{root}/x.jpg'], '--out must be a .png file or an .npz file or a folder'),
    (['encode', '--run', '{run}', '--images', '{image}', '--out', '{root}/x.png'], '--out must be an .npz file'),
    (['sample', '--run', '{run}', '--out', '{root}/not_an_image.png/x.png'], 'is a file, not a folder'),
    (['export', '--run', '{run}', '--out', '{root}/full'],
     'holds files the tool did not write (notes.txt)'),
    (['reconstruct', '--run', '{run}', '--out', '{root}/x.png'], 'give --images'),
    (['interpolate', '--run', '{run}', '--a', '{image}', '--out', '{root}/x.png'], 'give two images'),
    (['interpolate', '--run', '{run}', '--test_images', '1', '--out', '{root}/x.png'],
     '--test_images must give 2 indices, got 1'),
    (['reconstruct', '--run', '{run}', '--test_images', '0,4', '--out', '{root}/x.png'],
     '--test_images must be between 0 and 3 (the test split has 4 images), got 4'),
])
def test_bad_input_is_one_line_and_exit_2(trained, bad_places, image_folder, argv, words, capsys):
    names = {'root': bad_places, 'run': trained[0], 'image': folder_files(image_folder)[0]}
    before = sorted(os.listdir(bad_places))
    assert gen(*(a.format(**names) for a in argv)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('generate.py: error: ')
    assert words.format(**names) in err[0] and not captured.out
    assert sorted(os.listdir(bad_places)) == before


@pytest.mark.parametrize('argv, words', [
    (['sample', '--n', '0'], "argument --n: must be a positive integer, got '0'"),
    (['traverse', '--range', '-1'], "argument --range: must be a positive number"),
    (['interpolate', '--a', 'x', '--b', 'y', '--steps', '1'], "argument --steps: must be an integer of at least 2, got '1'"),
    (['sample', '--prior', 'uniform'], "invalid choice: 'uniform'"),
])
def test_bad_flags_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(argv + ['--run', 'r', '--out', 'o.png'])
    assert e.value.code == 2 and words in capsys.readouterr().err.strip().splitlines()[-1]


# ---- a hierarchical run: z is every group's, the mixture the top group's ------------------

@pytest.fixture(scope='module')
def hierarchical(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('gen_h')
    assert run(['--dataset', image_folder, '--output_dir', str(out), '--experiment_name', 'h',
                '--model', 'optimal', '--arch', 'hierarchical', '--width', '4',
                '--max_steps', '2'] + TINY) == 0
    run_dir = str(out / 'h')
    config, vae, state = checkpoints.load_model(run_dir)
    return run_dir, config, vae, state


def test_every_command_on_a_hierarchical_run(hierarchical, image_folder, tmp_path):
    run_dir, config, vae, _ = hierarchical
    total = sum(vae.groups)
    assert vae.groups[0] == Z_DIM and total == Z_DIM + 4 * (7 * 7 + 14 * 14) == vae.z_dim
    # The mixture is fitted to the top group; the lower groups are the fixed z's.
    assert gen('sample', '--run', run_dir, '--prior', 'gmm', '--components', 2, '--n', 5,
               '--seed', 3, '--out', tmp_path / 'g.npz') == 0
    with np.load(os.path.join(run_dir, run_folder.PRIOR_FILE)) as f:
        gmm = {k: f[k] for k in f.files}
    assert gmm['means'].shape == (2, Z_DIM)
    z = tf.random.stateless_normal((5, total), seed=[3, 2]).numpy()
    z[:, :Z_DIM] = priors.sample_gmm(gmm, 5, seed=3)
    assert_close_uint8(np.load(tmp_path / 'g.npz')['images'], reference_decode(vae, z))
    # encode: the mean path's (mu, log_var) of all groups; reconstruct decodes its mu.
    files = folder_files(image_folder)[:6]
    assert gen('encode', '--run', run_dir, '--images', image_folder, '--out', tmp_path / 'e.npz') == 0
    _, mu, log_var = vae(tf.constant(pil_images(files) / 127.5 - 1.0, tf.float32))
    encoded = np.load(tmp_path / 'e.npz')
    np.testing.assert_allclose(encoded['mu'][:6], mu, atol=1e-5)
    np.testing.assert_allclose(encoded['log_var'][:6], log_var, atol=1e-5)
    assert gen('reconstruct', '--run', run_dir, '--images', image_folder, '--plain',
               '--out', tmp_path / 'r.npz') == 0
    assert_close_uint8(np.load(tmp_path / 'r.npz')['reconstructions'][:6],
                       reference_decode(vae, mu.numpy()))
    assert gen('interpolate', '--run', run_dir, '--a', files[0], '--b', files[1], '--steps', 3,
               '--out', tmp_path / 'i.npz') == 0
    np.testing.assert_allclose(np.load(tmp_path / 'i.npz')['z_linear'][[0, -1]], mu[:2],
                               atol=1e-5)
    # traverse: the top group's dimensions by default, any of z when asked.
    assert gen('traverse', '--run', run_dir, '--steps', 3, '--out', tmp_path / 't.npz') == 0
    assert np.load(tmp_path / 't.npz')['z'].shape == (Z_DIM, 3, total)
    assert gen('traverse', '--run', run_dir, '--dims', total - 1, '--steps', 3,
               '--out', tmp_path / 't2.npz') == 0
    assert gen('traverse', '--run', run_dir, '--dims', total, '--out', tmp_path / 't3.npz') == 2
    # The SavedModel, in a fresh process: z of every group.
    z = np.random.default_rng(0).normal(size=(7, total)).astype(np.float32)
    np.savez(tmp_path / 'given.npz', images=pil_images(files), z=z)
    assert gen('export', '--run', run_dir, '--out', tmp_path / 'saved') == 0
    proc = subprocess.run([sys.executable, '-c', FRESH_PROCESS, str(tmp_path / 'saved'),
                           str(tmp_path / 'given.npz'), str(tmp_path / 'out.npz')],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / 'out.npz')
    np.testing.assert_allclose(got['mu'], mu, atol=1e-5)
    assert_close_uint8(got['decoded'], reference_decode(vae, z))
    assert_close_uint8(got['sampled'], reference_decode(
        vae, tf.random.stateless_normal((5, total), seed=[7, 2]).numpy()))

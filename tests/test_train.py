"""End to end through the CLI on a tiny generated image folder."""
import gzip
import json
import sys
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import data
import losses
import run_folder
import train
from conftest import TINY, run
import checkpoints
import priors
import trainer as training


def test_train_writes_everything_then_resumes(image_folder, tmp_path, capsys):
    args = ['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'e',
            '--model', 'sigma'] + TINY
    assert run(args + ['--max_steps', '4']) == 0
    run_dir = tmp_path / 'e'
    images = sorted(os.listdir(run_dir / 'images'))
    assert images == ['reconstructions_00000002.png', 'reconstructions_00000004.png',
                      'samples_00000002.png', 'samples_00000004.png']
    grid = np.asarray(Image.open(run_dir / 'images' / 'samples_00000004.png'))
    assert grid.shape == (280, 280)  # 10x10 grayscale 28x28 samples
    assert os.path.exists(run_dir / 'checkpoints' / 'ckpt-4.index')
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(run_dir / 'logs'))
    rows = [json.loads(line) for line in open(run_dir / 'metrics.jsonl')]
    assert [r['step'] for r in rows] == [4]
    for key in ('test_neg_elbo', 'test_bits_per_dim', 'test_bits_per_dim_discrete', 'test_mse',
                'test_log_sigma', 'train_loss', 'train_bits_per_dim'):
        assert np.isfinite(rows[0][key]), key
    saved = json.load(open(run_dir / 'config.json'))
    assert saved['model'] == 'sigma' and saved['max_steps'] == 4
    assert rows[0]['test_log_sigma'] != 0.0  # the sigma model's log sigma was trained
    capsys.readouterr()

    assert run(args + ['--max_steps', '6']) == 0
    assert 'at step 4' in capsys.readouterr().out
    rows = [json.loads(line) for line in open(run_dir / 'metrics.jsonl')]
    assert [r['step'] for r in rows] == [4, 5, 6]  # the epoch ends at step 5 (40 images / 8)
    ckpt = tf.train.load_checkpoint(str(run_dir / 'checkpoints' / 'ckpt-6'))
    assert ckpt.get_tensor('step/.ATTRIBUTES/VARIABLE_VALUE') == 6
    assert ckpt.get_tensor('optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE') == 6

    # The same model cannot be resumed as another one.
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'e',
                '--model', 'optimal', '--max_steps', '8'] + TINY) == 2
    assert '--model sigma' in capsys.readouterr().err


def test_one_epoch_of_every_model(image_folder, tmp_path):
    for model, xla in (('mse', '--xla'), ('gaussian', '--no-xla'), ('optimal', '--xla')):
        assert run(['--dataset', image_folder, '--output_dir', str(tmp_path), '--model', model,
                    '--epochs', '1', xla] + TINY) == 0
        rows = [json.loads(line) for line in open(tmp_path / model / 'metrics.jsonl')]
        assert [r['step'] for r in rows] == [5] and rows[0]['epoch'] == 1.0  # 40 train images / 8
    row = rows[0]
    # optimal: the test sigma is the average of training sigma*^2, far below 1 on this data.
    assert row['test_log_sigma'] < 0 and np.isfinite(row['test_bits_per_dim'])


def test_an_unreachable_host_is_reported():
    assert not data._reachable('http://127.0.0.1:9/', timeout=2.0)  # discard port: closed


def write_idx(path, images):
    n, h, w = images.shape
    header = np.array([0x803, n, h, w], '>u4').tobytes()
    with gzip.open(path, 'wb') as f:
        f.write(header + images.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (20, 28, 28))
    write_idx(tmp_path / data.IDX_FILES['train'], train_images)
    write_idx(tmp_path / data.IDX_FILES['test'], rng.integers(0, 256, (10, 28, 28)))
    np.testing.assert_array_equal(data.read_idx(tmp_path / data.IDX_FILES['train']),
                                  train_images[..., None])
    splits = data.load('fashion_mnist', str(tmp_path))
    assert (splits.num_train, splits.num_test, splits.channels) == (20, 10, 1)
    batch = next(iter(data.make_pipeline(splits.test, 28, 10)))
    np.testing.assert_allclose(
        np.sort(batch.numpy().ravel()),
        np.sort(data.to_range(np.asarray(list(splits.test.as_numpy_iterator()))).numpy().ravel()))
    assert batch.numpy().min() >= -1 and batch.numpy().max() <= 1


@pytest.mark.parametrize('data_range, low, high', [('-1,1', -1.0, 1.0), ('0,1', 0.0, 1.0)])
def test_both_ranges_round_trip_pixels(data_range, low, high):
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    scaled = data.to_range(pixels, data_range).numpy()
    assert scaled.min() == low and scaled.max() == high
    np.testing.assert_allclose(scaled, low + pixels / 255.0 * (high - low), atol=1e-6)
    np.testing.assert_array_equal(data.to_uint8(scaled, data_range), pixels)


def test_log_scale_of_each_range():
    for data_range, scale in (('-1,1', 127.5), ('0,1', 255.0)):
        likelihood = losses.Gaussian(data.DATA_RANGES[data_range])
        assert likelihood.log_data_scale == pytest.approx(math.log(scale))


@pytest.mark.parametrize('data_range', ['-1,1', '0,1'])
def test_a_run_on_each_range_shows_the_inputs_unchanged(image_folder, tmp_path, data_range):
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path),
                f'--data_range={data_range}', '--max_steps', '2'] + TINY) == 0
    test_images = np.stack(list(data.load(image_folder, 28, seed=1).test.as_numpy_iterator()))
    grid = np.asarray(Image.open(tmp_path / 'sigma' / 'images' / 'reconstructions_00000002.png'))
    cells = grid.reshape(10, 28, 10, 28).transpose(0, 2, 1, 3).reshape(100, 28, 28)
    np.testing.assert_array_equal(cells[0:2 * len(test_images):2], test_images[..., 0])
    config = json.load(open(tmp_path / 'sigma' / 'config.json'))
    assert config['data_range'] == data_range


def test_resize_is_tf1_bilinear_without_half_pixel_centres_rounded_to_8_bits():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    got = next(iter(data.make_pipeline(tf.data.Dataset.from_tensors(image), 28, 1,
                                       data_range='0,1'))).numpy()[0] * 255.0
    # TF 1: source coordinate = destination * in / out, the two neighbours below and above.
    src = np.arange(28) * 32 / 28
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, 31)
    f = (src - lo)[:, None, None]
    rows = image[lo].astype(np.float64) * (1 - f) + image[hi] * f
    f = (src - lo)[None, :, None]
    expected = rows[:, lo] * (1 - f) + rows[:, hi] * f
    np.testing.assert_allclose(got, np.round(expected), atol=1e-3)


# ---- metrics by name, and one fixed prior z (issue 18) --------------------------

def _trained_to(image_folder, tmp_path, steps):
    args = ['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'm',
            '--checkpoint_every', '1'] + TINY
    assert run(args + ['--max_steps', str(steps)]) == 0
    config = train.parse_args(args)
    config.channels = 1
    return args, config


def test_a_metric_added_later_resumes_a_checkpoint_written_without_it(
        image_folder, tmp_path, monkeypatch, capsys):
    args, config = _trained_to(image_folder, tmp_path, 5)  # an epoch is 5 steps
    trainer = training.Trainer(config)
    trainer.restore()
    x = tf.random.stateless_uniform((8, 28, 28, 1), [0, 0], -1.0, 1.0)
    for _ in range(2):
        trainer.train_step(x)
    ckpt = trainer.save()  # ckpt-7: the sums and counts of steps 6 and 7
    saved = {k: tf.train.load_checkpoint(ckpt).get_tensor(f'train_sums/{k}/.ATTRIBUTES/VARIABLE_VALUE')
             for k in losses.METRICS}
    assert all(v[1] == 2 for v in saved.values())

    summarize = losses.summarize
    monkeypatch.setattr(losses, 'METRICS', losses.METRICS + ('rec_twice',))
    monkeypatch.setattr(losses, 'summarize', lambda rec, *a: {
        **summarize(rec, *a), 'rec_twice': 2 * rec})
    trainer = training.Trainer(config)
    assert trainer.restore() == ckpt  # not set aside as damaged
    for k, (total, count) in saved.items():
        np.testing.assert_array_equal(trainer.train_sums[k].numpy(), [total, count])
    np.testing.assert_array_equal(trainer.train_sums['rec_twice'].numpy(), [0, 0])

    capsys.readouterr()
    assert run(args + ['--max_steps', '10']) == 0  # the epoch ends at step 10
    assert 'skipped checkpoint' not in capsys.readouterr().err
    row = [json.loads(line) for line in open(tmp_path / 'm' / 'metrics.jsonl')][-1]
    assert row['step'] == 10
    # rec_twice was summed over the 3 steps since the resume, rec over all 5 of the epoch.
    assert row['train_rec_twice'] > 0 and math.isfinite(row['train_rec_twice'])
    assert not math.isclose(row['train_rec_twice'], 2 * row['train_rec'], rel_tol=1e-9)


def test_a_checkpoint_with_the_sums_as_one_vector_restores_them_by_name(image_folder, tmp_path):
    _, config = _trained_to(image_folder, tmp_path, 7)
    trainer = training.Trainer(config)
    trainer.restore()
    # The layout before metrics by name: one vector in the order of LEGACY_METRICS and a count.
    vector = tf.Variable([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=tf.float64)
    legacy = tf.train.Checkpoint(**trainer.checkpoints.state, train_sums=vector,
                                 train_count=tf.Variable(4, dtype=tf.int64),
                                 prior_z=tf.Variable(tf.zeros((100, 4))))
    path = legacy.write(str(tmp_path / 'legacy' / 'ckpt-7'))
    fresh = training.Trainer(config)
    fresh.checkpoints._restore_from(path)
    for value, name in zip([1, 2, 3, 4, 5, 6], checkpoints.LEGACY_METRICS):
        np.testing.assert_array_equal(fresh.train_sums[name].numpy(), [value, 4])
    assert int(fresh.step.numpy()) == 7


def test_one_fixed_prior_z_per_run(image_folder, tmp_path):
    _, config = _trained_to(image_folder, tmp_path, 1)
    trainer = training.Trainer(config)
    expected = tf.random.stateless_normal((1000, config.z_dim), seed=[config.seed, 2]).numpy()
    # Training's grid shows the first 100 of the z that evaluate.py decodes for its FID and
    # generate.py sample --seed <the run's seed> decodes.
    np.testing.assert_array_equal(trainer.prior_z, expected[:run_folder.NUM_SAMPLES])
    np.testing.assert_array_equal(priors.prior_z(1000, config.z_dim, config.seed), expected)


def test_a_run_whose_updates_are_all_skipped_stops_in_one_line(image_folder, tmp_path, capsys):
    # 40 training images, batches of 8: 5 steps an epoch, 50 in 10 epochs, every one skipped.
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path),
                '--skip_threshold', '1e-3'] + TINY) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('train.py: error: every update of the last 50 steps was skipped: '
                          'their gradient norms were ') and 'above --skip_threshold 0.001' in err
    rows = [json.loads(line) for line in open(tmp_path / 'sigma' / 'metrics.jsonl')]
    assert rows[-1]['skipped_updates'] == rows[-1]['step']  # the rows count them
    assert 'skipped_updates 45' in trainer_row_line(rows[-1])


def trainer_row_line(row):
    import trainer
    return trainer.format_row(row)


def test_progress_without_a_terminal_is_a_line_each_tenth(capsys, monkeypatch):
    import utils
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: False)
    assert list(utils.progress(range(20), desc='counting', unit='item')) == list(range(20))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[0].startswith('counting: 2/20 items (10%), ')
    assert lines[-1].startswith('counting: 20/20 items (100%)') and 'left' in lines[0]


def test_progress_lines_name_their_unit_in_the_plural(capsys, monkeypatch):
    import utils
    monkeypatch.setattr(sys.stderr, 'isatty', lambda: False)
    for unit, plural in (('batch', 'batches'), ('step', 'steps'), ('subset', 'subsets')):
        list(utils.progress(range(1), desc='d', unit=unit))
        assert capsys.readouterr().err.startswith(f'd: 1/1 {plural} (100%)')

"""End to end through the CLI on a tiny generated image folder."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import data
import train

TINY = ['--batch_size', '8', '--z_dim', '4', '--sample_every', '2', '--seed', '1']


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """44 grayscale 28x28 PNGs: bright rectangles on black, in nested folders."""
    folder = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for i in range(44):
        image = np.zeros((28, 28), np.uint8)
        r, c = rng.integers(0, 14, 2)
        image[r:r + 14, c:c + 10] = rng.integers(100, 256)
        sub = folder / f'class{i % 2}'
        sub.mkdir(exist_ok=True)
        Image.fromarray(image).save(sub / f'{i:03d}.png')
    return str(folder)


def run(argv):
    """train.main in-process; returns its exit status."""
    try:
        return train.main(argv)
    except SystemExit as e:
        return e.code


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
    for key in ('test_neg_elbo', 'test_bits_per_dim', 'test_mse', 'log_sigma', 'train_loss'):
        assert np.isfinite(rows[0][key]), key
    saved = json.load(open(run_dir / 'config.json'))
    assert saved['model'] == 'sigma' and saved['max_steps'] == 4
    ckpt = tf.train.load_checkpoint(str(run_dir / 'checkpoints' / 'ckpt-4'))
    log_sigma_4 = ckpt.get_tensor('vae/log_sigma/.ATTRIBUTES/VARIABLE_VALUE')
    assert log_sigma_4 != 0.0  # the sigma model's log sigma was trained and saved
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
    assert row['log_sigma'] < 0 and np.isfinite(row['test_bits_per_dim'])


@pytest.mark.parametrize('argv, words', [
    (['--batch_size', '0'], '--batch_size must be positive'),
    (['--model', 'vq'], "invalid choice: 'vq'"),
    (['--lr', '-1'], '--lr must be a positive'),
    (['--image_size', '30'], 'invalid choice: 30'),
    (['--log_sigma_min', 'low'], "expected a number or 'none'"),
    (['--experiment_name', '../escape'], 'plain name'),
])
def test_bad_flags_exit_2_with_one_line(argv, words, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and 'Traceback' not in ''.join(err)


def test_missing_data_sets_give_a_clear_error(tmp_path, monkeypatch, capsys):
    out = ['--output_dir', str(tmp_path)]
    assert run(['--dataset', 'no_such_data_set'] + out) == 2
    assert "unknown data set 'no_such_data_set'" in capsys.readouterr().err
    assert run(['--dataset', str(tmp_path / 'nowhere')] + out) == 2
    assert 'does not exist' in capsys.readouterr().err
    # A tfds data set that is not prepared, with its source unreachable, fails at once.
    monkeypatch.setattr(data, '_reachable', lambda url, timeout=5.0: False)
    start = time.time()
    assert run(['--dataset', 'svhn_cropped', '--data_dir', str(tmp_path / 'tfds')] + out) == 2
    assert time.time() - start < 15
    assert 'is not prepared' in capsys.readouterr().err


def test_unreachable_host_is_reported_quickly():
    start = time.time()
    assert not data._reachable('http://127.0.0.1:9/', timeout=2.0)  # discard port: closed
    assert time.time() - start < 5


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
    np.testing.assert_array_equal(data.read_idx_images(tmp_path / data.IDX_FILES['train']),
                                  train_images[..., None])
    splits = data.load('fashion_mnist', str(tmp_path))
    assert (splits.num_train, splits.num_test, splits.channels) == (20, 10, 1)
    batch = next(iter(data.make_pipeline(splits.test, 28, 10)))
    np.testing.assert_allclose(
        np.sort(batch.numpy().ravel()),
        np.sort(data.to_unit_range(np.asarray(list(splits.test.as_numpy_iterator()))).numpy().ravel()))
    assert batch.numpy().min() >= -1 and batch.numpy().max() <= 1


def test_pixel_scaling_round_trips():
    pixels = np.arange(256, dtype=np.uint8)
    scaled = data.to_unit_range(pixels).numpy()
    assert scaled[0] == -1.0 and scaled[-1] == 1.0
    np.testing.assert_array_equal(data.to_uint8(scaled), pixels)


def test_ctrl_c_saves_a_checkpoint(image_folder, tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run_dir = tmp_path / 'e'
    proc = subprocess.Popen(
        [sys.executable, os.path.join(repo, 'train.py'), '--dataset', image_folder,
         '--output_dir', str(tmp_path), '--experiment_name', 'e', '--epochs', '1000'] + TINY,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / 'metrics.jsonl').exists() or not os.path.getsize(run_dir / 'metrics.jsonl'):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    step = int(tf.train.load_checkpoint(str(run_dir / 'checkpoints')).get_tensor(
        'step/.ATTRIBUTES/VARIABLE_VALUE'))
    assert step >= 5 and f'interrupted at step {step}; saved' in err

"""Faults, interruptions and bad input: each fails cleanly or is survived."""
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import data

import files
import image_folders
import train
from conftest import TINY, run
import trainer as training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(argv):
    return subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py')] + argv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=1800):
    deadline = time.time() + timeout
    while not os.path.exists(path) or (os.path.isfile(path) and not os.path.getsize(path)):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)


def strict_rows(path):
    """Every line of metrics.jsonl, failing on a torn one."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def checkpoint_tensors(path):
    reader = tf.train.load_checkpoint(path)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if not k.startswith(('_CHECKPOINTABLE_OBJECT_GRAPH', 'save_counter'))}


def test_sigkill_at_random_moments_then_resume(image_folder, tmp_path):
    run_dir = tmp_path / 'k'
    args = ['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'k',
            '--epochs', '4', '--checkpoint_every', '2'] + TINY + ['--sample_every', '1']
    rng = random.Random(1234)
    for _ in range(3):
        proc = start(args)
        wait_for(run_dir / 'logs', proc)  # the training loop is about to start
        time.sleep(rng.uniform(0.0, 3.0))
        proc.kill()
        proc.wait()
        latest = tf.train.latest_checkpoint(str(run_dir / 'checkpoints'))
        if latest:  # the state file only ever names a complete checkpoint
            saved = checkpoint_tensors(latest)
            assert saved['step/.ATTRIBUTES/VARIABLE_VALUE'] == int(latest.rsplit('-', 1)[1])
            # What a resume restores is exactly what was saved.
            config = train.parse_args(args)
            config.channels = 1
            trainer = training.Trainer(config)
            assert trainer.restore() == latest
            copy = trainer.checkpoints.saved.write(str(tmp_path / 'copy' / 'c'))
            restored = checkpoint_tensors(copy)
            assert saved.keys() == restored.keys()
            for key in saved:
                np.testing.assert_array_equal(saved[key], restored[key], err_msg=key)
    assert run(args) == 0
    rows = strict_rows(run_dir / 'metrics.jsonl')
    assert [r['step'] for r in rows] == [5, 10, 15, 20]  # one row per epoch, none repeated
    assert int(checkpoint_tensors(str(run_dir / 'checkpoints' / 'ckpt-20'))[
        'step/.ATTRIBUTES/VARIABLE_VALUE']) == 20
    leftovers = [f for _, _, files in os.walk(run_dir) for f in files if f.startswith('.tmp-')]
    assert leftovers == []  # a resume clears the temporary files of killed writes


@pytest.mark.parametrize('sig, status', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_a_checkpoint(image_folder, tmp_path, sig, status):
    run_dir = tmp_path / 'e'
    proc = start(['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'e',
                  '--epochs', '1000'] + TINY)
    wait_for(run_dir / 'metrics.jsonl', proc)  # past the first epoch
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == status, err
    latest = tf.train.latest_checkpoint(str(run_dir / 'checkpoints'))
    step = int(checkpoint_tensors(latest)['step/.ATTRIBUTES/VARIABLE_VALUE'])
    assert step >= 5 and f'interrupted at step {step}; saved {latest}' in err


def test_divergence_stops_and_keeps_the_last_good_checkpoint(image_folder, tmp_path, capsys):
    args = ['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'd'] + TINY
    assert run(args + ['--epochs', '1']) == 0
    ckpt_dir = tmp_path / 'd' / 'checkpoints'
    good = checkpoint_tensors(str(ckpt_dir / 'ckpt-5'))
    capsys.readouterr()
    assert run(args + ['--epochs', '20', '--lr', '1e4', '--checkpoint_every', '1']) == 1
    err = capsys.readouterr().err
    assert 'training diverged at step' in err and 'not finite' in err and 'Traceback' not in err
    latest = tf.train.latest_checkpoint(str(ckpt_dir))
    for tensor in checkpoint_tensors(latest).values():
        assert np.all(np.isfinite(tensor))  # never saved with bad weights
    if latest.endswith('ckpt-5'):
        for key, value in checkpoint_tensors(latest).items():
            np.testing.assert_array_equal(value, good[key])
    assert latest in err or 'ckpt-5' in err


def make_images(folder, specs):
    """specs: (mode, (width, height)) per file; returns the folder."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (mode, size) in enumerate(specs):
        channels = {'L': 1, 'RGB': 3, 'RGBA': 4}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
            folder / f'{i:03d}.png')
    return str(folder)


def test_mixed_modes_and_sizes_become_rgb_at_the_run_size(tmp_path):
    specs = [('L', (28, 28)), ('RGB', (40, 30)), ('RGBA', (20, 20))] * 8
    folder = make_images(tmp_path / 'mixed', specs)
    splits = data.load(folder, image_size=32)
    assert splits.channels == 3 and splits.num_train + splits.num_test == len(specs)
    batch = next(iter(data.make_pipeline(splits.train, 32, 4, shuffle_seed=0)))
    assert batch.shape == (4, 32, 32, 3)
    assert run(['--dataset', folder, '--output_dir', str(tmp_path), '--image_size', '32',
                '--max_steps', '2'] + TINY) == 0
    grid = np.asarray(Image.open(tmp_path / 'sigma' / 'images' / 'samples_00000002.png'))
    assert grid.shape == (320, 320, 3)


def test_corrupt_files_are_skipped_and_counted(tmp_path, capsys):
    folder = make_images(tmp_path / 'c', [('L', (28, 28))] * 20)
    good = open(os.path.join(folder, '000.png'), 'rb').read()
    open(os.path.join(folder, 'truncated.png'), 'wb').write(good[:len(good) // 2])
    open(os.path.join(folder, 'garbage.jpg'), 'wb').write(b'not an image at all')
    splits = data.load(folder, image_size=28)  # lists them: nothing is decoded yet
    assert splits.num_train + splits.num_test == 22
    assert sum(1 for split in (splits.train, splits.test) for _ in split) == 20
    err = capsys.readouterr().err
    for name in ('truncated.png', 'garbage.jpg'):
        assert f'skipped image file {os.path.join(folder, name)}: could not be read' in err
    # Before streaming (check_files=True, for older runs), all were decoded up front.
    splits = image_folders.load_folder(folder, 28, check_files=True)
    assert splits.num_train + splits.num_test == 20
    assert 'skipped 2 of 22 image files' in capsys.readouterr().err


@pytest.mark.parametrize('count, batch, words', [
    (0, 8, 'holds 0 PNG/JPEG files'),
    (5, 8, 'fewer than one batch of 8'),
])
def test_too_few_images(tmp_path, capsys, count, batch, words):
    folder = make_images(tmp_path / 'few', [('L', (28, 28))] * count)
    assert run(['--dataset', folder, '--output_dir', str(tmp_path), '--batch_size', str(batch)]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize('argv, words', [
    (['--batch_size', '0'], "--batch_size: must be a positive integer, got '0'"),
    (['--epochs', '0'], "--epochs/--epoch: must be a positive integer, got '0'"),
    (['--z_dim', '-3'], "--z_dim: must be a positive integer, got '-3'"),
    (['--lr', '0'], "--lr: must be a positive number, got '0'"),
    (['--lr', 'nan'], "--lr: must be a positive number, got 'nan'"),
    (['--checkpoint_every', '0'], "--checkpoint_every: must be a positive integer, got '0'"),
    (['--model', 'vq'], "invalid choice: 'vq'"),
    (['--image_size', '30'], 'invalid choice: 30'),
    (['--log_sigma_min', 'low'], "must be a finite number or 'none'"),
    (['--experiment_name', '../escape'], 'plain name'),
    (['--experiment_name', 'a/b'], 'plain name'),
    (['--experiment_name', '..'], 'plain name'),
])
def test_bad_flags_exit_2_with_one_line(argv, words, capsys):
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and 'Traceback' not in ''.join(err)


@pytest.mark.parametrize('flag, value', [('--model', 'optimal'), ('--z_dim', '5'),
                                          ('--image_size', '32'), ('--data_range', '0,1'),
                                          ('--seed', '2'), ('--batch_size', '4')])
def test_resuming_another_model_is_refused(image_folder, tmp_path, capsys, flag, value):
    args = ['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'r',
            '--max_steps', '1'] + TINY
    assert run(args) == 0
    capsys.readouterr()
    assert run(args + [flag, value]) == 2
    err = capsys.readouterr().err
    assert f'holds a run with {flag}' in err and 'start fresh' in err


def test_resuming_with_another_beta_says_so_and_records_it(image_folder, tmp_path, capsys):
    args = ['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'r',
            '--max_steps', '1'] + TINY
    assert run(args) == 0
    capsys.readouterr()
    assert run(args + ['--max_steps', '2', '--beta', '0.5']) == 0
    assert 'resuming with --beta 1.0 -> 0.5' in capsys.readouterr().err
    assert json.load(open(tmp_path / 'r' / 'config.json'))['beta'] == 0.5


def test_resuming_on_another_data_set_is_refused(image_folder, tmp_path, capsys):
    other = make_images(tmp_path / 'other', [('L', (28, 28))] * 20)
    args = ['--output_dir', str(tmp_path), '--experiment_name', 'r', '--max_steps', '1'] + TINY
    assert run(args + ['--dataset', image_folder]) == 0
    assert run(args + ['--dataset', other]) == 2
    assert 'holds a run with --dataset' in capsys.readouterr().err


def test_unwritable_output_folder_fails_before_training(image_folder, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.setattr(data, 'load', lambda *a, **k: pytest.fail('the data were loaded first'))
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    assert run(['--dataset', image_folder, '--output_dir', str(blocker)] + TINY) == 2
    assert f"--output_dir '{blocker}' is a file, not a folder" in capsys.readouterr().err


def test_missing_data_sets_give_a_clear_error(tmp_path, monkeypatch, capfd, caplog):
    out = ['--output_dir', str(tmp_path)]
    assert run(['--dataset', 'no_such_data_set'] + out) == 2
    assert "unknown data set 'no_such_data_set'" in capfd.readouterr().err
    assert run(['--dataset', str(tmp_path / 'nowhere')] + out) == 2
    assert 'does not exist' in capfd.readouterr().err
    # A tfds data set that is not prepared, with its source unreachable, fails at once.
    monkeypatch.setattr(data, '_reachable', lambda url, timeout=5.0: False)
    import tensorflow_datasets as tfds
    monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                        lambda *a, **k: pytest.fail('a download was tried'))
    assert run(['--dataset', 'svhn_cropped', '--data_dir', str(tmp_path / 'tfds')] + out) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'is not prepared' in err[0], err
    # and no tfds warning before it (of a "variant folder" with no dataset_info.json)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / 'x.txt'
    target.write_text('old')

    def fail_midway(tmp):
        with open(tmp, 'w') as f:
            f.write('half')
        raise OSError('disk full')

    with pytest.raises(OSError):
        files.atomic_write(str(target), fail_midway)
    assert os.listdir(tmp_path) == ['x.txt'] and target.read_text() == 'old'

"""Faults, round two (issue 11): damaged runs, two writers, lost rows, bad input in one line."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import compare
import data
import evaluate
import files
import models
import run_folder
import train
from conftest import TINY, run
from test_faults import REPO, checkpoint_tensors, make_images, start, strict_rows, wait_for
import checkpoints
import trainer as training


def args_of(image_folder, output_dir, name='r', *more):
    return ['--dataset', image_folder, '--output_dir', str(output_dir), '--experiment_name', name,
            '--checkpoint_every', '1'] + TINY + list(more)


@pytest.fixture(scope='module')
def trained(image_folder, tmp_path_factory):
    """A run of 6 steps (an epoch is 5) with a checkpoint every step: ckpt-4, 5, 6 are kept,
    metrics rows at steps 5 (the epoch's end) and 6 (--max_steps)."""
    out = tmp_path_factory.mktemp('trained')
    assert run(args_of(image_folder, out, 'r', '--max_steps', '6')) == 0
    return out / 'r'


def copy_run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / 'r')
    return tmp_path / 'r'


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(root, n), folder)
                  for root, dirs, names in os.walk(folder) for n in names + dirs)


# ---- 1. a damaged newest checkpoint ------------------------------------------

def test_missing_newest_index_resumes_from_the_one_before(image_folder, trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    ckpts = run_dir / 'checkpoints'
    before = (ckpts / 'ckpt-5.data-00000-of-00001').read_bytes()
    os.remove(ckpts / 'ckpt-6.index')
    assert run(args_of(image_folder, tmp_path, 'r', '--max_steps', '7')) == 0
    out, err = capsys.readouterr()
    assert f'skipped checkpoint {ckpts}/ckpt-6: it does not restore (ckpt-6.index is missing)' in err
    assert f'resumed from {ckpts}/ckpt-5 at step 5' in out
    assert (ckpts / 'ckpt-5.data-00000-of-00001').read_bytes() == before  # never overwritten
    assert os.listdir(ckpts / 'damaged') == ['ckpt-6.data-00000-of-00001']
    assert tf.train.latest_checkpoint(str(ckpts)) == str(ckpts / 'ckpt-7')
    assert [r['step'] for r in strict_rows(run_dir / 'metrics.jsonl')] == [5, 7]


def _damage(ckpts, how):
    data_file = ckpts / 'ckpt-6.data-00000-of-00001'
    if how == 'all files of ckpt-6 deleted':
        for name in os.listdir(ckpts):
            if name.startswith('ckpt-6.'):
                os.remove(ckpts / name)
    elif how == 'garbage state file':
        (ckpts / 'checkpoint').write_text('garbage\n')
    elif how == 'garbage state file, ckpt-6.index deleted':
        (ckpts / 'checkpoint').write_text('garbage\n')
        os.remove(ckpts / 'ckpt-6.index')
    elif how == 'truncated data':
        data_file.write_bytes(data_file.read_bytes()[:1000])
    elif how == 'random bytes in data':
        data_file.write_bytes(np.random.default_rng(0).bytes(data_file.stat().st_size))
    elif how == 'random bytes in index':
        (ckpts / 'ckpt-6.index').write_bytes(np.random.default_rng(0).bytes(500))


@pytest.mark.parametrize('how, restored, skipped', [
    ('all files of ckpt-6 deleted', 5, 'its files are missing'),
    ('garbage state file', 6, None),
    ('garbage state file, ckpt-6.index deleted', 5, 'ckpt-6.index is missing'),
    ('truncated data', 5, 'Error'),
    ('random bytes in data', 5, 'Error'),
    ('random bytes in index', 5, 'Error'),
])
def test_restore_takes_the_newest_checkpoint_that_restores(image_folder, trained, tmp_path, capsys,
                                                           how, restored, skipped):
    run_dir = copy_run(trained, tmp_path)
    ckpts = run_dir / 'checkpoints'
    good = checkpoint_tensors(str(ckpts / f'ckpt-{restored}'))
    _damage(ckpts, how)
    config = train.parse_args(args_of(image_folder, tmp_path))
    config.channels = 1
    trainer = training.Trainer(config)
    assert trainer.restore() == str(ckpts / f'ckpt-{restored}')
    assert int(trainer.step.numpy()) == restored
    np.testing.assert_array_equal(trainer.train_seconds.numpy(), good['train_seconds/.ATTRIBUTES/VARIABLE_VALUE'])
    err = capsys.readouterr().err
    if skipped:
        assert f'skipped checkpoint {ckpts}/ckpt-6' in err and skipped in err
        assert not [n for n in os.listdir(ckpts) if n.startswith('ckpt-6.')]  # set aside
    else:
        assert 'skipped' not in err
    # The state file names what was restored and the older complete ones, for rotation.
    assert tf.train.latest_checkpoint(str(ckpts)) == str(ckpts / f'ckpt-{restored}')
    state = tf.train.get_checkpoint_state(str(ckpts))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
        f'ckpt-{n}' for n in range(4, restored + 1)]


def test_when_no_checkpoint_restores_stop_unless_restart(image_folder, trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    ckpts = run_dir / 'checkpoints'
    for n in (4, 5, 6):
        (ckpts / f'ckpt-{n}.data-00000-of-00001').write_bytes(b'\0' * 100)
    files = files_under(run_dir)
    args = args_of(image_folder, tmp_path, 'r', '--max_steps', '2')
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'no checkpoint in {ckpts} restores: ckpt-6 (' in err[0]
    assert 'ckpt-5 (' in err[0] and 'ckpt-4 (' in err[0] and '--restart' in err[0]
    assert files_under(run_dir) == files  # nothing touched
    assert run(args + ['--restart']) == 0
    out, err = capsys.readouterr()
    assert 'starting over from step 0' in err and 'resumed' not in out
    assert sorted(os.listdir(ckpts / 'damaged')) == sorted(
        f'ckpt-{n}.{kind}' for n in (4, 5, 6) for kind in ('index', 'data-00000-of-00001'))
    assert tf.train.latest_checkpoint(str(ckpts)) == str(ckpts / 'ckpt-2')
    assert [r['step'] for r in strict_rows(run_dir / 'metrics.jsonl')] == [2]


def test_rows_without_any_checkpoint_stop_unless_restart(image_folder, trained, tmp_path, capsys):
    # The whole checkpoints/ folder deleted: a silent start from step 0 would drop the rows.
    run_dir = copy_run(trained, tmp_path)
    shutil.rmtree(run_dir / 'checkpoints')
    files = files_under(run_dir)
    args = args_of(image_folder, tmp_path, 'r', '--max_steps', '2')
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'holds metrics rows up to step 6 but no checkpoint' in err[0], err
    assert files_under(run_dir) == files
    assert run(args + ['--restart']) == 0
    assert [r['step'] for r in strict_rows(run_dir / 'metrics.jsonl')] == [2]


def test_checkpoints_without_config_json_are_refused(image_folder, trained, tmp_path, capsys):
    # config.json says what model the checkpoints are of: without it nothing can be checked.
    run_dir = copy_run(trained, tmp_path)
    os.remove(run_dir / 'config.json')
    files = files_under(run_dir)
    assert run(args_of(image_folder, tmp_path, 'r', '--max_steps', '8', '--seed', '2')) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'holds checkpoints but no config.json' in err[0], err
    assert files_under(run_dir) == files


def test_an_image_folder_that_changed_is_refused_on_resume(image_folder, tmp_path, capsys):
    # Its test split is a seeded permutation of the files read: another file changes it.
    folder = tmp_path / 'images'
    shutil.copytree(image_folder, folder)
    args = args_of(str(folder), tmp_path, 'r', '--max_steps', '2')
    assert run(args) == 0
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(folder / 'class0' / 'new.png')
    capsys.readouterr()
    files = files_under(tmp_path / 'r')
    for command in (lambda: run(args + ['--max_steps', '3']),
                    lambda: evaluate.main(['--run', str(tmp_path / 'r')])):
        status = command()
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and 'holds other images than when' in err[0], err
        assert 'then: 44 images, sha256' in err[0] and 'now: 45 images, sha256' in err[0]
    assert files_under(tmp_path / 'r') == files
    os.remove(folder / 'class0' / 'new.png')  # as it was: resumes
    assert run(args + ['--max_steps', '3']) == 0


def test_load_model_skips_a_damaged_newest_checkpoint_and_leaves_it(trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    os.remove(run_dir / 'checkpoints' / 'ckpt-6.index')
    files = files_under(run_dir)
    _, _, state = checkpoints.load_model(str(run_dir))
    assert state.path == str(run_dir / 'checkpoints' / 'ckpt-5') and int(state.step.numpy()) == 5
    assert 'skipped checkpoint' in capsys.readouterr().err
    after = files_under(run_dir)  # all there, and only its statistics added
    assert set(after) - set(files) <= {'checkpoints/ckpt-5' + checkpoints.STATISTICS_SUFFIX}
    assert set(files) <= set(after)


# ---- 2. one writer per run folder ---------------------------------------------

def test_a_second_writer_is_refused_and_a_killed_one_blocks_nothing(image_folder, tmp_path, capsys):
    args = args_of(image_folder, tmp_path, 'w')
    first = start(args + ['--epochs', '1000'])
    try:
        wait_for(tmp_path / 'w' / 'metrics.jsonl', first)
        load = data.load
        data.load = lambda *a, **k: pytest.fail('the data were loaded first')
        try:  # at once, before the data is loaded
            assert run(args + ['--max_steps', '1']) == 2
        finally:
            data.load = load
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f'is in use by process {first.pid} on ' in err[0]
        assert evaluate.main(['--run', str(tmp_path / 'w'), '--export', '--features', 'none',
                              '--iw_samples', '1']) == 2
        assert f'in use by process {first.pid}' in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert run(args + ['--max_steps', '1']) == 0  # the dead process's lock is gone
    assert 'resumed from' in capsys.readouterr().out


# ---- 3. damaged lines of metrics.jsonl ----------------------------------------

def test_read_rows_keeps_every_good_row():
    lines = ['{"step": 5, "a": 1}', '', 'garbage', '{}', '[1]', '{"step": "7"}', '{"step": 3}',
             '{"step": 10, "a": 2}', '{"step": 15, "a": 3']
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'm.jsonl')
        with open(path, 'w') as f:
            f.write('\n'.join(lines))
        rows, damaged = run_folder.read_rows(path)
    assert [r['step'] for r in rows] == [5, 10]
    assert damaged == ['garbage', '{}', '[1]', '{"step": "7"}', '{"step": 3}', '{"step": 15, "a": 3']


def test_damaged_metrics_lines_are_set_aside_once(image_folder, trained, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path)
    path = run_dir / 'metrics.jsonl'
    good = path.read_text().splitlines()
    path.write_text('\n'.join([good[0], '', 'garbage', '{}', good[1]]) + '\n')
    args = args_of(image_folder, tmp_path, 'r', '--max_steps', '6')
    assert run(args) == 0
    assert path.read_text().splitlines() == good
    assert (run_dir / 'metrics.jsonl.damaged').read_text() == 'garbage\n{}\n'
    assert capsys.readouterr().err.count('2 damaged line(s) set aside') == 1
    assert run(args) == 0
    assert 'damaged' not in capsys.readouterr().err


# ---- 4. an interrupt during the end-of-epoch evaluation --------------------------

def test_an_interrupt_during_the_evaluation_waits_for_the_row_and_checkpoint(
        image_folder, tmp_path, monkeypatch, capsys):
    evaluate_test = models.VAE.test_metrics

    def interrupted(self, test_ds, seed=0):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the evaluation
        return evaluate_test(self, test_ds, seed)

    args = ['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'i',
            '--epochs', '2'] + TINY
    monkeypatch.setattr(models.VAE, 'test_metrics', interrupted)
    assert run(args) == 143
    run_dir = tmp_path / 'i'
    assert tf.train.latest_checkpoint(str(run_dir / 'checkpoints')).endswith('ckpt-5')
    assert [r['step'] for r in strict_rows(run_dir / 'metrics.jsonl')] == [5]


def test_an_epoch_end_saved_without_its_row_gets_it_on_resume(image_folder, tmp_path,
                                                              monkeypatch, capsys):
    stop = training.TrainClock.stop

    def interrupted(self):  # the loop stops the clock just before the epoch's end is handled
        os.kill(os.getpid(), signal.SIGTERM)
        return stop(self)

    args = ['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'i',
            '--epochs', '1'] + TINY
    monkeypatch.setattr(training.TrainClock, 'stop', interrupted)
    assert run(args) == 143
    run_dir = tmp_path / 'i'
    assert tf.train.latest_checkpoint(str(run_dir / 'checkpoints')).endswith('ckpt-5')
    path = run_dir / 'metrics.jsonl'
    assert (strict_rows(path) if path.exists() else []) == []  # before: this row was lost
    monkeypatch.setattr(training.TrainClock, 'stop', stop)
    capsys.readouterr()
    assert run(args) == 0
    assert 'nothing to do' in capsys.readouterr().out
    rows = strict_rows(run_dir / 'metrics.jsonl')
    assert [r['step'] for r in rows] == [5]
    assert np.isfinite(rows[0]['train_loss']) and rows[0]['train_loss'] > 0  # the epoch's average
    assert rows[0]['train_seconds'] > 0


def test_an_interrupt_counts_the_training_time_since_the_last_checkpoint(image_folder, tmp_path,
                                                                         monkeypatch):
    write_images = training.Trainer.write_images

    def slow_then_interrupted(self, recon_inputs):
        time.sleep(0.5)  # training time: grids are written inside the loop
        os.kill(os.getpid(), signal.SIGINT)
        return write_images(self, recon_inputs)

    monkeypatch.setattr(training.Trainer, 'write_images', slow_then_interrupted)
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path), '--epochs', '1'] + TINY) == 130
    saved = checkpoint_tensors(str(tmp_path / 'sigma' / 'checkpoints' / 'ckpt-2'))
    assert saved['train_seconds/.ATTRIBUTES/VARIABLE_VALUE'] >= 0.5


# ---- 5. temporaries ---------------------------------------------------------------

def test_a_resume_removes_temporaries(image_folder, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    ckpts = run_dir / 'checkpoints'
    (ckpts / 'ckpt-7_temp').mkdir()
    (ckpts / 'ckpt-7_temp' / 'part-00000-of-00001.data-00000-of-00001').write_bytes(b'\0' * 4096)
    (ckpts / 'checkpoint.tmp5f3e2d1c').write_text('model_checkpoint_path: "ckpt-7"\n')
    (ckpts / 'ckpt-8.data-00000-of-00001').write_bytes(b'\0' * 4096)  # a save killed mid-merge
    (ckpts / 'ckpt-6.index.tempstate123').write_bytes(b'\0')
    (run_dir / '.tmp-worker-1').mkdir()
    (run_dir / 'images' / '.tmp-0123456789ab.png').write_bytes(b'\0')
    keep = {n: (ckpts / n).read_bytes() for n in os.listdir(ckpts) if n.startswith('ckpt-')
            and '_temp' not in n and 'tempstate' not in n and not n.startswith('ckpt-8')}
    assert run(args_of(image_folder, tmp_path, 'r', '--max_steps', '6')) == 0
    assert sorted(os.listdir(ckpts)) == sorted(list(keep) + ['checkpoint'])
    assert all((ckpts / n).read_bytes() == content for n, content in keep.items())
    assert not [f for f in files_under(run_dir) if 'tmp' in f or 'temp' in f]


def test_looking_up_a_tfds_data_set_leaves_nothing_in_tmpdir(tmp_path, monkeypatch):
    scratch = tmp_path / 'tmpdir'
    scratch.mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(scratch))
    assert not data._is_prepared(data._tfds_builder('mnist', str(tmp_path / 'tfds')))
    assert os.listdir(scratch) == []


# ---- 6. a full disk ---------------------------------------------------------------

def test_disk_full_during_a_save_stops_with_one_line(image_folder, trained, tmp_path, monkeypatch,
                                                     capsys):
    run_dir = copy_run(trained, tmp_path)
    ckpts = run_dir / 'checkpoints'
    good = checkpoint_tensors(str(ckpts / 'ckpt-6'))

    def disk_full(self, checkpoint_number=None, **kwargs):
        # What TensorFlow leaves when a write fails: the shard folder, a state temporary.
        n = int(checkpoint_number)
        (ckpts / f'ckpt-{n}_temp').mkdir()
        (ckpts / f'ckpt-{n}_temp' / 'part-00000-of-00001.data-00000-of-00001.tempstate1').write_bytes(b'\0')
        (ckpts / 'checkpoint.tmp0123').write_text('')
        raise tf.errors.ResourceExhaustedError(None, None, f'{ckpts}/ckpt-{n}_temp; No space left on device')

    monkeypatch.setattr(tf.train.CheckpointManager, 'save', disk_full)
    assert run(args_of(image_folder, tmp_path, 'r', '--max_steps', '9')) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('train.py: error: cannot write the checkpoint of step 7 '
                              '(ResourceExhaustedError:') and 'Traceback' not in ''.join(err)
    assert f'{ckpts}/ckpt-6 holds the last good weights' in err[-1]
    assert sorted(os.listdir(ckpts)) == ['checkpoint'] + sorted(
        f'ckpt-{n}.{k}' for n in (4, 5, 6) for k in ('index', 'data-00000-of-00001'))
    for key, value in checkpoint_tensors(str(ckpts / 'ckpt-6')).items():
        np.testing.assert_array_equal(value, good[key])


# ---- 7. Ctrl-C twice ----------------------------------------------------------------

def test_signals_during_a_save_are_held_off_until_it_is_complete(image_folder, tmp_path, monkeypatch):
    save = tf.train.CheckpointManager.save

    def interrupted_twice(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.04)
        os.kill(os.getpid(), signal.SIGINT)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(tf.train.CheckpointManager, 'save', interrupted_twice)
    assert run(args_of(image_folder, tmp_path, 'c', '--max_steps', '4')) == 130
    ckpts = tmp_path / 'c' / 'checkpoints'
    assert sorted(os.listdir(ckpts)) == ['checkpoint', 'ckpt-1.data-00000-of-00001', 'ckpt-1.index']
    assert checkpoint_tensors(str(ckpts / 'ckpt-1'))['step/.ATTRIBUTES/VARIABLE_VALUE'] == 1


def test_ctrl_c_twice_40_ms_apart(image_folder, tmp_path):
    run_dir = tmp_path / 'cc'
    proc = start(args_of(image_folder, tmp_path, 'cc', '--epochs', '1000'))
    wait_for(run_dir / 'metrics.jsonl', proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.04)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=1800)
    assert proc.returncode == 130, err
    assert 'Traceback' not in err and err.count('interrupted at step') == 1
    latest = tf.train.latest_checkpoint(str(run_dir / 'checkpoints'))
    step = int(checkpoint_tensors(latest)['step/.ATTRIBUTES/VARIABLE_VALUE'])
    assert f'interrupted at step {step}; saved {latest}' in err
    assert not [f for f in files_under(run_dir) if 'temp' in f or 'tmp' in f]


# ---- 9. image files ----------------------------------------------------------------

def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    folder = tmp_path / 'sixteen'
    folder.mkdir()
    values = np.linspace(0, 65535, 28 * 28).reshape(28, 28).astype(np.uint16)
    for i in range(4):
        Image.fromarray(values).save(folder / f'{i}.png')
    assert Image.open(folder / '0.png').mode == 'I;16'
    splits = data.load(str(folder), image_size=28)
    image = next(iter(splits.train)).numpy()[..., 0]
    np.testing.assert_array_equal(image, np.round(values / 257.0).astype(np.uint8))


def test_oversized_images_and_fifos_are_skipped_and_named(tmp_path, monkeypatch, capsys):
    folder = make_images(tmp_path / 'odd', [('L', (28, 28))] * 4 + [('L', (40, 40)), ('L', (60, 60))])
    os.mkfifo(os.path.join(folder, 'x.png'))  # reading it would wait forever
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # 40x40 is above, 60x60 above twice
    splits = data.load(folder, image_size=28)
    # The FIFO is left out of the listing at once; the too large files are met (and skipped,
    # each named once) only as the stream decodes them.
    assert splits.num_train + splits.num_test == 6
    err = capsys.readouterr().err
    assert 'skipped 1 of 7 image files' in err
    assert '1 that are not regular files' in err and 'x.png' in err
    for _ in range(2):
        images = [x for split in (splits.train, splits.test) for x in split]
        assert len(images) == 4
    err = capsys.readouterr().err
    for name in ('004.png', '005.png'):
        assert err.count(f'skipped image file {os.path.join(folder, name)}: too large') == 1


# ---- 10-12. bad input: one line, exit 2, nothing written ---------------------------

@pytest.mark.parametrize('argv, words', [
    (['--seed', '-1'], '--seed: must be an integer from 0 to 2147483647'),
    (['--seed', '99999999999'], '--seed: must be an integer from 0 to 2147483647'),
    (['--dataset', ''], '--dataset must name a data set'),
    (['--log_sigma_min', 'nan'], "must be a finite number or 'none'"),
    (['--log_sigma_min', 'inf'], "must be a finite number or 'none'"),
    (['--experiment_name=-x'], '--experiment_name must be a plain name'),
    (['--experiment_name', ' '], '--experiment_name must be a plain name'),
    (['--experiment_name', ''], '--experiment_name must be a plain name'),
    (['--experiment_name', 'a b'], '--experiment_name must be a plain name'),
    (['--experiment_name', 'a\nb'], r"got 'a\nb'"),
    (['--batch_size', 'x'], "argument --batch_size: must be a positive integer, got 'x'"),
    (['--no_such_flag'], 'unrecognized arguments: --no_such_flag'),
])
def test_bad_flags_give_one_line_ending_in_a_help_pointer(argv, words, capsys, tmp_path):
    assert run(argv + ['--output_dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and words in err[0] and err[0].endswith('(see train.py --help)')
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('argv, words', [
    (['--beta_vae', 'inf'], "--beta_vae: must be a positive number, got 'inf'"),
    (['--seed', '-1'], '--seed: must be an integer from 0 to'),
    (['--models', 'sigma,vq'], '--models must list models'),
])
def test_compare_refuses_bad_flags_in_one_line(argv, words, capsys):
    assert pytest.raises(SystemExit, compare.parse_args, argv).value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and words in err[0] and err[0].endswith('(see compare.py --help)')


def test_compare_refuses_an_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / 'file').write_text('')
    assert pytest.raises(SystemExit, compare.parse_args,
                         ['--output_dir', str(tmp_path / 'file')]).value.code == 2
    assert 'is a file, not a folder' in capsys.readouterr().err


def test_compare_refuses_data_without_labels_before_training(tmp_path, capsys):
    # The default FID features are a classifier of the labels: an unlabelled folder would fail
    # only after every model had trained.
    folder = tmp_path / 'flat'
    make_images(folder, [('L', (28, 28))] * 20)
    out = tmp_path / 'cmp'
    assert compare.main(['--dataset', str(folder), '--output_dir', str(out), '--models', 'sigma',
                         '--max_steps', '1'] + TINY[:4]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'has no class labels' in err[0] and not out.exists(), err


def test_evaluate_usage_errors_are_one_line(capsys):
    assert pytest.raises(SystemExit, evaluate.parse_args, []).value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and '--run' in err[0] and err[0].endswith('(see evaluate.py --help)')


def test_malformed_tf_config_is_one_line(image_folder, tmp_path, monkeypatch, capsys):
    task = '"task": {"type": "worker", "index": 0}'
    for text in ('{bad', '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', '[]',
                 '{"cluster": {"worker": ["localhost:abc"]}, %s}' % task,
                 '{"cluster": {"worker": ["a:1"]}, %s, "rpc_layer": 5}' % task,
                 '{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "ps", "index": 0}}'):
        monkeypatch.setenv('TF_CONFIG', text)
        assert run(['--dataset', image_folder, '--output_dir', str(tmp_path),
                    '--strategy', 'multi_worker'] + TINY) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and 'TF_CONFIG must be JSON like' in err[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('argv, words', [
    (['--z_dim', '1000000000'], '--z_dim 1000000000 with --arch original --width 64 is too large'),
    (['--batch_size', '64'], 'fewer than one batch of 64'),
    (['--dataset', 'no_such_data_set'], "unknown data set 'no_such_data_set'"),
])
def test_a_refused_run_writes_nothing(image_folder, tmp_path, capsys, argv, words):
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path)] + TINY + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and 'Traceback' not in ''.join(err)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('content, words', [
    ('{"model": "sigma", "z_dim": 4', 'cannot be read'),
    ('[1, 2]', 'does not hold a JSON object'),
    ('{"lr": 0.1}', "was not written by train.py (it has no key 'model')"),
    ('{"model": "sigma", "foo": 1}', "unknown key 'foo'"),
    ('Z_DIM_AS_A_STRING', """key 'z_dim' holds "4" (str), not a value of type int"""),
    ('BEFORE_THE_REGISTRY', 'written by a version of train.py before the decoder registry'),
])
def test_a_damaged_config_json_names_the_file_and_the_key(image_folder, tmp_path, capsys,
                                                           content, words):
    run_dir = tmp_path / 'r'
    (run_dir / 'checkpoints').mkdir(parents=True)
    (run_dir / 'checkpoints' / 'checkpoint').write_text('model_checkpoint_path: "ckpt-1"\n')
    if content == 'Z_DIM_AS_A_STRING':
        config = train.parse_args(args_of(image_folder, tmp_path))
        config.channels = 1
        saved = dict(vars(config), z_dim='4')
        content = json.dumps(saved)
    if content == 'BEFORE_THE_REGISTRY':  # as commit b09f93c wrote it: no channels, a bool
        saved = dict(vars(train.parse_args(args_of(image_folder, tmp_path))), mixed_precision=False)
        del saved['channels'], saved['restart']
        content = json.dumps(saved)
    (run_dir / 'config.json').write_text(content)
    assert run(args_of(image_folder, tmp_path, 'r', '--max_steps', '1')) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'{run_dir}/config.json' in err[0] and words in err[0]
    assert evaluate.main(['--run', str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]


# ---- 13. permissions ---------------------------------------------------------------

def test_files_get_the_permissions_of_the_umask(image_folder, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    os.remove(run_dir / 'checkpoints' / 'ckpt-6.index')  # a resume rewrites metrics.jsonl
    previous = os.umask(0o022)
    try:
        assert run(args_of(image_folder, tmp_path, 'r', '--max_steps', '7')) == 0
        files.write_text(str(tmp_path / 'evaluation.json'), '{}')
    finally:
        os.umask(previous)
    for path in [run_dir / 'config.json', run_dir / 'metrics.jsonl', run_dir / 'lock',
                 run_dir / 'images' / 'samples_00000007.png', tmp_path / 'evaluation.json']:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def test_every_command_starts_quietly_and_errs_in_one_line(tmp_path):
    # In a fresh process, as a user runs them: TensorFlow's start-up banners would come first.
    commands = {'train.py': ['--epochs', '0'], 'evaluate.py': ['--run', str(tmp_path / 'none')],
                'compare.py': ['--models', 'vq'], 'generate.py': ['sample', '--run', str(tmp_path),
                                                                  '--n', '0', '--out', 'x.png']}
    env = {k: v for k, v in os.environ.items() if k not in ('SIGMA_VAE_VERBOSE', 'TF_CPP_MIN_LOG_LEVEL')}
    procs = {name: subprocess.Popen([sys.executable, os.path.join(REPO, name)] + argv, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in commands.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 2 and out == '', (name, out)
        assert len(err.splitlines()) == 1 and err.startswith(name), (name, err)


@pytest.fixture
def busy_cpus():
    """Two processes that keep both CPUs busy, as on a loaded CI machine."""
    hogs = [subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(2)]
    yield
    for hog in hogs:
        hog.kill()
        hog.wait()


@pytest.mark.parametrize('command', ['train.py', 'evaluate.py', 'generate.py', 'compare.py'])
def test_ctrl_c_while_a_command_starts_is_one_line(image_folder, tmp_path, command, busy_cpus):
    # From the command's first line (`import utils`, which installs the handler before anything
    # else is imported) through TensorFlow's import to its work: signals relative to the marks
    # the command gives (SIGMA_VAE_MARKS=1), not to a guess of how long a busy machine takes to
    # start. Only Python's own start-up, before that first line, is not covered (README says so).
    argv = {'train.py': ['--dataset', image_folder, '--output_dir', str(tmp_path), '--max_steps',
                         '100000'] + TINY, 'evaluate.py': ['--run', str(tmp_path)],
            'generate.py': ['sample', '--run', str(tmp_path), '--out', str(tmp_path / 'x.png')],
            'compare.py': ['--dataset', image_folder, '--output_dir', str(tmp_path)]}[command]
    env = {**os.environ, 'SIGMA_VAE_MARKS': '1'}
    for mark, delay in (('handler', 0.0), ('handler', 0.05), ('handler', 0.5), ('tensorflow', 0.0),
                        ('tensorflow', 0.5), ('work', 0.0)):
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, command)] + argv, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        seen = []
        while f'{command}: mark {mark}\n' not in seen:
            seen.append(proc.stderr.readline())
            if not seen[-1]:  # it ended first: a refusal of the folder without a run, below
                break
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=1800)
        err = ''.join(line for line in seen + err.splitlines(True) if ': mark ' not in line)
        if proc.returncode == 2 and command in ('evaluate.py', 'generate.py'):
            continue  # it got to its work first and refused the folder without a run: one line
        assert proc.returncode == 130 and err == f'{command}: interrupted\n', (mark, delay, err)

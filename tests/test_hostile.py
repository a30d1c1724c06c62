"""The hostile cases of the round-three audit, the file the next audit starts from.

Each test is an input a careless or unlucky user gives, and what must happen instead of data
loss or a silently wrong number: one line on stderr with exit status 2, or the right result.
Small data the tests make themselves, tiny runs (TINY, --max_steps 2).
"""
import json
import os
import stat
import types

import numpy as np
import pytest
from PIL import Image

import compare
import data
import evaluate
import files
import generate
import image_folders
import run_folder
import utils
from conftest import TINY, run, trained_run
import checkpoints
import evaluation
import features
import models
import priors
import trainer as training


@pytest.fixture(scope='module')
def trained(image_folder, tmp_path_factory):
    """A sigma run of 2 steps on the shared image folder."""
    return str(trained_run(tmp_path_factory.mktemp('hostile'), image_folder, 'h', '--model',
                           'sigma', '--max_steps', '2'))


def one_error_line(capsys, prog):
    """The one line of stderr a refused command writes, checked to be just that."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(prog) and ': error: ' in err[0], err
    return err[0]


def make_images(folder, n=24, seed=0):
    """n grayscale 28x28 PNGs, bright rectangles on black, in two class subfolders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        image = np.zeros((28, 28), np.uint8)
        r, c = rng.integers(0, 14, 2)
        image[r:r + 14, c:c + 10] = rng.integers(100, 256)
        sub = folder / f'class{i % 2}'
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(sub / f'{i:03d}.png')
    return folder


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


# ---- 1. export never deletes what it did not write ------------------------------

def test_export_over_a_saved_model_with_other_files_refuses_and_keeps_them(trained, tmp_path, capsys):
    out = tmp_path / 'model'
    assert generate.main(['export', '--run', trained, '--out', str(out)]) == 0
    (out / 'precious.txt').write_text('mine')
    (out / 'photos').mkdir()
    (out / 'photos' / 'a.txt').write_text('mine too')
    (out / 'variables' / 'notes.txt').write_text('and mine')
    before = files_under(out)
    capsys.readouterr()
    assert generate.main(['export', '--run', trained, '--out', str(out)]) == 2
    line = one_error_line(capsys, 'generate.py')
    assert 'photos/' in line and 'precious.txt' in line and 'variables/' in line
    assert files_under(out) == before
    assert (out / 'precious.txt').read_text() == 'mine'
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.tmp-')]


def test_export_replaces_an_earlier_export_alone(trained, tmp_path):
    out = tmp_path / 'model'
    assert generate.main(['export', '--run', trained, '--out', str(out)]) == 0
    first = files_under(out)
    assert 'saved_model.pb' in first
    assert generate.main(['export', '--run', trained, '--out', str(out)]) == 0
    assert files_under(out) == first


# ---- 2. the FID classifier of one data set is never another's -----------------------

def domain_classifier(folder, cache):
    splits = data.load(str(folder), None, 28, 0)
    return features.domain_features(splits, str(folder), 28, str(cache))[1]['domain_classifier']


def test_data_sets_whose_flattened_names_collide_get_their_own_classifiers(tmp_path, capsys):
    cache = tmp_path / 'cache'
    first = make_images(tmp_path / 'ds_a' / 'b', seed=1)  # both flatten to ..._ds_a_b
    second = make_images(tmp_path / 'ds' / 'a_b', seed=2)
    path_a = domain_classifier(first, cache)
    path_b = domain_classifier(second, cache)
    assert path_a != path_b
    assert capsys.readouterr().out.count('training the domain feature classifier') == 2
    with open(os.path.splitext(path_b)[0] + '.json') as f:
        stored = json.load(f)
    assert stored['dataset'] == os.path.realpath(second) and stored['data_fingerprint']

    # A cached classifier whose record names other data is not used: it is trained again.
    record = os.path.splitext(path_a)[0] + '.json'
    with open(record, 'w') as f:
        json.dump({**stored, 'dataset': '/elsewhere'}, f)
    assert domain_classifier(first, cache) == path_a
    captured = capsys.readouterr()
    assert 'training it again' in captured.err and 'training the domain' in captured.out
    with open(record) as f:
        assert json.load(f)['dataset'] == os.path.realpath(first)
    assert domain_classifier(first, cache) == path_a  # and now it is
    assert 'training' not in capsys.readouterr().out


def test_a_classifier_at_chance_is_warned_of():
    assert 'near chance' in features.chance_warning(0.5, 2)
    assert 'near chance' in features.chance_warning(0.15, 10)
    assert features.chance_warning(0.9, 2) is None and features.chance_warning(0.3, 10) is None


# ---- 3. two values of beta, two runs ------------------------------------------------

def test_beta_values_that_print_alike_get_their_own_runs(tmp_path):
    args = compare.parse_args(['--models', 'sigma', '--beta_sweep', '0.1,0.1000001,3,1e-5',
                               '--output_dir', str(tmp_path)])
    plan = compare.runs(args)
    names = [config.experiment_name for _, config, _ in plan]
    labels = [label for label, _, _ in plan]
    assert len(set(names)) == len(names) == 5 and len(set(labels)) == 5
    # Values that '{:g}' writes whole keep the names of earlier versions' runs.
    assert {'beta_vae_0.1', 'beta_vae_0.1000001', 'beta_vae_3', 'beta_vae_1e-05'} <= set(names)
    assert [config.beta for _, config, _ in plan
            if config.experiment_name == 'beta_vae_0.1000001'] == [0.1000001]


# ---- 4. a run folder inside its own data ----------------------------------------------

@pytest.mark.parametrize('where', ['inside', 'the folder itself', 'through a link'])
def test_a_run_folder_inside_the_image_folder_is_refused_before_anything_is_written(
        tmp_path, capsys, where):
    images = make_images(tmp_path / 'data')
    (tmp_path / 'link').symlink_to(images)
    output_dir = {'inside': images / 'runs', 'the folder itself': tmp_path,
                  'through a link': tmp_path / 'link' / 'runs'}[where]
    experiment = ['--experiment_name', 'data' if where == 'the folder itself' else 'x']
    before = files_under(images)
    assert run(['--dataset', str(images), '--output_dir', str(output_dir), '--max_steps', '2']
               + experiment + TINY) == 2
    line = one_error_line(capsys, 'train.py')
    assert 'would be inside the image folder of --dataset' in line
    assert files_under(images) == before and sorted(os.listdir(images)) == ['class0', 'class1']


def test_a_comparison_inside_the_image_folder_is_refused(tmp_path, capsys):
    images = make_images(tmp_path / 'data')
    with pytest.raises(SystemExit) as e:
        compare.main(['--dataset', str(images), '--output_dir', str(images / 'compare'),
                      '--models', 'sigma', '--max_steps', '2'])
    assert e.value.code == 2
    assert 'would be inside the image folder of --dataset' in one_error_line(capsys, 'compare.py')
    assert sorted(os.listdir(images)) == ['class0', 'class1']


# ---- 5. flags of generate.py that used to pass or crash -------------------------------

@pytest.mark.parametrize('argv, words', [
    (['traverse', '--dims', ''], "argument --dims: expected comma-separated integers, got ''"),
    (['traverse', '--dims', ','], "argument --dims: expected comma-separated integers, got ','"),
    (['sample', '--seed', '99999999999999999999'],
     "argument --seed: must be an integer from 0 to 2147483647, got '99999999999999999999'"),
    (['sample', '--seed', '-1'], "argument --seed: must be an integer from 0 to 2147483647, got '-1'"),
    (['traverse', '--seed', '2147483648'], 'argument --seed: must be an integer from 0 to 2147483647'),
])
def test_bad_generate_flags_are_one_line_and_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(argv + ['--run', 'r', '--out', 'o.png'])
    assert e.value.code == 2
    line = one_error_line(capsys, 'generate.py')
    assert words in line


def test_the_largest_seed_samples(trained, tmp_path):
    assert generate.main(['sample', '--run', trained, '--n', '2', '--seed', '2147483647',
                          '--out', str(tmp_path / 's.npz')]) == 0


# ---- 6. prior_gmm.npz edited by hand: refitted, saying why; never a crash or garbage -----

def good_prior(k=2, z_dim=4):
    return dict(weights=np.full(k, 1 / k), means=np.zeros((k, z_dim)),
                covariances=np.tile(np.eye(z_dim), (k, 1, 1)), step=np.array(2),
                components=np.array(k))


@pytest.mark.parametrize('edit, words', [
    (dict(weights=np.array([np.nan, 0.5])), 'weights are not finite'),
    (dict(weights=np.zeros(2)), 'weights are not a distribution'),
    (dict(weights=np.array(['a', 'b'])), 'weights are not numbers'),
    (dict(means=np.full((2, 4), np.nan)), 'means are not finite'),
    (dict(covariances=np.tile(np.eye(4), (2, 1, 1)) * 1e300), 'covariances are not finite'),
    (dict(covariances=-np.tile(np.eye(4), (2, 1, 1))), 'not positive definite'),
    (dict(step=np.array([2, 3])), 'step is not an integer'),
    (dict(components=np.array('2')), 'components is not an integer'),
])
def test_read_prior_refuses_an_edited_mixture(tmp_path, edit, words):
    path = str(tmp_path / 'prior_gmm.npz')
    np.savez(path, **{**good_prior(), **edit})
    with pytest.raises(ValueError, match=words):
        priors.read_prior(path)


def test_read_prior_takes_a_good_mixture(tmp_path):
    path = str(tmp_path / 'prior_gmm.npz')
    np.savez(path, **good_prior())
    assert priors.read_prior(path)['means'].shape == (2, 4)


@pytest.mark.parametrize('edit', ['nan weights', 'vector step', 'huge covariances'])
def test_an_edited_prior_is_refitted_in_one_line(trained, tmp_path, capsys, edit):
    assert generate.main(['fit_prior', '--run', trained, '--components', '2']) == 0
    path = os.path.join(trained, run_folder.PRIOR_FILE)
    with np.load(path) as f:
        gmm = {k: f[k] for k in f.files}
    if edit == 'nan weights':
        gmm['weights'] = np.array([np.nan, 0.5])
    elif edit == 'vector step':
        gmm['step'] = np.array([gmm['step'], gmm['step']])
    else:
        gmm['covariances'] = gmm['covariances'] * 1e300
    np.savez(path, **gmm)
    capsys.readouterr()
    out = tmp_path / 's.npz'
    assert generate.main(['sample', '--run', trained, '--n', '4', '--prior', 'gmm',
                          '--out', str(out)]) == 0
    captured = capsys.readouterr()
    assert 'as the stored one cannot be read' in captured.out and 'Traceback' not in captured.err
    with np.load(out) as f:
        assert f['images'].shape == (4, 28, 28, 1)
    priors.read_prior(path)  # the refitted one is good


def test_prior_samples_refuse_z_that_are_not_finite(trained):
    config = run_folder.read_config(trained)
    gmm = {**good_prior(), 'covariances': np.tile(np.eye(4), (2, 1, 1)) * 1e100}
    with pytest.raises(utils.UsageError, match='not finite in float32'):
        priors.prior_samples(types.SimpleNamespace(groups=[4], z_dim=4), config, 3, gmm=gmm)


# ---- 7. config.json values of the right type that no model has ----------------------------

@pytest.mark.parametrize('key, value, words', [
    ('batch_size', 0, "key 'batch_size' must be a positive integer"),
    ('data_range', '0,2', "key 'data_range' must be one of -1,1, 0,1, got '0,2'"),
    ('z_dim', 10 ** 9, '--z_dim 1000000000 with --arch original --width 64 is too large'),
    ('model', 'nonesuch', "key 'model' must be one of"),
    ('image_size', 30, "key 'image_size' must be one of 28, 32, 64, got 30"),
    ('channels', 0, "key 'channels' must be a positive integer"),
    ('mixed_precision', 'float64', "key 'mixed_precision' must be one of none, float16"),
])
@pytest.mark.parametrize('command', ['generate', 'evaluate'])
def test_config_values_no_model_has_are_one_line(trained, tmp_path, capsys, key, value, words,
                                                 command):
    import shutil
    copy = tmp_path / 'r'
    shutil.copytree(trained, copy)
    path = copy / 'config.json'
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    capsys.readouterr()
    if command == 'generate':
        status = generate.main(['sample', '--run', str(copy), '--n', '2',
                                '--out', str(tmp_path / 's.png')])
    else:
        status = evaluate.main(['--run', str(copy), '--features', 'none', '--iw_samples', '2'])
    assert status == 2
    line = one_error_line(capsys, command + '.py')
    assert str(path) in line and words in line, line


def test_a_beta_sweep_of_zero_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        compare.parse_args(['--models', 'sigma', '--beta_sweep', '0,1'])
    assert e.value.code == 2
    assert "--beta_sweep must list positive numbers: must be a positive number, got '0'" in \
        one_error_line(capsys, 'compare.py')


# ---- 8. evaluate.py on a run folder it cannot write: said before the work ---------------------

@pytest.mark.parametrize('where', ['', 'images'])
def test_evaluate_refuses_a_read_only_run_before_the_evaluation(trained, tmp_path, capsys,
                                                                monkeypatch, where):
    import shutil
    copy = tmp_path / 'r'
    shutil.copytree(trained, copy)
    read_only = str(copy / where) if where else str(copy)
    access = os.access
    # What a read-only mount answers (chmod does not stop root, who may run the tests).
    monkeypatch.setattr(os, 'access', lambda path, mode: False if (
        os.fspath(path) == read_only and mode & os.W_OK) else access(path, mode))
    monkeypatch.setattr(evaluation, '_evaluate_run', lambda *a: pytest.fail('evaluated'))
    capsys.readouterr()
    assert evaluate.main(['--run', str(copy), '--features', 'none', '--iw_samples', '2']) == 2
    line = one_error_line(capsys, 'evaluate.py')
    assert f'cannot write into {read_only} (read-only)' in line


# ---- 9. generate.py sizes and ranges beyond any machine: refused before loading -------------

@pytest.mark.parametrize('argv, words', [
    (['sample', '--n', '200000000'], '--n 200000000 is too large: 200,000,000 images of 28x28x1'),
    (['interpolate', '--test_images', '0,1', '--steps', '100000000'],
     '--steps 100000000 is too large: 200,000,004 images'),
    (['traverse', '--steps', '100000000'], '--steps 100000000 is too large: 400,000,000 images'),
    (['traverse', '--range', '1e300'], '--range must be at most 1e+06'),
])
def test_huge_outputs_are_refused_up_front(trained, tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.setattr(utils, 'physical_memory', lambda: 2 ** 34)
    monkeypatch.setattr(checkpoints, 'load_model', lambda *a, **k: pytest.fail('loaded'))
    assert generate.main(argv + ['--run', trained, '--out', str(tmp_path / 'x.npz')]) == 2
    assert words in one_error_line(capsys, 'generate.py')
    assert not os.path.exists(tmp_path / 'x.npz')


def test_decoded_values_that_are_not_finite_are_refused(trained):
    config = run_folder.read_config(trained)
    vae = types.SimpleNamespace(decode=lambda z: np.full((len(z), 28, 28, 1), np.nan, np.float32))
    with pytest.raises(utils.UsageError, match='not finite'):
        models.decode_images(vae, np.zeros((3, 4)), config.data_range)


# ---- 10. a config.json of another model than its checkpoint: one line, no TF warnings ---------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('key, value', [('z_dim', 5), ('model', 'sigma_pixel'), ('image_size', 32)])
def test_a_config_of_another_model_is_refused_in_exactly_one_line(trained, tmp_path, key, value):
    import shutil
    import subprocess
    import sys
    copy = tmp_path / 'r'
    shutil.copytree(trained, copy)
    path = copy / 'config.json'
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'generate.py'), 'sample', '--run',
                           str(copy), '--n', '2', '--out', str(tmp_path / 's.png')],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and 'does not restore' not in lines[0] and \
        lines[0].startswith('generate.py: error: no checkpoint in'), proc.stderr[-2000:]


# ---- 11. a Ctrl-C after the work is written: no kill by SIGINT, no traceback -------------------

@pytest.mark.parametrize('delay', [0.0, 0.05, 0.3])
def test_a_ctrl_c_after_wrote_ends_without_a_traceback(trained, tmp_path, delay):
    import signal
    import subprocess
    import sys
    import time
    proc = subprocess.Popen([sys.executable, '-u', os.path.join(REPO, 'generate.py'), 'sample',
                             '--run', trained, '--n', '4', '--out', str(tmp_path / 's.png')],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith('wrote ')
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=1800)
    # 0: the signal came after the work was done and is ignored; 130: it came before
    # generate.py's function returned, and is said.
    assert (proc.returncode, err) in ((0, ''), (130, 'generate.py: interrupted\n')), \
        (proc.returncode, err[-2000:])


# ---- 12. smaller refusals: before anything is written, and saying what is wrong ----------------

def test_compare_refuses_one_fid_sample_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(['--models', 'sigma', '--fid_samples', '1', '--output_dir', str(tmp_path)])
    assert e.value.code == 2
    assert 'at least 2' in one_error_line(capsys, 'compare.py')
    assert os.listdir(tmp_path) == []


def test_evaluate_refuses_too_many_components_before_writing(trained, tmp_path, capsys):
    import shutil
    copy = tmp_path / 'r'
    shutil.copytree(trained, copy)
    before = {name: os.path.getmtime(copy / name) for name in files_under(copy)}
    capsys.readouterr()
    assert evaluate.main(['--run', str(copy), '--features', 'none', '--iw_samples', '2',
                          '--components', '1000']) == 2
    assert ('--components must be between 1 and the number of training images (40), got 1000'
            in one_error_line(capsys, 'evaluate.py'))
    assert {name: os.path.getmtime(copy / name) for name in files_under(copy)} == before


def test_sample_refuses_the_run_folder_as_out(trained, capsys):
    before = files_under(trained)
    assert generate.main(['sample', '--run', trained, '--n', '2', '--out', trained]) == 2
    assert 'is a run folder' in one_error_line(capsys, 'generate.py')
    assert files_under(trained) == before


def test_images_that_are_a_fifo_are_not_said_to_be_missing(trained, tmp_path, capsys):
    fifo = tmp_path / 'fifo'
    os.mkfifo(fifo)
    assert generate.main(['reconstruct', '--run', trained, '--images', str(fifo),
                          '--out', str(tmp_path / 'x.png')]) == 2
    assert 'is not a regular file or a folder' in one_error_line(capsys, 'generate.py')


# ---- 13. readers beside a training run: evaluate.py works, evaluate.py --export waits its turn ---

HOLD_LOCK = '''
import sys, time
sys.path.insert(0, sys.argv[1])
import run_folder
with run_folder.FolderLock(sys.argv[2], 'train.py'):
    print('locked', flush=True)
    time.sleep(600)
'''


def test_evaluate_runs_while_another_process_holds_the_lock(trained, tmp_path, capsys):
    import shutil
    import subprocess
    import sys
    copy = tmp_path / 'r'
    shutil.copytree(trained, copy)
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, REPO, str(copy)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        argv = ['--run', str(copy), '--features', 'none', '--iw_samples', '2', '--prior', 'normal']
        assert evaluate.main(argv) == 0
        assert (copy / 'evaluation.json').exists()
        capsys.readouterr()
        assert evaluate.main(argv + ['--export']) == 2
        assert 'is in use by process' in one_error_line(capsys, 'evaluate.py')
        assert not (copy / 'samples.npz').exists()
    finally:
        holder.kill()
        holder.wait()


# ---- 14. a training row above 8 bits/dim on 8-bit values is flagged ----------------------------

def test_a_row_above_8_bits_per_dim_is_flagged():
    row = {'step': 5, 'epoch': 1.0, 'test_loss': 10.0, 'test_bits_per_dim_discrete': 8.4}
    line = training.format_row(row)
    assert line.startswith('step 5 epoch 1 test_loss 10 test_bits_per_dim_discrete 8.4 (above 8 '
                           'bits/dim: ') and 'evaluate.py measures' in line
    assert '(above' not in training.format_row({**row, 'test_bits_per_dim_discrete': 7.9})
    assert '(above' not in training.format_row({'step': 5, 'epoch': 1.0, 'test_loss': 10.0})


def test_evaluate_on_a_full_disk_is_one_line(trained, tmp_path, capsys, monkeypatch):
    import errno
    import shutil
    copy = tmp_path / 'r'
    shutil.copytree(trained, copy)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files, 'atomic_write', full)
    capsys.readouterr()
    assert evaluate.main(['--run', str(copy), '--features', 'none', '--iw_samples', '2',
                          '--prior', 'normal', '--fid_samples', '4']) == 1
    assert 'No space left on device' in one_error_line(capsys, 'evaluate.py')


def test_a_saved_model_gets_the_permissions_of_the_umask(trained, tmp_path):
    # TensorFlow's SavedModel writer makes 755 folders whatever the umask; a group-shared
    # output folder (umask 002) needs them group-writable like every other file of the run.
    previous = os.umask(0o002)
    try:
        assert generate.main(['export', '--run', trained, '--out',
                              str(tmp_path / 'sm')]) == 0
    finally:
        os.umask(previous)
    for root, dirs, names in os.walk(tmp_path / 'sm'):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o775, root
        for name in names:
            assert stat.S_IMODE(os.stat(os.path.join(root, name)).st_mode) == 0o664, name


def test_compare_refuses_a_z_dim_beyond_memory_before_making_its_folder(image_folder, tmp_path,
                                                                        capsys):
    assert compare.main(['--dataset', image_folder, '--output_dir', str(tmp_path / 'c'),
                         '--models', 'sigma', '--z_dim', '1000000000']) == 2
    assert '--z_dim 1000000000 with --arch original --width 64 is too large' in one_error_line(capsys, 'compare.py')
    assert not os.path.exists(tmp_path / 'c')


# ---- 15. the SavedModel loaded elsewhere: the right answer or a clear refusal ---------------------

# Run in a fresh process that imports only TensorFlow and NumPy, as a user loading the folder
# elsewhere does: each call's outputs, or the refusal it raised, go to an .npz as 'call:key'.
SAVED_MODEL_CALLS = r'''
import sys
import numpy as np
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
images = np.full((2, 28, 28, 1), 44, np.uint8)
z = np.zeros((2, 4), np.float32)
calls = {
    'encode uint8': lambda: model.encode(images),
    'encode signature': lambda: model.signatures['encode'](images=tf.constant(images)),
    'encode float32': lambda: model.encode(np.full(images.shape, 0.7, np.float32)),
    'encode int32 300': lambda: model.encode(np.full(images.shape, 300, np.int32)),
    'decode float64': lambda: model.decode(z.astype(np.float64)),
    'decode list': lambda: model.decode(z.tolist()),
    'decode signature': lambda: model.signatures['decode'](z=tf.constant(z)),
    'decode nan': lambda: model.decode(np.full(z.shape, np.nan, np.float32)),
    'decode inf signature': lambda: model.signatures['decode'](z=tf.fill(z.shape, np.inf)),
    'encode empty': lambda: model.encode(images[:0]),
    'encode empty signature': lambda: model.signatures['encode'](images=tf.constant(images[:0])),
    'decode empty': lambda: model.decode(z[:0]),
    'sample 0': lambda: model.sample(n=0, seed=0),
    'sample -1': lambda: model.sample(n=-1, seed=0),
    'sample -1 signature': lambda: model.signatures['sample'](n=tf.constant(-1),
                                                              seed=tf.constant(0, tf.int64)),
}
out = {}
for name, call in calls.items():
    try:
        out.update({f'{name}:{key}': value.numpy() for key, value in call().items()})
    except Exception as e:  # whatever TensorFlow raises: the test reads the message
        out[f'{name}:error'] = np.array(f'{type(e).__name__}: {e}')
np.savez(sys.argv[2], **out)
'''


@pytest.fixture(scope='module')
def saved_model_calls(trained, tmp_path_factory):
    """{call: {output: array} or {'error': message}} of SAVED_MODEL_CALLS on the export of
    `trained`."""
    import subprocess
    import sys
    folder = tmp_path_factory.mktemp('saved_model')
    assert generate.main(['export', '--run', trained, '--out', str(folder / 'model')]) == 0
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}  # TensorFlow alone
    proc = subprocess.run([sys.executable, '-c', SAVED_MODEL_CALLS, str(folder / 'model'),
                           str(folder / 'calls.npz')],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = {}
    with np.load(folder / 'calls.npz') as f:
        for key in f.files:
            name, output = key.split(':')
            calls.setdefault(name, {})[output] = f[key]
    return calls


def refusal(calls, name):
    assert 'error' in calls[name], f'{name} answered {calls[name]}'
    return str(calls[name]['error'])


def answer(calls, name):
    assert 'error' not in calls[name], f"{name} refused: {calls[name]['error']}"
    return calls[name]


def test_a_saved_model_refuses_inputs_of_another_dtype_instead_of_casting_them(saved_model_calls):
    calls = saved_model_calls
    for name, wanted in [('encode float32', 'uint8'), ('encode int32 300', 'uint8'),
                         ('decode float64', 'float32')]:
        assert f'dtype=tf.{wanted}' in refusal(calls, name), name
    # The right dtypes answer as the signatures do, and so do Python numbers.
    for key in ('mu', 'log_var'):
        np.testing.assert_array_equal(answer(calls, 'encode uint8')[key],
                                      answer(calls, 'encode signature')[key])
    np.testing.assert_array_equal(answer(calls, 'decode list')['images'],
                                  answer(calls, 'decode signature')['images'])


def test_a_saved_model_refuses_z_that_are_not_finite(saved_model_calls):
    assert 'z must be finite' in refusal(saved_model_calls, 'decode nan')
    assert 'z must be finite' in refusal(saved_model_calls, 'decode inf signature')


def test_a_saved_model_takes_an_empty_batch_everywhere(saved_model_calls):
    for name in ('encode empty', 'encode empty signature'):
        encoded = answer(saved_model_calls, name)
        assert encoded['mu'].shape == encoded['log_var'].shape == (0, 4), name
    for name in ('decode empty', 'sample 0'):
        assert answer(saved_model_calls, name)['images'].shape == (0, 28, 28, 1), name


def test_a_saved_model_refuses_a_negative_n(saved_model_calls):
    for name in ('sample -1', 'sample -1 signature'):
        assert 'n must be >= 0' in refusal(saved_model_calls, name), name


# ==== Round four (issue 26): folders the tool did not make, links, stale outputs, a cache ====
# ==== that mixed data sets, missing images, your own model under a strategy               ====

def snapshot(folder):
    """{relative path: bytes or the link's target} of everything under folder."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = (os.readlink(path) if os.path.islink(path)
                                                  else open(path, 'rb').read())
    return out


TWO_STEPS = ['--max_steps', '2'] + TINY


# ---- R4-1. a folder that exists and is no run folder: refused before anything is written -----

@pytest.mark.parametrize('entries', [
    {'config.json': '{"mine": 1}', 'lock': 'x', 'sub/.tmp-keep': 'k'},  # the audit's case
    {'metrics.jsonl': 'my own rows\n', 'notes.txt': 'mine'},
])
def test_training_refuses_a_folder_it_did_not_make(image_folder, tmp_path, capsys, entries):
    d = tmp_path / 'd'
    for name, text in entries.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    before = snapshot(d)
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name',
                'd'] + TWO_STEPS) == 2
    assert 'is not a run folder of this tool' in one_error_line(capsys, 'train.py')
    assert snapshot(d) == before


def test_temporaries_are_cleaned_in_the_run_folder_only(image_folder, tmp_path):
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name',
                'r'] + TWO_STEPS) == 0
    run_dir = tmp_path / 'r'
    (run_dir / 'sub').mkdir()
    (run_dir / 'sub' / '.tmp-keep').write_text('k')  # not the tool's, in a folder not its own
    (run_dir / '.tmp-0123456789ab.png').write_text('a killed write')  # the tool's own leftover
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name',
                'r', '--max_steps', '3'] + TINY) == 0
    assert (run_dir / 'sub' / '.tmp-keep').read_text() == 'k'
    assert not (run_dir / '.tmp-0123456789ab.png').exists()


# ---- R4-2. links: never written through ------------------------------------------------------

@pytest.mark.parametrize('name', ['lock', 'metrics.jsonl'])
def test_a_link_in_a_run_folder_is_refused_not_written_through(trained, tmp_path, capsys, name,
                                                               image_folder):
    import shutil
    copy = tmp_path / 'h'
    shutil.copytree(trained, copy)
    target = tmp_path / 'precious.txt'
    target.write_text('keep')
    os.remove(copy / name)
    os.symlink(target, copy / name)
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name',
                'h', '--max_steps', '3'] + TINY) == 2
    assert 'symbolic link' in one_error_line(capsys, 'train.py')
    assert target.read_text() == 'keep'
    if name == 'lock':
        assert evaluate.main(['--run', str(copy), '--export', '--features', 'none',
                              '--iw_samples', '2', '--fid_samples', '4']) == 2
        assert 'symbolic link' in one_error_line(capsys, 'evaluate.py')
        assert target.read_text() == 'keep'


# ---- R4-3. image outputs: the tool's own folder, holding exactly the last output --------------

def test_an_output_folder_of_someone_elses_images_is_refused(trained, tmp_path, capsys):
    out = tmp_path / 'mine'
    out.mkdir()
    (out / '000000.png').write_bytes(b'my own picture')
    for argv in (['sample', '--n', '3'], ['reconstruct', '--test_images', '0,1']):
        assert generate.main(argv + ['--run', trained, '--out', str(out)]) == 2
        assert 'holds files the tool did not write' in one_error_line(capsys, 'generate.py')
    assert (out / '000000.png').read_bytes() == b'my own picture'


def test_an_output_folder_holds_exactly_the_last_output(trained, tmp_path):
    out = tmp_path / 'samples'
    assert generate.main(['sample', '--run', trained, '--n', '10', '--out', str(out)]) == 0
    assert generate.main(['sample', '--run', trained, '--n', '4', '--out', str(out)]) == 0
    assert sorted(os.listdir(out)) == [files.MARKER] + [f'{i:06d}.png' for i in range(4)]
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.tmp-')]


def test_exported_samples_are_the_last_exports_alone(trained, tmp_path):
    import shutil
    copy = tmp_path / 'h'
    shutil.copytree(trained, copy)
    for n in (4, 3):  # the test split has 4 images, which caps --fid_samples
        assert evaluate.main(['--run', str(copy), '--export', '--features', 'none',
                              '--iw_samples', '2', '--fid_samples', str(n), '--prior',
                              'normal']) == 0
    pngs = [n for n in os.listdir(copy / 'samples_png') if n.endswith('.png')]
    assert len(pngs) == 3 == len(np.load(copy / 'samples.npz')['images'])


# ---- R4-4. the on-disk cache: the data it was made of, checked on read -------------------------

def test_the_disk_cache_of_one_folder_never_serves_another(tmp_path, monkeypatch):
    # Two folders of the same names and sizes (uncompressed PNGs: black, white), too large for
    # the memory cache: each run sees its own pixels.
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / 'cache'))
    monkeypatch.setattr(data, 'MEMORY_CACHE_BUDGET', 0)
    means = []
    for name, value in (('black', 0), ('white', 255)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(12):
            Image.fromarray(np.full((28, 28), value, np.uint8)).save(folder / f'{i:02d}.png',
                                                                      compress_level=0)
        splits = data.load(str(folder), None, 28, 0)
        for _ in range(2):  # the first pass writes the cache, the second reads it
            batches = data.make_pipeline(splits.train, 28, 4, drop_remainder=False,
                                         data_range='0,1')
            means.append(float(np.mean(np.concatenate([b.numpy() for b in batches]))))
    assert [os.path.getsize(tmp_path / 'black' / '00.png')] == [
        os.path.getsize(tmp_path / 'white' / '00.png')]
    assert means == [0.0, 0.0, 1.0, 1.0]


# ---- R4-5. missing images: counted and said, never silently dropped ----------------------------

def test_an_unreadable_subfolder_is_said(tmp_path, monkeypatch, capsys):
    folder = make_images(tmp_path / 'g')
    walk = os.walk

    def unreadable_class1(top, onerror=None, **kwargs):  # what a folder without rights gives
        for root, dirs, names in walk(top, onerror=onerror, **kwargs):
            if os.path.basename(root) == 'class1':
                if onerror is not None:  # os.walk says nothing without one
                    onerror(PermissionError(13, 'Permission denied', root))
                continue
            yield root, dirs, names
    monkeypatch.setattr(os, 'walk', unreadable_class1)
    data.load(str(folder), None, 28, 0)
    err = capsys.readouterr().err
    assert 'skipped 1 folder(s) that could not be read' in err and 'class1' in err


def test_a_split_without_readable_images_is_one_line(tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    for i in range(10):
        (empty / f'{i}.png').write_bytes(b'')
    assert run(['--dataset', str(empty), '--output_dir', str(tmp_path / 'o')] + TWO_STEPS) == 2
    assert '(10 of them of 0 bytes)' in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / 'o').exists()  # nothing written
    # Readable training images, a test split of empty files: refused before the run folder.
    # The test split is the first 10% of a permutation seeded by --seed of the sorted files
    # (image_folders.load_folder's docstring); with the empty ones listed, the split does not move.
    folder = make_images(tmp_path / 'g', n=40)
    files = image_folders.list_images(str(folder))[0]
    order = np.random.default_rng(1).permutation(len(files))  # TINY's --seed 1
    for i in order[:4]:
        open(files[i], 'wb').close()
    capsys.readouterr()
    assert run(['--dataset', str(folder), '--output_dir', str(tmp_path / 'o2')] + TWO_STEPS) == 2
    assert 'the test split of' in one_error_line_of(capsys, 'train.py')
    assert not (tmp_path / 'o2' / 'sigma').exists()


def one_error_line_of(capsys, prog):
    """The error line among stderr's lines (warnings before it allowed)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith(f'{prog}: error: ')]
    assert len(errors) == 1 and 'Traceback' not in '\n'.join(lines), lines
    return errors[0]


def test_file_names_that_are_not_utf8_train_and_generate(tmp_path, capsys):
    folder = make_images(tmp_path / 'g')
    odd = os.path.join(os.fsencode(folder / 'class0'), b'\xff\xfe.png')
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(os.fsdecode(odd))
    assert run(['--dataset', str(folder), '--output_dir', str(tmp_path / 'o')] + TWO_STEPS) == 0
    assert generate.main(['encode', '--run', str(tmp_path / 'o' / 'sigma'), '--images',
                          str(folder / 'class0'), '--out', str(tmp_path / 'codes.npz')]) == 0


# ---- R4-6, 8, 9. flags: one line, naming the flag that is wrong --------------------------------

@pytest.mark.parametrize('argv, words', [
    (['--width', '1' + '0' * 400], '--width: must be a positive integer of at most'),
    (['--kl_warmup', '1' + '0' * 400], '--kl_warmup: must be a positive integer of at most'),
    (['--width', '100000000'], '--width 100000000 is too large'),
])
def test_sizes_beyond_any_machine_are_one_line_naming_the_flag(image_folder, tmp_path, capsys,
                                                               argv, words):
    assert run(['--dataset', image_folder, '--output_dir', str(tmp_path)] + TWO_STEPS + argv) == 2
    assert words in one_error_line(capsys, 'train.py')
    assert not os.listdir(tmp_path)


def test_compare_refuses_a_heuristic_no_run_would_use(image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(['--dataset', image_folder, '--output_dir', str(tmp_path), '--models',
                      'sigma', '--kl_warmup', '100'])
    assert e.value.code == 2
    assert '--kl_warmup applies to the runs of --heuristics only' in one_error_line(capsys, 'compare.py')


# ---- R4-7. a run that diverges before its first checkpoint is a result, not the end ----------

def test_a_comparison_records_a_run_that_diverged_before_a_checkpoint(image_folder, tmp_path):
    out = tmp_path / 'c'
    assert compare.main(['--dataset', image_folder, '--models', 'gaussian', '--beta_sweep',
                         '1e38', '--max_steps', '6', '--batch_size', '8', '--z_dim', '4',
                         '--features', 'none', '--iw_samples', '2', '--output_dir', str(out)]) == 0
    results = json.load(open(out / 'results.json'))
    assert [r['name'] for r in results] == ['gaussian', 'beta-VAE (beta=1e+38)']
    assert results[0]['diverged'] == 'no' and np.isfinite(results[0]['test_neg_elbo'])
    assert results[1]['diverged'].startswith('step ') and 'test_neg_elbo' not in results[1]
    assert '| beta-VAE (beta=1e+38) |' in open(out / 'results.md').read()


# ---- R4-10. an export killed mid-write, an export onto a link ---------------------------------

def test_an_export_cleans_a_killed_exports_leftovers_and_refuses_a_link(trained, tmp_path,
                                                                        capsys):
    out = tmp_path / 'model'
    stale = tmp_path / '.tmp-model-new-999999999'  # a process that no longer runs
    stale.mkdir()
    (stale / 'saved_model.pb').write_bytes(b'half')
    assert generate.main(['export', '--run', trained, '--out', str(out)]) == 0
    assert not stale.exists() and (out / 'saved_model.pb').exists()
    link = tmp_path / 'link'
    os.symlink(out, link)
    assert generate.main(['export', '--run', trained, '--out', str(link)]) == 2
    assert 'symbolic link' in one_error_line(capsys, 'generate.py')
    assert os.path.islink(link) and not [n for n in os.listdir(tmp_path) if n.startswith('.tmp-')]


# ---- R4-11. your own VAE: settings that cannot train are refused when it is made --------------

@pytest.mark.parametrize('kwargs, error', [
    (dict(kl_warmup=0), ValueError), (dict(beta=float('nan')), ValueError),
    (dict(beta=-1.0), ValueError), (dict(free_bits=-2.0), ValueError),
    (dict(kl_warmup=2.5), ValueError), (dict(likelihood='optimal'), TypeError),
])
def test_your_own_vae_refuses_settings_that_cannot_train(kwargs, error):
    import losses
    vae = models.network_vae(28, 1, 2, losses.Gaussian((-1, 1)))
    args = {**dict(encoder=vae.encoder, decoder=vae.decoder, likelihood=vae.likelihood), **kwargs}
    with pytest.raises(error):
        models.VAE(**args)


# ---- R4-12. the example: bad flags and paths before the training -------------------------------

@pytest.mark.parametrize('argv, words', [
    (['--steps', '0'], "must be a positive integer, got '0'"),
    (['--lr', 'nan'], "--lr: must be a positive number, got 'nan'"),
    (['--batch_size', '0'], "--batch_size: must be a positive integer, got '0'"),
    (['--dataset', '/no/such/folder'], "--dataset '/no/such/folder' does not exist"),
])
def test_the_example_refuses_bad_flags_in_one_line(argv, words, capsys):
    your_own_vae = _example()
    try:
        status = your_own_vae.main(argv)
    except SystemExit as e:  # argparse's own refusal
        status = e.code
    assert status == 2 and words in capsys.readouterr().err


def test_the_example_refuses_an_unwritable_output_before_training(tmp_path, monkeypatch, capsys):
    your_own_vae = _example()
    monkeypatch.setattr(data, 'load', lambda *a, **k: pytest.fail('trained first'))
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    assert your_own_vae.main(['--samples', str(blocker / 'samples.png')]) == 2
    assert "--samples" in capsys.readouterr().err


def _example():
    import importlib
    import sys
    sys.path.insert(0, os.path.join(REPO_DIR, 'examples'))
    try:
        return importlib.import_module('your_own_vae')
    finally:
        sys.path.pop(0)


REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- R4-13, 14, 15. your own model with vae_loss: the global batch, the data range, the mean ----

SIGMA_OF_REPLICAS = r'''
import losses
likelihood = losses.DECODERS['optimal']((-1, 1), log_sigma_min=None)

def step(x, params):  # a train_step of one's own: vae_loss without the distribution hooks
    mu = log_var = tf.zeros((tf.shape(x)[0], 2))
    return losses.vae_loss(likelihood, x, params, mu, log_var, training=True)[1]['log_sigma']

x = np.zeros((4, 2, 2, 1), np.float32)
# Replica 0's two images err by 0.1 everywhere, replica 1's by 0.3: the global RMS is sqrt(0.05).
params = np.concatenate([np.full((2, 2, 2, 1), 0.1), np.full((2, 2, 2, 1), 0.3)]).astype('float32')
data = tf.data.Dataset.from_tensor_slices((x, params)).batch(4)
batch = next(iter(MIRRORED.experimental_distribute_dataset(data)))
result = MIRRORED.run(step, args=batch)
json.dump([float(v) for v in MIRRORED.experimental_local_results(result)],
          open(os.path.join(sys.argv[2], 'result.json'), 'w'))
'''


def test_sigma_star_is_the_global_batchs_under_a_strategy_without_extra_arguments(tmp_path):
    from conftest import on_two_cpus
    log_sigmas = on_two_cpus(SIGMA_OF_REPLICAS, tmp_path)
    assert len(log_sigmas) == 2
    for value in log_sigmas:
        assert value == pytest.approx(0.5 * np.log(0.05), abs=1e-5)


def test_a_likelihood_states_its_data_range_and_refuses_data_outside_it():
    import losses
    import tensorflow as tf
    with pytest.raises(TypeError):
        losses.DECODERS['optimal']()
    likelihood = losses.DECODERS['gaussian']((0, 1))
    x = tf.constant(np.full((2, 4, 4, 1), -0.5), tf.float32)  # data in [-1, 1]
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the likelihood's data range"):
        losses.vae_loss(likelihood, x, x, tf.zeros((2, 2)), tf.zeros((2, 2)), training=True)
    vae = models.network_vae(28, 1, 2, likelihood)
    vae.compile('adam')
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the likelihood's data range"):
        vae.fit(np.full((4, 28, 28, 1), -1.0, np.float32), epochs=1, verbose=0)


def test_the_reduction_is_stated():
    import losses
    import tensorflow as tf
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(-1, 1, (4, 6, 6, 1)), tf.float32)
    params = tf.constant(rng.uniform(-0.9, 0.9, (4, 6, 6, 1)), tf.float32)
    mu, log_var = (tf.constant(rng.normal(size=(4, 3)), tf.float32) for _ in range(2))
    for name in ('gaussian', 'optimal', 'logistic'):
        likelihood = losses.DECODERS[name]((-1, 1))
        p = tf.concat([params] * likelihood.params_per_value, -1)
        total, _ = losses.vae_loss(likelihood, x, p, mu, log_var, training=True)
        mean, _ = losses.vae_loss(likelihood, x, p, mu, log_var, training=True, reduction='mean')
        assert float(mean) == pytest.approx(float(total) / 4, rel=1e-6)


def test_an_encoders_third_output_is_ignored_and_said_and_predict_gives_reconstructions():
    import keras
    import losses
    rng = np.random.default_rng(0)
    # A keras.io-style encoder (z_mean, z_log_var, z): its z is ignored, and said.
    inputs = keras.Input((28, 28, 1))
    h = keras.layers.Flatten()(inputs)
    z_mean, z_log_var = keras.layers.Dense(2)(h), keras.layers.Dense(2)(h)
    encoder = keras.Model(inputs, [z_mean, z_log_var, z_mean + 0 * z_log_var])
    decoder = models.network_vae(28, 1, 2, losses.Gaussian((-1, 1))).decoder
    with pytest.warns(UserWarning, match="third output"):
        vae = models.VAE(encoder, decoder, losses.Gaussian((-1, 1)))
    images = rng.uniform(-1, 1, (3, 28, 28, 1)).astype('float32')
    np.testing.assert_allclose(vae.predict(images, verbose=0), vae.reconstruct(images).numpy(),
                               rtol=1e-5, atol=1e-6)

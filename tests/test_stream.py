"""An image folder streams: nothing decoded up front, the same split, labels in step."""
import hashlib
import json
import os

import numpy as np
from PIL import Image

from conftest import TINY, run

import data

import image_folders
import run_folder


def eager_reading(folder, seed, mode='L'):
    """The split as load_folder promised it before streaming, read with PIL alone:
    (test images, their paths, fingerprint)."""
    files = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                   for name in names if name.endswith('.png'))
    order = np.random.default_rng(seed).permutation(len(files))
    num_test = max(1, int(round(0.1 * len(files))))
    test = [files[i] for i in order[:num_test]]
    images = np.stack([np.asarray(Image.open(p).convert(mode), np.uint8).reshape(28, 28, -1)
                       for p in test])
    digest = hashlib.sha256()
    for path in files:
        digest.update(f'{os.path.relpath(path, folder)}\0{os.path.getsize(path)}\0'.encode())
    return images, test, f'{len(files)} images, sha256 {digest.hexdigest()[:16]}'


def test_a_streamed_folder_gives_the_test_split_and_fingerprint_of_an_eager_reading(image_folder):
    expected, paths, fingerprint = eager_reading(image_folder, seed=1)
    splits = data.load(image_folder, 28, seed=1)
    assert splits.fingerprint == fingerprint  # the value runs made before streaming recorded
    assert (splits.num_test, splits.channels) == (len(paths), 1)
    np.testing.assert_array_equal(np.stack(list(splits.test.as_numpy_iterator())), expected)
    labels = list(splits.test_labels.as_numpy_iterator())
    assert labels == [int(os.path.basename(os.path.dirname(p))[-1]) for p in paths]
    # The older reading (check_files=True) of a folder with nothing bad gives the same.
    older = image_folders.load_folder(image_folder, 28, seed=1, check_files=True)
    assert older.fingerprint == fingerprint
    np.testing.assert_array_equal(np.stack(list(older.test.as_numpy_iterator())), expected)


def make_folder(folder, count, classes=2):
    """count 28x28 grayscale PNGs, class c (subfolder c{c}) of value 40 + 100 c."""
    for i in range(count):
        c = i % classes
        os.makedirs(folder / f'c{c}', exist_ok=True)
        Image.fromarray(np.full((28, 28), 40 + 100 * c, np.uint8)).save(folder / f'c{c}' / f'{i:04d}.png')
    return str(folder)


def test_load_opens_a_few_headers_and_decodes_nothing(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / 'many', 300)
    opened, decoded = [], []
    real_open, real_read = Image.open, image_folders._read_image
    monkeypatch.setattr(Image, 'open', lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    monkeypatch.setattr(image_folders, '_read_image', lambda *a: decoded.append(a[0]) or real_read(*a))
    splits = data.load(folder, 28, seed=0)
    assert len(opened) <= image_folders.MODE_SAMPLE < 300 and decoded == []  # headers of a sample only
    assert splits.num_train + splits.num_test == 300
    next(iter(data.make_pipeline(splits.train, 28, 8, shuffle_seed=0)))
    assert 8 <= len(decoded) < 300  # the first batch decodes what it needs, not the folder


def decodes_per_pass(splits, monkeypatch, passes=2):
    decoded = []
    real_read = image_folders._read_image
    monkeypatch.setattr(image_folders, '_read_image', lambda *a: decoded.append(a[0]) or real_read(*a))
    pipeline = data.make_pipeline(splits.train, 28, 8, shuffle_seed=0)
    for _ in range(passes):
        for _ in pipeline:
            pass
    return len(decoded) / splits.num_train


def test_the_memory_cache_keeps_to_its_budget_and_a_file_cache_is_optional(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / 'f', 40)
    splits = data.load(folder, 28, seed=0)
    assert data.cache_bytes(splits.train, 28) == splits.num_train * 28 * 28
    assert decodes_per_pass(splits, monkeypatch) == 1  # cached in memory: one decode
    monkeypatch.setattr(data, 'MEMORY_CACHE_BUDGET', 28 * 28 * 10)  # smaller than the split
    monkeypatch.delenv(data.CACHE_DIR_ENV, raising=False)
    assert decodes_per_pass(splits, monkeypatch) == 2  # not cached: every pass decodes
    cache = tmp_path / 'cache'
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(cache))
    assert decodes_per_pass(splits, monkeypatch) == 1  # cached on disk
    assert any(name.startswith('folder_') and name.endswith('_train.index')
               for name in os.listdir(cache))
    assert decodes_per_pass(splits, monkeypatch) == 0  # read back from the file


def test_a_source_of_known_size_is_budgeted_by_count_and_run_size():
    import tensorflow as tf  # a tfds split, or Fashion-MNIST's IDX arrays: tf.data knows the count
    images = tf.data.Dataset.from_tensor_slices(np.zeros((5, 10, 10, 3), np.uint8))
    assert data.cache_bytes(images, 64) == 5 * 64 * 64 * 3
    assert data.cache_bytes(images.filter(lambda x: True), 64) is None  # unknown: not cached


def test_a_bad_file_met_midstream_is_skipped_with_its_label(tmp_path, capsys):
    folder = make_folder(tmp_path / 'bad', 60)
    bad = os.path.join(folder, 'c1', '0001.png')
    with open(bad, 'wb') as f:
        f.write(b'not a png')
    splits = data.load(folder, 28, seed=0)
    assert splits.num_train + splits.num_test == 60  # listed: nothing is decoded yet
    pairs = [(int(x[0, 0, 0]), int(y)) for split, labels in (
        (splits.train, splits.train_labels), (splits.test, splits.test_labels))
        for x, y in zip(split.as_numpy_iterator(), labels.as_numpy_iterator())]
    assert len(pairs) == 59 and all(value == 40 + 100 * label for value, label in pairs)
    assert capsys.readouterr().err.count(f'skipped image file {bad}: could not be read') == 1


def test_a_run_made_before_streaming_of_a_folder_with_a_bad_file_resumes(tmp_path, capsys):
    folder = make_folder(tmp_path / 'old', 40)
    with open(os.path.join(folder, 'c0', 'zz.png'), 'wb') as f:
        f.write(b'not a png')
    args = ['--dataset', folder, '--output_dir', str(tmp_path), '--max_steps', '2'] + TINY
    assert run(args) == 0
    path = os.path.join(str(tmp_path), 'sigma', run_folder.CONFIG_FILE)
    with open(path) as f:
        saved = json.load(f)
    older = image_folders.load_folder(folder, 28, saved['seed'], check_files=True)
    assert older.fingerprint != saved['data_fingerprint']  # 40 decodable files, not 41 listed
    saved['data_fingerprint'] = older.fingerprint  # as the eager reading recorded it
    with open(path, 'w') as f:
        json.dump(saved, f)
    capsys.readouterr()
    assert run(args[:-len(TINY)] + ['--max_steps', '4'] + TINY) == 0
    with open(path) as f:
        assert json.load(f)['data_fingerprint'] == older.fingerprint

"""Input pipelines: tensorflow-datasets, Fashion-MNIST from local IDX files, image folders.

Every source yields uint8 images (H, W, C); `make_pipeline` resizes them, caches
them in memory (within a budget), shuffles, batches and scales them to the run's data range
with tf.data: [-1, 1] as the original TF code (default), or [0, 1] as its PyTorch sibling.
An image folder is streamed: listed, split and fingerprinted from file names and sizes, and
decoded in parallel inside tf.data (image_folders.py).
"""
import dataclasses
import gzip
import json
import os
import re
import socket
import urllib.parse
from typing import Optional

import numpy as np
import tensorflow as tf

import files
import utils
from utils import UsageError

TFDS_DATASETS = ('svhn_cropped', 'mnist', 'fashion_mnist', 'cifar10', 'celeb_a')
# Where Debian's package dataset-fashion-mnist puts the original IDX files.
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'
IDX_FILES = {'train': 'train-images-idx3-ubyte.gz', 'test': 't10k-images-idx3-ubyte.gz'}
IDX_LABELS = {'train': 'train-labels-idx1-ubyte.gz', 'test': 't10k-labels-idx1-ubyte.gz'}
SHUFFLE_BUFFER = 1000  # as the original
DATA_RANGES = {'-1,1': (-1.0, 1.0), '0,1': (0.0, 1.0)}  # --data_range -> (low, high)
MEMORY_CACHE_BUDGET = 2 * 2 ** 30  # bytes of decoded images make_pipeline caches in memory
# A folder for make_pipeline's on-disk cache of the data sets too large for the memory budget.
CACHE_DIR_ENV = 'SIGMA_VAE_DATA_CACHE'


@dataclasses.dataclass
class Splits:
    """Unbatched uint8 image datasets and what the model needs to know of them.

    train_labels / test_labels yield the class of each image in the same order
    (None when the source has no labels); only the evaluation's classifier uses them.
    For a streamed image folder num_train / num_test count the listed files: files that
    turn out not to decode are skipped as the pipeline meets them (see image_folders.load_folder).
    """
    train: tf.data.Dataset
    test: tf.data.Dataset
    num_train: int
    num_test: int
    channels: int
    source: str  # a human-readable description of where the images came from
    train_labels: Optional[tf.data.Dataset] = None
    test_labels: Optional[tf.data.Dataset] = None
    num_classes: int = 0
    # What the test split of an image folder depends on: its files' number, paths and sizes, as
    # 'N images, sha256 <16 hex digits>'; None for a data set that does not change.
    fingerprint: Optional[str] = None


def load(dataset, data_dir=None, image_size=28, seed=0):
    """Returns the Splits of a tfds name or of a folder of PNG/JPEG images.

    Raises UsageError with a one-line explanation when the data cannot be had.
    """
    if os.sep in dataset or os.path.isdir(dataset):
        import image_folders  # which imports this module (Splits)
        return image_folders.load_folder(dataset, image_size, seed)
    if dataset == 'fashion_mnist':
        local = find_fashion_mnist(data_dir)
        if local and not _is_prepared(_tfds_builder(dataset, data_dir)):
            return load_idx(local)
    return load_tfds(dataset, data_dir)


# ---- tensorflow-datasets ----------------------------------------------------

def _tfds_builder(name, data_dir):
    import tensorflow_datasets as tfds
    try:
        with files.private_tempdir():  # tfds leaves an empty tmp...tfds folder in $TMPDIR
            return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UsageError(
            f"unknown data set '{name}': give a tensorflow-datasets name "
            f"({', '.join(TFDS_DATASETS)}, ...) or the path of an image folder") from None


def _is_prepared(builder):
    # Asking for a data set that is not there makes tfds warn of a "variant folder" with no
    # dataset_info.json (it creates none): noise when the data come from elsewhere, or before
    # the line that says what to do.
    with utils.quiet_logger('absl'):
        return builder.is_prepared()


def _reachable(url, timeout=5.0):
    """Whether a TCP connection to the host of `url` opens within `timeout` s."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == 'https' else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except (OSError, TypeError):
        return False


def load_tfds(name, data_dir):
    builder = _tfds_builder(name, data_dir)
    if not _is_prepared(builder):
        # tfds retries unreachable downloads for minutes: ask the network first.
        if not _reachable(builder.info.homepage):
            raise UsageError(
                f"data set '{name}' is not prepared in {builder.data_dir} and its source "
                f"({builder.info.homepage}) cannot be reached: prepare it where there is "
                f"internet (tfds build {name} --data_dir DIR) and pass --data_dir DIR, "
                f"or pass a folder of images as --dataset"
                + (f" (Fashion-MNIST: apt-get install dataset-fashion-mnist puts its files in "
                   f"{DEBIAN_FASHION_MNIST})" if name == 'fashion_mnist' else ''))
        with files.private_tempdir():
            builder.download_and_prepare()
    splits = builder.info.splits
    test_split = 'test' if 'test' in splits else 'validation'

    features = builder.info.features

    def split(name, key):
        return builder.as_dataset(split=name, shuffle_files=False).map(
            lambda example: example[key], num_parallel_calls=tf.data.AUTOTUNE)

    labelled = 'label' in features
    return Splits(split('train', 'image'), split(test_split, 'image'),
                  splits['train'].num_examples, splits[test_split].num_examples,
                  features['image'].shape[-1], f'tfds:{name}',
                  split('train', 'label') if labelled else None,
                  split(test_split, 'label') if labelled else None,
                  features['label'].num_classes if labelled else 0)


# ---- Fashion-MNIST from IDX files --------------------------------------------

def find_fashion_mnist(data_dir=None):
    """The first folder holding the Fashion-MNIST IDX .gz files, or None."""
    for folder in (data_dir, os.path.join(data_dir or '', 'fashion-mnist'), DEBIAN_FASHION_MNIST):
        if folder and all(os.path.isfile(os.path.join(folder, f)) for f in IDX_FILES.values()):
            return folder
    return None


def read_idx(path):
    """A gzipped IDX file of uint8: images (magic 0x803; N, H, W) -> (N, H, W, 1),
    labels (magic 0x801; N) -> (N,). Dimensions are big-endian uint32."""
    with gzip.open(path, 'rb') as f:
        raw = f.read()
    magic = int(np.frombuffer(raw[:4], dtype='>u4')[0])
    ndim = {0x801: 1, 0x803: 3}.get(magic)
    shape = tuple(int(d) for d in np.frombuffer(raw[4:4 + 4 * (ndim or 0)], dtype='>u4'))
    if ndim is None or len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
        raise UsageError(f'{path} is not an IDX uint8 image or label file')
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    return data[..., None] if ndim == 3 else data


def load_idx(folder):
    train, test = (read_idx(os.path.join(folder, IDX_FILES[s])) for s in ('train', 'test'))
    labels = [os.path.join(folder, IDX_LABELS[s]) for s in ('train', 'test')]
    train_y = test_y = None
    if all(os.path.isfile(p) for p in labels):
        train_y, test_y = (tf.data.Dataset.from_tensor_slices(read_idx(p).astype(np.int64))
                           for p in labels)
    return Splits(tf.data.Dataset.from_tensor_slices(train),
                  tf.data.Dataset.from_tensor_slices(test),
                  len(train), len(test), 1, f'idx:{folder}', train_y, test_y,
                  10 if train_y is not None else 0)


def load_run_data(config, fingerprint=None, channels=None):
    """`load` of a run's data set (config: its dataset, data_dir, image_size, seed). An image
    folder is streamed (image_folders.py); when a run made before streaming recorded another
    fingerprint or channel count for it (a folder with files that do not decode, or with a few
    RGB files among grayscale ones), the folder is read as it was then (check_files=True: every
    file decoded once up front), so that such runs resume and load with the same split."""
    splits = load(config.dataset, config.data_dir, config.image_size, config.seed)
    if fingerprint and splits.fingerprint is not None and (
            fingerprint != splits.fingerprint or (channels or splits.channels) != splits.channels):
        import image_folders
        older = image_folders.load_folder(config.dataset, config.image_size, config.seed, check_files=True)
        if older.fingerprint == fingerprint and (channels or older.channels) == older.channels:
            return older
    return splits


# ---- the pipeline -----------------------------------------------------------

def to_range(images, data_range='-1,1'):
    """uint8 [0, 255] -> float32 in the data range ([-1, 1] or [0, 1])."""
    low, high = DATA_RANGES[data_range]
    return tf.cast(images, tf.float32) * ((high - low) / 255.0) + low


def to_uint8(images, data_range='-1,1'):
    """float in the data range -> uint8 [0, 255], rounded and clipped (NumPy)."""
    low, high = DATA_RANGES[data_range]
    pixels = (np.asarray(images, np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def to_uint8_tensor(images, data_range='-1,1'):
    """`to_uint8` in TensorFlow, for graphs (float64, rounding half to even as NumPy)."""
    low, high = DATA_RANGES[data_range]
    pixels = (tf.cast(images, tf.float64) - low) * (255.0 / (high - low))
    return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)


def _num_images(images):
    """How many images a dataset yields: its cardinality, or what image_folders tagged it with
    (a streamed folder's filter hides the count from tf.data); None if unknown."""
    count = int(images.cardinality())
    if count >= 0:
        return count
    return getattr(images, 'sigma_vae_num_images', None)


def cache_bytes(images, image_size):
    """The estimated bytes of `images` resized and cached as uint8, or None if unknown."""
    count, shape = _num_images(images), images.element_spec.shape
    channels = shape[-1] if shape.rank == 3 and shape[-1] is not None else 3
    return None if count is None else count * image_size * image_size * channels


def _cache(ds, images, image_size):
    """`ds` cached in memory when its estimated size fits MEMORY_CACHE_BUDGET; otherwise cached
    in a file under $SIGMA_VAE_DATA_CACHE when that is set and the data set has a cache name
    (an image folder's names its content, size, channels, seed and split), else not cached.

    A file cache is written during the first full pass and read afterwards; one that another
    process is writing (or a killed one left half-written: delete its files) fails with
    tf.data's AlreadyExistsError naming its lockfile."""
    size = cache_bytes(images, image_size)
    if size is not None and size <= MEMORY_CACHE_BUDGET:
        return ds.cache()
    folder, name = os.environ.get(CACHE_DIR_ENV), getattr(images, 'sigma_vae_cache_name', None)
    if folder and name:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, name)
        _check_cache(path, images.sigma_vae_cache_identity)
        return ds.cache(path)
    return ds




def _check_cache(path, identity):
    """Keeps the on-disk cache at `path` only if its record (<path>.json) says it holds the
    images of `identity`; otherwise deletes its files (ours: <path>.index, <path>.data-*) and
    writes the record of what it will hold. A key that two data sets share (the cache of an
    earlier version hashed names and sizes only) is so found and rebuilt, not read."""
    record = path + '.json'
    try:
        with open(record, encoding='utf-8') as f:
            stored = json.load(f)
    except (OSError, ValueError):
        stored = None
    if stored == identity:
        return
    folder, name = os.path.split(path)
    for entry in os.listdir(folder):
        if entry == name + '.index' or re.fullmatch(re.escape(name) + r'\.data-\d{5}-of-\d{5}',
                                                    entry):
            os.remove(os.path.join(folder, entry))
    files.write_text(record, json.dumps(identity, indent=2) + '\n')


def make_pipeline(images, image_size, batch_size, shuffle_seed=None, drop_remainder=True,
                  data_range='-1,1'):
    """uint8 images -> batches (B, S, S, C) of float32 in the data range.

    The resized uint8 images are cached in memory when they fit in MEMORY_CACHE_BUDGET
    (counted from the number of images and their size), so only the first pass decodes;
    larger sets are decoded on every pass, or cached on disk under $SIGMA_VAE_DATA_CACHE
    when that names a folder (see `_cache`).
    Train batches are shuffled (buffer 1000, a fresh order each epoch) and drop
    the remainder, as the original; pass shuffle_seed=None for a test pipeline.
    """
    def resize(image):
        if image.shape[0] == image_size and image.shape[1] == image_size:
            return image
        # TF 1's bilinear resize (no half-pixel centres), as the original; rounded to 8 bits
        # (the original kept the floats), so that every model sees 8-bit values.
        image = tf.compat.v1.image.resize_images(image, (image_size, image_size))
        return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

    ds = _cache(images.map(resize, num_parallel_calls=tf.data.AUTOTUNE), images, image_size)
    if shuffle_seed is not None:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda x: to_range(x, data_range),
                num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
    # No autotuning model thread: deleting an iterator (train() makes one per epoch) must join
    # that thread, which often misses its wake-up and sleeps until its next scheduled pass
    # (10 ms doubling up to 60 s), e.g. stretching a 41 s epoch to exactly 81.9 s.
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def as_uint8(images, image_size, n=None):
    """The first n (None: all) images of an unbatched uint8 dataset at the run's size (through
    make_pipeline's resize), as one uint8 array (N, S, S, C)."""
    if n is not None:
        images = images.take(n)
    # On [0, 1] the round trip of uint8 values through float32 is exact.
    batches = make_pipeline(images, image_size, 1000, drop_remainder=False, data_range='0,1')
    return np.concatenate([to_uint8(b, '0,1') for b in batches])

"""A folder of the user's images (PNG/JPEG, class subfolders optional): listed, split and
fingerprinted from the file system alone, then decoded in parallel inside tf.data as the
pipeline asks (streamed); unreadable files skipped and said; the key and identity of its
on-disk cache. data.load hands a folder here."""
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import stat
import sys
import warnings

import numpy as np
import tensorflow as tf

import data
import utils
from utils import UsageError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')  # PIL modes read as one channel
SIXTEEN_BIT_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')  # PIL's modes of 16-bit gray PNGs
TEST_FRACTION = 0.1  # of an image folder, held out as its test split
CACHE_VERSION = 2  # of what an on-disk cache holds and how its key is made


# ---- a folder of the user's images ------------------------------------------

def list_images(folder):
    """(image files, other entries): the regular PNG/JPEG files under `folder`, sorted, and the
    entries with such a name that are not regular files (FIFOs, sockets, devices, broken links),
    which are never opened: reading a FIFO would wait forever."""
    listing = _list(folder)
    return listing.files, listing.others


@dataclasses.dataclass
class Listing:
    """The image files under a folder, sorted, with their sizes and modification times; the
    entries with an image's name that are not regular files (never opened); the files of 0
    bytes (listed, but never images); the subfolders that could not be read."""
    files: list
    sizes: list
    mtimes: list
    others: list
    empty: list
    unreadable: list


def _list(folder):
    found, others, unreadable = [], [], []
    for root, _, names in os.walk(folder, onerror=lambda e: unreadable.append(e.filename)):
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(root, name)
                try:
                    info = os.stat(path)
                    regular = stat.S_ISREG(info.st_mode)
                except OSError:
                    regular = False
                if regular:
                    found.append((path, info.st_size, info.st_mtime_ns))
                else:
                    others.append(path)
    found.sort()
    return Listing([p for p, _, _ in found], [n for _, n, _ in found], [t for _, _, t in found],
                   sorted(others), [p for p, n, _ in found if n == 0], sorted(unreadable))


class TooLarge(Exception):
    """An image with more pixels than Pillow's decompression-bomb limit."""


def _open_image(path):
    """Opens an image file (header only), refusing one larger than Pillow's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS) before anything is decoded."""
    from PIL import Image
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as e:
            raise TooLarge(str(e)) from None
    if limit and image.size[0] * image.size[1] > limit:
        image.close()
        raise TooLarge(f'{image.size[0]}x{image.size[1]} pixels, more than the limit of {limit:,}')
    return image


def _read_image(path, mode, size):
    """One file -> uint8 (size, size, C) in `mode` ('L' or 'RGB'), or the error it raised.

    16-bit grayscale is scaled to 8 bits (v / 257, rounded); Pillow's own conversion would
    clip every value above 255 to white."""
    from PIL import Image
    try:
        with _open_image(path) as image:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', Image.DecompressionBombWarning)
                image.load()
            if image.mode in SIXTEEN_BIT_MODES:
                values = np.clip(np.asarray(image, np.float64) / 257.0, 0, 255)
                image = Image.fromarray(np.round(values).astype(np.uint8), 'L')
            image = image.convert(mode).resize((size, size), Image.BILINEAR)
            return np.asarray(image, np.uint8).reshape(size, size, -1)
    except Exception as e:  # PIL raises many kinds for broken files
        return e


def _skip_warning(total, bad=(), others=(), empty=(), unreadable=()):
    """The one warning line that counts what is skipped: `bad` [(path, exception)] that did not
    decode (TooLarge among them), `others` entries that are not regular files, `empty` files of
    0 bytes, `unreadable` subfolders (their files are not listed)."""
    large = [(p, r) for p, r in bad if isinstance(r, TooLarge)]
    broken = [(p, r) for p, r in bad if not isinstance(r, TooLarge)]
    kinds = [f'{len(broken)} that could not be read, e.g. {broken[0][0]} '
             f'({type(broken[0][1]).__name__}: {broken[0][1]})' if broken else '',
             f'{len(large)} too large, e.g. {large[0][0]} ({large[0][1]})' if large else '',
             f'{len(empty)} of 0 bytes, e.g. {empty[0]}' if empty else '',
             f'{len(others)} that are not regular files, e.g. {others[0]}' if others else '']
    files = (f'skipped {len(bad) + len(others) + len(empty)} of {total} image files: '
             + '; '.join(k for k in kinds if k)) if any(kinds) else ''
    folders = (f"skipped {len(unreadable)} folder(s) that could not be read, with whatever images "
               f"they hold: {', '.join(unreadable[:3])}" if unreadable else '')
    print('warning: ' + '; '.join(s for s in (files, folders) if s), file=sys.stderr)


def _read_files(files, mode, size, others=(), keep=True):
    """[(path, uint8 (size, size, C))] of the files that decode, read in parallel in `mode`;
    one warning counts the others (and `others`, entries that are not regular files).
    keep=False checks only: the images are dropped as they come, [(path, None)]."""
    def read(path):
        image = _read_image(path, mode, size)
        return image if keep or isinstance(image, Exception) else None

    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool:
        results = list(utils.progress(pool.map(read, files),
                                      len(files) >= 1000, total=len(files), desc='reading images',
                                      unit='file', leave=False))
    bad = [(p, r) for p, r in zip(files, results) if isinstance(r, Exception)]
    if bad or others:
        _skip_warning(len(files) + len(others), bad, others)
    return [(p, r) for p, r in zip(files, results) if not isinstance(r, Exception)]


def _mode(path):
    try:
        with _open_image(path) as image:
            return image.mode
    except Exception:
        return None


def read_images(path, image_size, channels):
    """A PNG/JPEG file, or every one under a folder, as a run of `channels` sees them (as
    `load_folder` reads them): uint8 (N, image_size, image_size, channels), and their paths,
    sorted. Unreadable files under a folder are skipped with one warning; a path that gives
    no image raises UsageError. (Eager: for the few images generate.py is given.)"""
    mode = 'L' if channels == 1 else 'RGB'
    if os.path.isfile(path):
        image = _read_image(path, mode, image_size)
        if isinstance(image, Exception):
            raise UsageError(f"cannot read image '{path}' ({type(image).__name__})")
        return image[None], [path]
    if not os.path.isdir(path):
        raise UsageError(f"image path '{path}' " + (
            'is not a regular file or a folder' if os.path.exists(path) else 'does not exist'))
    files, others = list_images(path)
    kept = _read_files(files, mode, image_size, others)
    if not kept:
        raise UsageError(f"image folder '{path}' holds no readable PNG/JPEG file")
    return np.stack([image for _, image in kept]), [p for p, _ in kept]


MODE_SAMPLE = 32  # files whose header decides a streamed folder's channels
_skipped_paths = set()  # the files a streamed folder skipped (and warned of) in this process
SKIPS_NAMED = 3  # unreadable files named one line each when a stream meets them; then counted


def _spread(items, n):
    """At most n of `items`, evenly spread over them (the first and last among them)."""
    if len(items) <= n:
        return list(items)
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def _tag(ds, num_images, cache_name, identity):
    """Tells make_pipeline how many images `ds` yields at most (its memory budget), the name of
    its on-disk cache, and what decides the cache's content (checked when it is read)."""
    ds.sigma_vae_num_images, ds.sigma_vae_cache_name = num_images, cache_name
    ds.sigma_vae_cache_identity = dict(identity, name=cache_name)
    return ds


def _stream(paths, labels, mode, size, channels):
    """(images, labels) datasets of the files `paths` decoded in parallel inside tf.data by
    the same PIL reader as read_images. A file that does not decode (or is larger than the
    decompression-bomb limit) is skipped in both, in step, with one warning line naming it the
    first time this process meets it."""
    named = []  # the unreadable files this stream named

    def read(path):
        path = os.fsdecode(path)
        image = _read_image(path, mode, size)
        if isinstance(image, Exception):
            if path not in _skipped_paths:
                _skipped_paths.add(path)
                _met.append(path)
                named.append(path)
                what = 'too large' if isinstance(image, TooLarge) else 'could not be read'
                if len(named) <= SKIPS_NAMED:
                    print(f'warning: skipped image file {path}: {what} ({type(image).__name__}: '
                          f'{image})', file=sys.stderr, flush=True)
                elif len(named) == SKIPS_NAMED + 1:
                    print('warning: more image files could not be read: counted from here on, not '
                          'named (training says how many at the end of each epoch)',
                          file=sys.stderr, flush=True)
            return np.zeros((size, size, channels), np.uint8), False
        return image, True

    def decode(path, label):
        image, ok = tf.numpy_function(read, [path], [tf.uint8, tf.bool])
        return tf.ensure_shape(image, (size, size, channels)), label, tf.ensure_shape(ok, ())

    ds = tf.data.Dataset.from_tensor_slices(
        (np.array([os.fsencode(p) for p in paths], object), np.asarray(labels, np.int64)))
    ds = ds.map(decode, num_parallel_calls=max(2, os.cpu_count() or 1))
    ds = ds.filter(_third)
    return ds.map(_first), ds.map(_second)


_met = []  # the unreadable files the streams of this process met, in order


def skipped_files():
    """The image files a stream of this process could not read, in the order it met them."""
    return list(_met)


def _first(a, b, c):
    return a


def _second(a, b, c):
    return b


def _third(a, b, c):
    return c


def load_folder(folder, image_size, seed=0, check_files=False):
    """PNG/JPEG files under `folder`, streamed at image_size; a seeded 10% is the test split.

    Nothing is decoded up front: the listing, the split (a seeded permutation of the sorted
    regular files) and the fingerprint (the files' number, relative paths and sizes) come from
    the file system alone, and tf.data decodes the files in parallel as the pipeline asks for
    them, so memory and the time to the first step grow only with the listing (paths and
    sizes: about 1 s and 20 MB per 100,000 files here), not with decoding. make_pipeline
    caches the decoded images in memory when they fit in MEMORY_CACHE_BUDGET. The labels
    datasets decode the files too, so as to skip the same ones (only the evaluation reads them).

    The run is grayscale if the headers of MODE_SAMPLE files spread over the sorted list are
    all grayscale (or 16-bit grayscale), RGB otherwise; a file of the other kind met later is
    converted (RGBA's alpha dropped, 16-bit gray scaled to 8 bits). Files of any size up to
    Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89 million pixels) are resized.
    Entries that are not regular files (FIFOs, ...) are skipped here with one warning. A file
    that does not decode, or is larger than the limit, is found only when the pipeline reaches
    it: it is skipped (in the images and their labels alike), with one warning line naming it
    the first time; num_train / num_test count the listed files, so they are then upper
    bounds by the skipped ones.

    check_files=True is the earlier behaviour, for runs made before streaming: every file's
    header decides the channels and every file is decoded once (not kept) before the split,
    so that the unreadable ones are left out of the permutation and the fingerprint as they
    were then.
    """
    if not os.path.isdir(folder):
        raise UsageError(f"image folder '{folder}' " + (
            'is not a folder' if os.path.exists(folder) else 'does not exist'))
    listing = _list(folder)
    files, sizes, others = listing.files, listing.sizes, listing.others
    if check_files:
        modes = [_mode(path) for path in files]
        if listing.unreadable:
            _skip_warning(len(files), unreadable=listing.unreadable)
    else:
        modes = [_mode(path) for path in _spread(files, MODE_SAMPLE)]
        if others or listing.empty or listing.unreadable:
            _skip_warning(len(files) + len(others), (), others, listing.empty, listing.unreadable)
        # Listed (the split and the fingerprint are of the listing), but said once here: the
        # stream skips them without a line each.
        _skipped_paths.update(listing.empty)
    mode = 'L' if all(m in GRAY_MODES for m in modes if m is not None) else 'RGB'
    channels = 1 if mode == 'L' else 3
    if check_files:
        kept = {p for p, _ in _read_files(files, mode, image_size, others, keep=False)}
        sizes = [n for p, n in zip(files, sizes) if p in kept]
        files = [p for p in files if p in kept]
    if len(files) - (0 if check_files else len(listing.empty)) < 2:
        raise UsageError(f"image folder '{folder}' holds {len(files)} PNG/JPEG files"
                         + (f" ({len(listing.empty)} of them of 0 bytes)" if listing.empty else '')
                         + "; it needs at least 2 readable ones (a train and a test image)")
    order = np.random.default_rng(seed).permutation(len(files))
    # Paths relative to the folder: os.walk's paths begin with it (os.path.relpath, as
    # before, gives the same, 20 times slower).
    prefix = len(os.path.join(folder, ''))
    relative = [p[prefix:] for p in files]
    paths = [files[i] for i in order]
    # The first-level subfolder of each file is its class (used only by the evaluation).
    firsts = [relative[i].split(os.sep)[0] for i in order]
    is_class = {c: os.path.isdir(os.path.join(folder, c)) for c in set(firsts)}
    classes = [c if is_class[c] else '' for c in firsts]
    names = sorted(set(classes))
    index = {c: i for i, c in enumerate(names)}
    labels = np.array([index[c] for c in classes], np.int64)
    num_test = max(1, int(round(TEST_FRACTION * len(paths))))
    has_labels = len(names) > 1
    digest, content = hashlib.sha256(), hashlib.sha256()
    mtimes = dict(zip(listing.files, listing.mtimes))
    for path, name, size in zip(files, relative, sizes):
        mtime = mtimes[path]
        # The file name's bytes as the system gives them (a name need not be UTF-8).
        digest.update(os.fsencode(name) + f'\0{size}\0'.encode())
        content.update(os.fsencode(name) + f'\0{size}\0{mtime}\0'.encode())
    fingerprint = f'{len(files)} images, sha256 {digest.hexdigest()[:16]}'
    # What decides the cached pixels: the folder (real path), its files' names, sizes and
    # modification times, the size and mode they are decoded at, and the split (seed).
    identity = {'folder': os.fsencode(os.path.realpath(folder)).hex(), 'files': content.hexdigest(),
                'image_size': image_size, 'mode': mode, 'seed': seed, 'version': CACHE_VERSION}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    cache_name = f'folder_{key}_{image_size}px_{channels}c_seed{seed}'
    train, train_y = _stream(paths[num_test:], labels[num_test:], mode, image_size, channels)
    test, test_y = _stream(paths[:num_test], labels[:num_test], mode, image_size, channels)
    return data.Splits(_tag(train, len(paths) - num_test, cache_name + '_train', identity),
                  _tag(test, num_test, cache_name + '_test', identity),
                  len(paths) - num_test, num_test, channels, f'folder:{folder}',
                  train_y if has_labels else None, test_y if has_labels else None,
                  len(names) if has_labels else 0, fingerprint)

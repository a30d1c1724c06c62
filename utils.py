"""Small helpers: a quiet TensorFlow start, errors for the CLI, image grids, atomic file writes."""
import json
import logging
import os
import sys
import tempfile

import numpy as np
from PIL import Image


VERBOSE = os.environ.get('SIGMA_VAE_VERBOSE', '') not in ('', '0')


def quiet_tensorflow():
    """Imports TensorFlow without its start-up noise, unless SIGMA_VAE_VERBOSE=1.

    Its C++ libraries print banners (oneDNN, CUDA stubs, CPU features) while they load, before
    their log level applies, so standard error is pointed at /dev/null for the import; later
    C++ messages below FATAL are dropped (TF_CPP_MIN_LOG_LEVEL=3: e.g. "failed call to cuInit"
    on a machine without a GPU). Python errors and warnings are untouched. Call it before
    anything imports TensorFlow; afterwards it does nothing.
    """
    if VERBOSE or 'tensorflow' in sys.modules:
        return
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class quiet_logger:
    """Within the block, a Python logger (e.g. 'absl') shows only errors, unless SIGMA_VAE_VERBOSE=1."""

    def __init__(self, name):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        if not VERBOSE:
            self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


class UsageError(Exception):
    """Bad input from the user: the CLI prints its message on one line, exit code 2."""


def image_grid(images, rows, cols):
    """(N, H, W, C) uint8 with N <= rows * cols -> one (rows*H, cols*W, C) image.

    Images fill the grid row by row; missing cells stay black.
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    if n > rows * cols:
        raise ValueError(f'{n} images do not fit a {rows}x{cols} grid')
    grid = np.zeros((rows * h, cols * w, c), images.dtype)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    return grid


def side_by_side(inputs, reconstructions):
    """Interleaves two (N, H, W, C) arrays: input 0, reconstruction 0, input 1, ..."""
    pairs = np.stack([inputs, reconstructions], axis=1)
    return pairs.reshape((-1,) + pairs.shape[2:])


def atomic_write(path, write):
    """Calls write(tmp_path) and renames the file into place, so no reader sees half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(path, image):
    """Writes a (H, W, 1 or 3) uint8 array as a PNG, atomically."""
    image = np.asarray(image)
    if image.shape[-1] == 1:
        image = image[..., 0]
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format='PNG'))


def save_pngs(folder, images):
    """One PNG per image of (N, H, W, C) uint8, named 000000.png, 000001.png, ... in folder."""
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        save_png(os.path.join(folder, f'{i:06d}.png'), image)


def save_npz(path, **arrays):
    """Writes arrays into a compressed .npz file, atomically (readable without pickle)."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)


def write_text(path, text):
    """Writes a text file atomically."""
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def read_jsonl(path):
    """The complete JSON lines of a file ([] if it does not exist); a torn last line is dropped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def append_jsonl(path, row):
    with open(path, 'a') as f:
        f.write(json.dumps(row) + '\n')
        f.flush()
        os.fsync(f.fileno())


def remove_temporary_files(folder):
    """Deletes what atomic_write leaves behind when a process is killed mid-write."""
    for root, _, names in os.walk(folder):
        for name in names:
            if name.startswith('.tmp-'):
                os.remove(os.path.join(root, name))

"""Small helpers: a quiet TensorFlow start, errors and flag parsing for the CLIs, image
grids, file writes that survive kills, JSON-lines reading that survives damage, and the lock
of a run folder."""
import argparse
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import unicodedata
import uuid

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


def progress(iterable=None, show=True, **kwargs):
    """A tqdm progress bar, or none: when `show` is false, or when standard error is not a
    terminal (a log file or a pipe would get every redraw of the bar)."""
    from tqdm import tqdm
    return tqdm(iterable, disable=True if not show else None, **kwargs)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, 'prog: error: message (see prog --help)', exit
    status 2, instead of the usage block and the error. Every CLI of the project uses it."""

    def error(self, message):
        message = ' '.join(str(message).splitlines())
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')

    def parse_known_args(self, args=None, namespace=None):
        # A value that starts with '-' (--data_range -1,1) reads to argparse as an option;
        # for an option whose choices start with '-', the next word is its value.
        args = list(sys.argv[1:] if args is None else args)
        dashed = {flag for action in self._actions if action.choices
                  and any(str(c).startswith('-') for c in action.choices)
                  for flag in action.option_strings}
        for i in range(len(args) - 1):
            if args[i] in dashed:
                args[i:i + 2] = [f'{args[i]}={args[i + 1]}', None]
        return super().parse_known_args([a for a in args if a is not None], namespace)


def check_name(name, flag):
    """Raises UsageError unless `name` is a plain name of a file or folder: not empty, not a
    path ('/', '..'), not starting with '-', without whitespace or control characters."""
    if (not name or name in ('.', '..') or '/' in name or os.sep in name or '..' in name
            or name.startswith('-')
            or any(c.isspace() or unicodedata.category(c).startswith('C') for c in name)):
        raise UsageError(f'{flag} must be a plain name (not a path, not starting with "-", '
                         f'without spaces or control characters), got {name!r}')


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


TEMPORARY_PREFIX = '.tmp-'


def atomic_write(path, write):
    """Calls write(tmp_path) and renames the file into place, so no reader sees half a file.

    The temporary file is created with the permissions the umask gives (as open() would),
    not mkstemp's 0600, so that the file can be read by whom the umask allows.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'{TEMPORARY_PREFIX}{uuid.uuid4().hex[:12]}{os.path.splitext(path)[1]}')
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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


def read_rows(path, key='step'):
    """The rows of a JSON-lines file and its damaged lines, as (rows, damaged).

    A row is a JSON object whose `key` is an integer larger than the previous row's; every
    other line that is not blank (torn, garbage, another JSON value, no key, out of order)
    is damaged and returned as it was, without its newline. ([], []) if there is no file.
    """
    if not os.path.exists(path):
        return [], []
    rows, damaged = [], []
    with open(path, encoding='utf-8', errors='surrogateescape') as f:
        for line in f:
            line = line.rstrip('\n')
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            value = row.get(key) if isinstance(row, dict) else None
            if (isinstance(value, int) and not isinstance(value, bool)
                    and (not rows or value > rows[-1][key])):
                rows.append(row)
            else:
                damaged.append(line)
    return rows, damaged


def read_jsonl(path, key='step'):
    """The good rows of a JSON-lines file (see read_rows); [] if it does not exist."""
    return read_rows(path, key)[0]


def append_jsonl(path, row):
    append_lines(path, [json.dumps(row)])


def append_lines(path, lines):
    """Appends lines to a text file and flushes them to the disk."""
    with open(path, 'a', encoding='utf-8', errors='surrogateescape') as f:
        f.write(''.join(line + '\n' for line in lines))
        f.flush()
        os.fsync(f.fileno())


def remove_temporary_files(folder):
    """Deletes what atomic_write leaves behind when a process is killed mid-write."""
    for root, _, names in os.walk(folder):
        for name in names:
            if name.startswith(TEMPORARY_PREFIX):
                os.remove(os.path.join(root, name))


PRIVATE_TEMPDIR = 'sigma-vae'


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's
    return True


@contextlib.contextmanager
def private_tempdir():
    """Points Python's tempfile at a folder of this process for the block, and deletes it after.

    TensorFlow's autograph writes a source file into $TMPDIR for every function it converts
    (deleted only by an atexit handler, which a SIGKILL skips) and tensorflow-datasets an
    empty tmp...tfds folder each time it looks a data set up (never deleted). The folder is
    named sigma-vae-<host>-<pid>-...; such folders of processes of this host that no longer run
    (killed) are deleted first.
    """
    base, host = tempfile.gettempdir(), socket.gethostname()
    pattern = re.compile(rf'{PRIVATE_TEMPDIR}-{re.escape(host)}-(\d+)-.*')
    for name in os.listdir(base):
        match = pattern.fullmatch(name)
        if match and int(match[1]) != os.getpid() and not _running(int(match[1])):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f'{PRIVATE_TEMPDIR}-{host}-{os.getpid()}-', dir=base)
    previous, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)


class FolderLock:
    """One writer per folder: an exclusive flock on <folder>/lock, which names its holder.

    The operating system releases the lock when its process ends, however it ends (SIGKILL,
    a crash), so a killed run never blocks the next one. A second process that asks for it
    gets a UsageError naming the process that holds it. Use as a context manager.
    """

    def __init__(self, folder, program):
        self.path = os.path.join(folder, 'lock')
        self.program = program
        self.fd = None

    def check(self):
        """Raises the UsageError of __enter__ if another process holds the lock now, without
        creating anything: a cheap test before the work that precedes taking the lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            self._lock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(fd)

    def _lock(self, fd, operation):
        """flock; False if the file system cannot lock (warned), UsageError if it is held."""
        try:
            fcntl.flock(fd, operation)
            return True
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                print(f'warning: cannot lock {self.path} ({e.strerror}): make sure that no other '
                      f'process writes into {os.path.dirname(self.path)}', file=sys.stderr)
                return False
            holder = os.pread(fd, 1000, 0).decode('utf-8', 'replace').strip() or 'another process'
            raise UsageError(f'{os.path.dirname(self.path)} is in use by {holder}: one process '
                             f'at a time writes into a run folder; wait for it to end or stop '
                             f'it') from None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            locked = self._lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except UsageError:
            os.close(fd)
            raise
        if not locked:
            os.close(fd)
            return self
        started = datetime.datetime.now().isoformat(sep=' ', timespec='seconds')
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'process {os.getpid()} on {socket.gethostname()} ({self.program}, '
                      f'since {started})\n'.encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the file stays (deleting it would race)
            self.fd = None

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
import signal
import socket
import sys
import tempfile
import threading
import time
import unicodedata
import uuid

import numpy as np
from PIL import Image


VERBOSE = os.environ.get('SIGMA_VAE_VERBOSE', '') not in ('', '0')


_STDERR = 2  # standard error's file descriptor, or its copy while quiet_tensorflow silences it


def start(name):
    """The first call of every command, `utils.start(__name__)`: TensorFlow is imported quietly
    (quiet_tensorflow), and when the module runs as the command (name == '__main__'), Ctrl-C
    ends it with one line and status 130 instead of a traceback, wherever nothing handles it
    itself (training does: Interrupts). Importing TensorFlow alone takes seconds."""
    if name == '__main__':
        signal.signal(signal.SIGINT, _interrupted)
    quiet_tensorflow()


def _interrupted(signum, frame):
    os.write(_STDERR, f'{os.path.basename(sys.argv[0])}: interrupted\n'.encode())
    raise SystemExit(128 + signum)


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
    global _STDERR
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    _STDERR = saved
    try:
        import tensorflow  # noqa: F401  (its import is the point)
    finally:
        _STDERR = 2
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


# ---- the checkpoints of a run folder, and interrupts held off while they are written ----

STATE_FILE = 'checkpoint'  # TensorFlow's checkpoint state file: the latest and the kept ones
DAMAGED = 'damaged'  # subfolder of checkpoints/ where checkpoints that do not restore are set aside
_STATE_LINE = re.compile(r'(model_checkpoint_path|all_model_checkpoint_paths|'
                         r'all_model_checkpoint_timestamps|last_preserved_timestamp): (".*"|[-+.\deE]+)')
_CHECKPOINT_FILE = re.compile(r'ckpt-(\d+)\.(index|data-\d{5}-of-\d{5})')


def _is_tf_temporary(name):
    """What TensorFlow's savers write before renaming: ckpt-N_temp/ (the shards),
    checkpoint.tmp<hex> (the state file) and *.tempstate<n> (bundle files)."""
    return (re.fullmatch(r'ckpt-\d+_temp', name) is not None or name.startswith(STATE_FILE + '.tmp')
            or '.tempstate' in name)


def error_reason(error):
    """The first line of an exception's message, without TensorFlow's node prefix."""
    text = re.sub(r'\{\{[^}]*\}\}\s*', '', str(error)).strip()
    text = text.splitlines()[0] if text else ''
    return f'{type(error).__name__}: {text[:200]}' if text else type(error).__name__


class CheckpointFolder:
    """The checkpoints of a run as files, read without trusting TensorFlow's state file.

    A checkpoint ckpt-N is its files ckpt-N.index and ckpt-N.data-*. The candidates to resume
    from are those that the state file names and those that have an index (the state file
    may be damaged, or behind after a kill between a save and its update). Data files without
    an index that the state file does not name are the remains of an interrupted save.
    """

    def __init__(self, directory):
        self.directory = directory
        self.files, self.temporaries = {}, []
        names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        for name in names:
            match = _CHECKPOINT_FILE.fullmatch(name)
            if match:
                self.files.setdefault(int(match[1]), []).append(name)
            elif _is_tf_temporary(name):
                self.temporaries.append(name)
        self.state_exists = STATE_FILE in names
        self.recorded = self._read_state() if self.state_exists else []  # None: damaged
        self.complete = sorted(n for n, files in self.files.items() if f'ckpt-{n}.index' in files)
        recorded = self.recorded or []
        self.interrupted = ([n for n in self.files if n not in self.complete and n not in recorded]
                            if self.recorded is not None else [])
        self.candidates = sorted(set(recorded) | (set(self.files) - set(self.interrupted)),
                                 reverse=True)

    def _read_state(self):
        """The checkpoint numbers that the state file names, or None if it is damaged."""
        try:
            with open(os.path.join(self.directory, STATE_FILE), encoding='utf-8') as f:
                lines = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError):
            return None
        numbers = []
        for line in lines:
            match = _STATE_LINE.fullmatch(line)
            if not match:
                return None
            if match[2].startswith('"'):
                name = re.fullmatch(r'"(?:.*/)?ckpt-(\d+)"', match[2])
                if not name:
                    return None
                numbers.append(int(name[1]))
        return sorted(set(numbers)) or None

    def any(self):
        """Whether the folder holds a checkpoint or its state file."""
        return bool(self.files) or self.state_exists

    def path(self, number):
        return os.path.join(self.directory, f'ckpt-{number}')

    def find(self, restore):
        """(path, skipped): the newest candidate that restore(path) restores without raising,
        or None, and the (path, reason) of the newer ones that did not."""
        skipped = []
        for number in self.candidates:
            path = self.path(number)
            if f'ckpt-{number}.index' not in self.files.get(number, []):
                reason = ('its files are missing' if number not in self.files
                          else f'ckpt-{number}.index is missing')
            else:
                try:
                    restore(path)
                    return path, skipped
                except Exception as e:  # NotFound, DataLoss, OutOfRange, a mismatch, ...
                    reason = error_reason(e)
            skipped.append((path, reason))
        return None, skipped

    def remove_temporaries(self):
        """Deletes TensorFlow's temporaries and the files of interrupted saves."""
        for name in self.temporaries:
            path = os.path.join(self.directory, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        for number in self.interrupted:
            for name in self.files.pop(number):
                os.remove(os.path.join(self.directory, name))
        self.temporaries, self.interrupted = [], []

    def set_aside(self, numbers):
        """Moves the files of these checkpoints into checkpoints/damaged/; returns that folder."""
        damaged = os.path.join(self.directory, DAMAGED)
        os.makedirs(damaged, exist_ok=True)
        for number in numbers:
            for name in self.files.pop(number, []):
                target, i = os.path.join(damaged, name), 1
                while os.path.exists(target):
                    target, i = os.path.join(damaged, f'{name}.{i}'), i + 1
                os.replace(os.path.join(self.directory, name), target)
            if number in self.complete:
                self.complete.remove(number)
        return damaged

    def write_state(self, number):
        """Makes the state file name ckpt-<number> as the latest and the complete checkpoints
        before it as kept (so that the CheckpointManager rotates them out); removes the state
        file when number is None."""
        path = os.path.join(self.directory, STATE_FILE)
        if number is None:
            if os.path.exists(path):
                os.remove(path)
            return
        kept = [n for n in self.complete if n <= number]
        if self.recorded == kept and kept and kept[-1] == number:
            return
        # The manager rotates out only checkpoints younger than last_preserved_timestamp.
        now = time.time()
        times = [min(os.path.getmtime(self.path(n) + '.index'), now) for n in kept]
        write_text(path, f'model_checkpoint_path: "ckpt-{number}"\n' + ''.join(
            f'all_model_checkpoint_paths: "ckpt-{n}"\n' for n in kept) + ''.join(
            f'all_model_checkpoint_timestamps: {t!r}\n' for t in times)
            + f'last_preserved_timestamp: {min(times) - 1.0!r}\n')
        self.recorded = kept


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM; `status` is the exit status, 128 + the signal: 130, 143.

    A BaseException, as KeyboardInterrupt, so that no `except Exception` (Keras wraps the
    exceptions of layer calls) swallows or rewrites it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum, self.status = signum, 128 + signum

    def __str__(self):
        return signal.Signals(self.signum).name


class Interrupts:
    """While active (a context manager), SIGINT and SIGTERM raise Interrupted in the main thread,
    except inside `held()` blocks (a checkpoint being written), where the signal is only noted
    and raised when the block ends. Once Interrupted has been raised, further signals are
    ignored, so that the interrupt's own checkpoint is written whole."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None  # the first signal received
        self.holding = 0
        self.raised = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        if self.previous:
            for s, handler in self.previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if not self.holding and not self.raised:
            self._raise()

    def _raise(self):
        self.raised = True
        raise Interrupted(self.signum)

    @contextlib.contextmanager
    def held(self):
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if not self.holding and self.signum is not None and not self.raised:
            self._raise()

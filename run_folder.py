"""What a run folder holds, and the reading and writing of its files.

    output/<experiment_name>/
      config.json      the run's Config (config.py); a resume with another model, data or seed is refused
      checkpoints/     ckpt-<step>: the KEEP_CHECKPOINTS newest; damaged/: those that did not restore (checkpoints.py)
      metrics.jsonl    one row of metrics per epoch (and at the last step)
      images/          grids of prior samples and reconstructions, named by step
      logs/            TensorBoard summaries
      lock             held by the one process that writes (train.py, evaluate.py --export)
      prior_gmm.npz    the ex-post mixture prior, fitted by evaluate.py or generate.py (priors.py)
      evaluation.json  evaluate.py's numbers

Imports no TensorFlow: the commands check a run folder before they import it.
"""
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import sys

import config as settings
import files
from utils import UsageError

CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
IMAGES = 'images'
LOGS = 'logs'
LOCK = 'lock'
PRIOR_FILE = 'prior_gmm.npz'
EVALUATION_FILE = 'evaluation.json'
# What a run folder of this tool holds (evaluate.py --export adds samples*.npz and samples*_png/).
RUN_ENTRIES = (CONFIG_FILE, CHECKPOINTS, METRICS_FILE, METRICS_FILE + '.damaged', IMAGES, LOGS,
               LOCK, PRIOR_FILE, EVALUATION_FILE, 'samples.npz', 'samples_png', 'samples_gmm.npz',
               'samples_gmm_png', files.MARKER)
NUM_SAMPLES = 100  # the prior samples of a training grid (10x10): the first of the run's fixed z
EVALUATED = 'evaluated_samples'  # images/<this><prior suffix>_<step>.png: evaluate.py's grids


# ---- config.json -------------------------------------------------------------------

def read_config_file(path):
    """A run's config.json as a checked Config (config.config_from_dict); UsageError naming the
    file otherwise."""
    try:
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f'{path} cannot be read ({e}): repair it or delete the run folder') from None
    return settings.config_from_dict(saved, path)


def write_config(config):
    files.write_text(os.path.join(config.run_dir, CONFIG_FILE),
                     json.dumps(dataclasses.asdict(config), indent=2) + '\n')


def read_config(run_dir):
    """The Config of a run folder, from its config.json; output_dir and experiment_name are
    where the folder is now."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UsageError(f'{run_dir} is not a run folder (no {CONFIG_FILE})')
    config = read_config_file(path)
    config.output_dir, config.experiment_name = os.path.split(os.path.normpath(run_dir))
    return config


def saved_config(run_dir):
    """The Config that run_dir's config.json records, or None if it has none or it is damaged
    (the resume check says so)."""
    try:
        return read_config_file(os.path.join(run_dir, CONFIG_FILE))
    except UsageError:
        return None


def check_run_folder(run_dir):
    """UsageError unless train.py may write into run_dir: a folder that does not exist yet, an
    empty one, or one of this tool's run folders (its marker; or, written before the marker, a
    config.json of train.py, or nothing but what a run folder holds). Nothing the run writes may
    be a symbolic link there: the tool does not write through links. Reads only."""
    if not os.path.lexists(run_dir):
        return
    if not os.path.isdir(run_dir):
        raise UsageError(f'{run_dir} is a file, not a run folder: give another --experiment_name')
    names = os.listdir(run_dir)
    config = os.path.join(run_dir, CONFIG_FILE)
    if not files.is_marked(run_dir) and names:
        why = None
        if os.path.lexists(config):
            try:
                read_config_file(config)
            except UsageError as e:
                why = f'its {CONFIG_FILE} is not one of train.py ({e})'
        elif not set(names) <= set(RUN_ENTRIES):
            why = f'it holds {sorted(set(names) - set(RUN_ENTRIES))[0]!r}, which no run writes'
        if why:
            raise UsageError(f'{run_dir} exists and is not a run folder of this tool: {why}; give '
                             f'another --experiment_name or --output_dir (the tool writes only into '
                             f'folders it made)')
    for name in RUN_ENTRIES:
        files.refuse_link(os.path.join(run_dir, name), 'the run folder entry')


def check_writable(run_dir, program, folders=('', IMAGES)):
    """UsageError unless the process can write into the run folder (and its `folders` that
    exist): a read-only folder or file system is said before the minutes of work whose results
    (evaluation.json, prior_gmm.npz, images/) it could not keep. A full disk still fails later,
    on the write, in one line."""
    for name in folders:
        folder = os.path.join(run_dir, name) if name else run_dir
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f'cannot write into {folder} (read-only): {program} writes its '
                             f'results into the run folder; make it writable, or copy the run '
                             f'elsewhere')


# ---- the lock: one writer at a time ----------------------------------------------

class FolderLock:
    """One writer per folder: an exclusive flock on <folder>/lock, which names its holder.

    The operating system releases the lock when its process ends, however it ends (SIGKILL,
    a crash), so a killed run never blocks the next one. A second process that asks for it
    gets a UsageError naming the process that holds it. Use as a context manager.
    """

    def __init__(self, folder, program):
        self.path = os.path.join(folder, LOCK)
        self.program = program
        self.fd = None

    def check(self):
        """Raises the UsageError of __enter__ if another process holds the lock now, without
        creating anything: a cheap test before the work that precedes taking the lock."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
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
        files.refuse_link(self.path, 'the lock')  # O_NOFOLLOW's error would say less
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
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


# ---- metrics rows: metrics.jsonl -------------------------------------------------

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


def read_metrics(run_dir):
    """The good rows of a run's metrics.jsonl (see read_rows); [] if it has none."""
    return read_rows(os.path.join(run_dir, METRICS_FILE))[0]


def append_row(run_dir, row):
    """Appends a row to metrics.jsonl and flushes it to the disk."""
    files.append_lines(os.path.join(run_dir, METRICS_FILE), [json.dumps(row)])


def resume_rows(run_dir, step, chief=True):
    """The rows of metrics.jsonl up to the restored `step`; the chief sets damaged lines aside
    in metrics.jsonl.damaged (saying so) and drops rows written after the checkpoint (they
    would be written again)."""
    path = os.path.join(run_dir, METRICS_FILE)
    rows, damaged = read_rows(path)
    kept = [r for r in rows if r['step'] <= step]
    if chief and damaged:
        files.append_lines(path + '.damaged', damaged)
        print(f'{path}: {len(damaged)} damaged line(s) set aside in {path}.damaged',
              file=sys.stderr)
    if chief and (damaged or len(kept) < len(rows)):
        files.write_text(path, ''.join(json.dumps(r) + '\n' for r in kept))
    return kept



"""What a run folder holds, and everything that reads or writes it.

    output/<experiment_name>/
      config.json      the run's Config; a resume with another model, data or seed is refused
      checkpoints/     ckpt-<step>: the KEEP_CHECKPOINTS newest; damaged/: those that did not restore
      metrics.jsonl    one row of metrics per epoch (and at the last step)
      images/          grids of prior samples and reconstructions, named by step
      logs/            TensorBoard summaries
      lock             held by the one process that writes (train.py, evaluate.py --export)
      prior_gmm.npz    the ex-post mixture prior, fitted by evaluate.py or generate.py
      evaluation.json  evaluate.py's numbers

The commands (train, evaluate, generate, compare) read and write a run only through this module.
"""
import argparse
import dataclasses
import datetime
import errno
import fcntl
import gc
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import types
import typing
import zipfile
from typing import Optional

import numpy as np
import tensorflow as tf

import data
import losses
import models
import utils
from utils import UsageError

CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
IMAGES = 'images'
LOGS = 'logs'
LOCK = 'lock'
PRIOR_FILE = 'prior_gmm.npz'
EVALUATION_FILE = 'evaluation.json'

KEEP_CHECKPOINTS = 3  # the newest checkpoints kept; older ones are deleted as new ones are saved
NUM_SAMPLES = 100  # the prior samples of a training grid (10x10): the first of the run's fixed z
BN_BATCHES = 200  # training batches over which load_model recomputes batch norm's statistics
MAX_SEED = 2 ** 31 - 1
PRECISIONS = ('float16', 'bfloat16')
STRATEGIES = ('default', 'mirrored', 'multi_worker')


# ---- the settings: Config, written as config.json ------------------------------

@dataclasses.dataclass
class Config:
    """Every setting of a run; the defaults are the original code's."""
    model: str = 'sigma'
    experiment_name: Optional[str] = None  # defaults to the model's name
    output_dir: str = 'output'
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    z_dim: int = 20
    dataset: str = 'svhn_cropped'
    data_dir: Optional[str] = None
    image_size: int = 28
    data_range: str = '-1,1'  # '-1,1' with tanh (the original), '0,1' with sigmoid (PyTorch sibling)
    seed: int = 0
    sample_every: int = 1000
    max_steps: Optional[int] = None
    checkpoint_every: Optional[int] = None  # steps; None: at each epoch's end only
    beta: float = 1.0
    log_sigma_min: Optional[float] = -6.0
    xla: bool = False
    strategy: str = 'default'  # one device; mirrored: local GPUs; multi_worker: TF_CONFIG
    mixed_precision: Optional[str] = None  # None (float32), 'float16' or 'bfloat16'
    restart: bool = False  # start over from step 0 when no checkpoint of the run restores
    arch: str = 'original'  # the networks, models.NETWORKS
    width: Optional[int] = None  # the network's base channels; None: its default
    depth: Optional[int] = None  # residual blocks per level; None: the network's default
    kl_warmup: Optional[int] = None  # steps over which the KL weight ramps from 0 to beta
    free_bits: Optional[float] = None  # nats: the KL of each latent group counts as >= this
    skip_threshold: Optional[float] = None  # skip an update whose gradient norm is above
    channels: Optional[int] = None  # not a flag: the data's, written into config.json
    data_fingerprint: Optional[str] = None  # not a flag: an image folder's (data.Splits)

    @property
    def run_dir(self):
        return os.path.join(self.output_dir, self.experiment_name)

    def check(self):
        """Raises UsageError for a setting that cannot work; fills in experiment_name."""
        self.check_values()
        if not self.dataset.strip():
            raise UsageError('--dataset must name a data set or a folder, got an empty string')
        if not self.output_dir.strip():
            raise UsageError('--output_dir must name a folder, got an empty string')
        if self.experiment_name is None:
            self.experiment_name = self.model
        utils.check_name(self.experiment_name, '--experiment_name')
        self.check_outside_data()

    def check_values(self, name=lambda key: f'--{key}'):
        """Raises UsageError for a value that no model can be built or trained with, named by
        name(key): the flag for train.py, the key of config.json for read_config (a value
        edited there would otherwise end in a traceback deep in Keras or in an out-of-memory
        kill)."""
        numbers = {'epochs': int, 'batch_size': int, 'z_dim': int, 'sample_every': int,
                   'max_steps': int, 'checkpoint_every': int, 'lr': float, 'channels': int,
                   'width': int, 'depth': int, 'kl_warmup': int, 'free_bits': float,
                   'skip_threshold': float}
        for key, cast in numbers.items():
            value = getattr(self, key)
            if value is not None:
                try:
                    utils.positive(cast)(value)
                except argparse.ArgumentTypeError as e:
                    raise UsageError(f'{name(key)} {e}') from None
        if not self.beta >= 0 or not math.isfinite(self.beta):
            raise UsageError(f'{name("beta")} must be a non-negative number, got {self.beta}')
        if self.log_sigma_min is not None and not math.isfinite(self.log_sigma_min):
            raise UsageError(f"{name('log_sigma_min')} must be a finite number or 'none', got "
                             f"{self.log_sigma_min}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UsageError(f'{name("seed")} must be between 0 and {MAX_SEED}, got {self.seed}')
        if self.arch in models.NETWORKS and self.depth is not None and \
                models.NETWORKS[self.arch].depth is None:
            raise UsageError(f'--arch {self.arch} has no {name("depth")} (its levels are fixed)')
        choices = {'model': list(losses.DECODERS), 'arch': list(models.NETWORKS),
                   'image_size': sorted(models.ARCHITECTURES),
                   'data_range': list(data.DATA_RANGES), 'strategy': list(STRATEGIES),
                   'mixed_precision': [None, *PRECISIONS]}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                listed = ', '.join('none' if c is None else str(c) for c in allowed)
                raise UsageError(f'{name(key)} must be one of {listed}, got {getattr(self, key)!r}')

    def check_outside_data(self):
        """Raises UsageError if the run folder is inside the image folder of --dataset (real
        paths: a symbolic link is followed): the images and checkpoints it writes would change
        the data set, whose fingerprint then refuses every resume of the run."""
        if not os.path.isdir(self.dataset):  # a tfds name, or a folder data.load will not find
            return
        images, run = os.path.realpath(self.dataset), os.path.realpath(self.run_dir)
        if os.path.commonpath([images, run]) == images:
            raise UsageError(f'--output_dir {self.output_dir}: the run folder {run} would be inside '
                             f'the image folder of --dataset ({images}), and what the run writes '
                             f'would change its data; put the run folder elsewhere')


# Changing one of these changes the model, its test split (seed) or what a step and an epoch
# are (batch_size): a run that differs in them is refused on resume.
MODEL_KEYS = ('model', 'arch', 'width', 'depth', 'z_dim', 'dataset', 'image_size', 'data_range',
              'mixed_precision', 'channels', 'seed', 'batch_size', 'data_fingerprint')
# Resuming with another value of these is allowed, and said (the objective changes from then on).
OBJECTIVE_KEYS = ('beta', 'lr', 'log_sigma_min', 'kl_warmup', 'free_bits', 'skip_threshold')
# A config.json without one of these was not written by train.py.
REQUIRED_KEYS = ('model', 'z_dim', 'dataset', 'image_size', 'data_range', 'seed', 'batch_size')


def _has_type(value, annotation):
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return isinstance(value, tuple(t for t in allowed if t is not type(None)))


def read_config_file(path):
    """A run's config.json as a dict, checked: a JSON object whose keys are Config's, each with
    its field's type, and holding the keys that say which model it is. UsageError naming the
    file (and the key) otherwise."""
    fix = 'repair it or delete the run folder'
    try:
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f'{path} cannot be read ({e}): {fix}') from None
    if not isinstance(saved, dict):
        raise UsageError(f'{path} does not hold a JSON object of settings: {fix}')
    if 'channels' not in saved and all(k in saved for k in REQUIRED_KEYS):
        raise UsageError(f'{path} was written by a version of train.py before the decoder registry '
                         f'(commit b09f93c or older); this version does not read its runs: train it '
                         f'again in a new folder, or use that version')
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    for key, value in saved.items():
        if key not in fields:
            raise UsageError(f'{path} holds an unknown key {key!r}: it was not written by this '
                             f'train.py; {fix}')
        if not _has_type(value, fields[key]):
            expected = ' or '.join(getattr(t, '__name__', str(t)).replace('NoneType', 'null')
                                   for t in typing.get_args(fields[key]) or (fields[key],))
            raise UsageError(f'{path}: key {key!r} holds {json.dumps(value)} '
                             f'({type(value).__name__}), not a value of type {expected}; {fix}')
    missing = [k for k in REQUIRED_KEYS if k not in saved]
    if missing:
        raise UsageError(f'{path} was not written by train.py (it has no key {missing[0]!r}); '
                         f'{fix}')
    return saved


def write_config(config):
    utils.write_text(os.path.join(config.run_dir, CONFIG_FILE),
                     json.dumps(dataclasses.asdict(config), indent=2) + '\n')


def read_config(run_dir):
    """The Config of a run folder, from its config.json; output_dir and experiment_name
    are where the folder is now."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UsageError(f'{run_dir} is not a run folder (no {CONFIG_FILE})')
    config = Config(**read_config_file(path))
    config.output_dir, config.experiment_name = os.path.split(os.path.normpath(run_dir))
    try:
        config.check_values(lambda key: f'key {key!r}')
        check_model_memory(config)
    except UsageError as e:
        raise UsageError(f'{path}: {e}; repair it or delete the run folder') from None
    return config


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


def physical_memory():
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return None


def check_model_memory(config):
    """UsageError if the weights next to z alone (float32, one copy) exceed this machine's
    memory: no checkpoint of such a z_dim can be loaded here (train.py refuses to make one)."""
    needed = 4 * models.latent_weights(config.image_size, config.z_dim, config.arch, config.width,
                                       config.depth)
    memory = physical_memory()
    if memory and needed > memory:
        raise UsageError(f"key 'z_dim' {config.z_dim} is too large: its weights alone would need "
                         f'about {needed / 2 ** 30:,.0f} GiB, more than the '
                         f'{memory / 2 ** 30:,.0f} GiB of memory here')


def check_resume(config):
    """Refuses (UsageError) to resume a run folder's checkpoints with another value of a
    MODEL_KEY, or when its config.json is damaged. Reads only. Returns the changes of an
    OBJECTIVE_KEY ('--beta 1.0 -> 0.5'), which a resume accepts (and config.json records)."""
    path = os.path.join(config.run_dir, CONFIG_FILE)
    folder = checkpoint_dir(config.run_dir)
    if not CheckpointFolder(folder).any():
        rows = read_metrics(config.run_dir)
        if rows and not config.restart:
            raise UsageError(
                f"{config.run_dir} holds metrics rows up to step {rows[-1]['step']} but no checkpoint "
                f"in {folder}: put the checkpoints back, or start over with --restart (the rows "
                f"are dropped)")
        return []
    if not os.path.exists(path):
        raise UsageError(f'{config.run_dir} holds checkpoints but no {CONFIG_FILE}, which says what '
                         f'they are a model of: put it back, or delete the run folder')
    saved = read_config_file(path)
    # A config.json written before --arch holds none of arch, width, depth: the original's.
    before_config = Config(**{k: saved.get(k, getattr(Config(), k)) for k in MODEL_KEYS})
    for key in MODEL_KEYS:
        before, now = _model_value(before_config, key), _model_value(config, key)
        if key == 'data_fingerprint' and before != now:
            raise UsageError(data_changed(config.run_dir, config.dataset, before, now))
        if before != now:
            raise UsageError(
                f"{config.run_dir} holds a run with --{key} {before}, not {now}: resume it "
                f"with the same value, or start fresh with another --experiment_name (or "
                f"delete the folder)")
    return [f'--{key} {saved[key]} -> {getattr(config, key)}' for key in OBJECTIVE_KEYS
            if key in saved and saved[key] != getattr(config, key)]


def _model_value(config, key):
    """config's value of a MODEL_KEY, with width and depth resolved (None: the network's
    default), so that --width 64 resumes a run of --arch original without --width."""
    if key in ('width', 'depth') and config.arch in models.NETWORKS:
        width, depth = models.NETWORKS[config.arch].resolve(config.width, config.depth)
        return width if key == 'width' else depth
    return getattr(config, key)


def data_changed(run_dir, dataset, before, now):
    """The error of an image folder that no longer holds the images a run started with."""
    return (f'{dataset} holds other images than when {run_dir} started (then: {before}; now: '
            f'{now}): its test split would change; use the folder as it was, or start a new run '
            f'(another --experiment_name)')


# ---- the model of a run, and its fixed prior z -----------------------------------

def make_vae(config, sync_batch_norm=False):
    """The VAE of a config, with its likelihood from losses.DECODERS (under the current
    distribution strategy's scope, if any)."""
    likelihood = losses.DECODERS[config.model](data.DATA_RANGES[config.data_range],
                                               config.log_sigma_min)
    return models.VAE(config.image_size, config.channels, config.z_dim, likelihood,
                      config.data_range, sync_batch_norm, config.arch, config.width, config.depth)


def latent_groups(config):
    """The sizes of a run's latent groups, top first (the VAE's `groups`, without building it):
    [z_dim] but for models.Hierarchical; z has their sum."""
    return models.NETWORKS[config.arch].groups(config.image_size, config.z_dim, config.width,
                                               config.depth)


def prior_z(n, z_dim, seed):
    """The fixed z ~ N(0, I) of a run, (n, z_dim) float32, drawn from (seed, 2): the same
    whatever n, in its first rows. With the run's seed, training's grids show its first
    NUM_SAMPLES, evaluate.py's FID samples its first N, generate.py sample --seed its first n."""
    return tf.random.stateless_normal((n, z_dim), seed=[seed, 2]).numpy()



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


# ---- checkpoints -----------------------------------------------------------------

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
                    reason = utils.error_reason(e)
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
        utils.write_text(path, f'model_checkpoint_path: "ckpt-{number}"\n' + ''.join(
            f'all_model_checkpoint_paths: "ckpt-{n}"\n' for n in kept) + ''.join(
            f'all_model_checkpoint_timestamps: {t!r}\n' for t in times)
            + f'last_preserved_timestamp: {min(times) - 1.0!r}\n')
        self.recorded = kept




# Checkpoints before metrics by name held the training sums as one vector in this order.
LEGACY_METRICS = ('loss', 'rec', 'kl', 'neg_elbo', 'bits_per_dim', 'log_sigma')
LEGACY_SUMS = ('train_sums/.ATTRIBUTES/VARIABLE_VALUE', 'train_count/.ATTRIBUTES/VARIABLE_VALUE')


class Checkpoints:
    """The checkpoints of a run: restore the newest that restores, save only finite weights,
    keep the KEEP_CHECKPOINTS newest.

    state: the trackables that must all restore (the model, the optimizer, counters);
    sums: {name: float64 variable (2,)}: the sum and count of each training metric since the
    last metrics row, restored by name: a name the checkpoint lacks starts at 0, so that adding a metric does not
    make older checkpoints fail to restore.
    counters: {name: variable}, restored by name in the same way (e.g. skipped_updates).
    chief: whether this process writes the run folder (under multi_worker every worker saves,
    since saving is collective, and all but the chief into a folder deleted after each save).
    """

    def __init__(self, run_dir, state, sums=None, chief=True, worker=0, counters=None):
        self.run_dir, self.directory, self.chief = run_dir, checkpoint_dir(run_dir), chief
        self.state, self.sums, self.counters = state, sums or {}, counters or {}
        self.saved = tf.train.Checkpoint(**state, train_sums=self.sums, counters=self.counters)
        self.save_dir = self.directory if chief else os.path.join(run_dir, f'.tmp-worker-{worker}')
        self.manager = None  # made by restore() or the first save()
        self.saved_step = None  # the step of the checkpoint written or restored last

    def _manager(self):
        if self.manager is None:
            self.manager = tf.train.CheckpointManager(self.saved, self.save_dir,
                                                      max_to_keep=KEEP_CHECKPOINTS)
        return self.manager

    def _restore_from(self, path):
        tf.train.Checkpoint(**self.state).read(path).expect_partial().assert_existing_objects_matched()
        reader = tf.train.load_checkpoint(path)
        stored = reader.get_variable_to_shape_map()
        legacy = {}
        if LEGACY_SUMS[0] in stored:  # written before metrics by name: one vector, one count
            count = reader.get_tensor(LEGACY_SUMS[1])
            legacy = {k: [v, count] for k, v in zip(LEGACY_METRICS, reader.get_tensor(LEGACY_SUMS[0]))}
        for name, variable in self.sums.items():
            key = f'train_sums/{name}/.ATTRIBUTES/VARIABLE_VALUE'
            value = reader.get_tensor(key) if key in stored else legacy.get(name, [0, 0])
            variable.assign(tf.cast(value, variable.dtype))
        for name, variable in self.counters.items():
            key = f'counters/{name}/.ATTRIBUTES/VARIABLE_VALUE'
            variable.assign(tf.cast(reader.get_tensor(key) if key in stored else 0, variable.dtype))

    def restore(self, restart=False, write=True):
        """Restores the newest checkpoint that restores completely; returns its path, or None
        when the run folder holds no checkpoint.

        Newer ones that do not restore are skipped and said so on stderr; with `write` (the
        chief of a training run) they are moved into checkpoints/damaged/, so that they are
        neither retried nor overwritten, TensorFlow's temporaries and the remains of
        interrupted saves are deleted, and the state file is rewritten. When none restores,
        raises UsageError naming them, unless `restart`: then the run starts over from step 0.
        """
        folder = CheckpointFolder(self.directory)
        # A checkpoint of another model (a config.json edited to another z_dim or model) fails
        # to restore, which is said in one line; TensorFlow would add a warning per variable
        # as the failed restore's objects are deleted (gc.collect: here, not later).
        with utils.quiet_logger('tensorflow'):
            path, skipped = folder.find(self._restore_from)
            gc.collect()
        if skipped and not path and not restart:
            # The model keeps the failed restores' pending values, and deleting it as the
            # command ends with this error would log them all: quiet from here on.
            utils.quiet_logger('tensorflow').__enter__()
            advice = (f'start over with --restart (damaged files are kept in '
                      f'{os.path.join(self.directory, DAMAGED)}/), or delete the run folder'
                      if write else 'fix or restore the files')
            raise UsageError(no_checkpoint_restores(self.directory, skipped, advice))
        write = write and self.chief
        for skipped_path, reason in skipped:
            number = int(skipped_path.rsplit('-', 1)[1])
            moved = write and number in folder.files
            damaged = folder.set_aside([number]) if write else None
            print(f'skipped checkpoint {skipped_path}: it does not restore ({reason})'
                  + (f'; its files are now in {damaged}/' if moved else ''), file=sys.stderr)
        if write:
            folder.remove_temporaries()
            folder.write_state(int(path.rsplit('-', 1)[1]) if path else None)
            if skipped and not path:
                print('no checkpoint restores: starting over from step 0 (--restart)',
                      file=sys.stderr)
            for name in os.listdir(self.run_dir):
                if name.startswith('.tmp-worker-'):  # a killed worker's save folder
                    shutil.rmtree(os.path.join(self.run_dir, name), ignore_errors=True)
            self._manager()
        if path:
            self.saved_step = int(path.rsplit('-', 1)[1])
        return path

    def save(self, step, weights):
        """Checkpoints the run as ckpt-<step>; raises Diverged, saving nothing, if one of
        `weights` is not finite, and RunFailed if the checkpoint cannot be written (a full
        disk): then the previous checkpoints are intact and the failed save's temporaries
        deleted."""
        if not all(bool(tf.reduce_all(tf.math.is_finite(w))) for w in weights):
            raise Diverged(f'training diverged at step {step}: weights not finite; '
                           + self.last_good())
        try:
            path = self._manager().save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            if self.chief:
                CheckpointFolder(self.directory).remove_temporaries()
            raise utils.RunFailed(f'cannot write the checkpoint of step {step} '
                                  f'({utils.error_reason(e)}); ' + self.last_checkpoint()) from None
        self.saved_step = step
        if not self.chief:
            tf.io.gfile.rmtree(self.manager.directory)
            return self.latest()
        return path

    def latest(self):
        return tf.train.latest_checkpoint(self.directory)

    def last_checkpoint(self):
        path = self.latest()
        return f'{path} holds the last good weights' if path else 'no checkpoint was written'

    def last_good(self):
        return self.last_checkpoint() + ' (try a lower --lr)'


class Diverged(utils.RunFailed):
    """The loss or the weights went non-finite (exit status 1)."""


def checkpoint_dir(run_dir):
    return os.path.join(run_dir, CHECKPOINTS)


def no_checkpoint_restores(directory, skipped, advice):
    listed = '; '.join(f'{os.path.basename(p)} ({r})' for p, r in skipped)
    return f'no checkpoint in {directory} restores: {listed}; {advice}'


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
    utils.append_lines(os.path.join(run_dir, METRICS_FILE), [json.dumps(row)])


def resume_rows(run_dir, step, chief=True):
    """The rows of metrics.jsonl up to the restored `step`; the chief sets damaged lines aside
    in metrics.jsonl.damaged (saying so) and drops rows written after the checkpoint (they
    would be written again)."""
    path = os.path.join(run_dir, METRICS_FILE)
    rows, damaged = read_rows(path)
    kept = [r for r in rows if r['step'] <= step]
    if chief and damaged:
        utils.append_lines(path + '.damaged', damaged)
        print(f'{path}: {len(damaged)} damaged line(s) set aside in {path}.damaged',
              file=sys.stderr)
    if chief and (damaged or len(kept) < len(rows)):
        utils.write_text(path, ''.join(json.dumps(r) + '\n' for r in kept))
    return kept


# ---- a trained run, for evaluation and generation ---------------------------------

def load_model(run_dir, batch_norm=True):
    """(config, vae, state) of a trained run, restored from its newest checkpoint that restores
    (a damaged newer one is skipped, and said so; nothing is written), for evaluation or
    generation: no optimizer, no training machinery. state holds the checkpoint's path, step,
    train_seconds and the run's data (splits).

    batch_norm: recompute batch norm's statistics under the restored weights over BN_BATCHES
    training batches (models.recompute_batch_norm) instead of using the checkpoint's moving
    averages, which lag the weights; False keeps the checkpoint's as they are.
    """
    config = read_config(run_dir)
    vae = make_vae(config)
    state = types.SimpleNamespace(step=tf.Variable(0, dtype=tf.int64),
                                  train_seconds=tf.Variable(0.0, dtype=tf.float64))
    checkpoints = Checkpoints(run_dir, dict(vae=vae, step=state.step,
                                            train_seconds=state.train_seconds))
    state.path = checkpoints.restore(write=False)
    if not state.path:
        raise UsageError(f'{run_dir} has no checkpoint')
    state.splits = load_splits(config, config.data_fingerprint, config.channels)
    if state.splits.fingerprint != config.data_fingerprint:
        raise UsageError(data_changed(run_dir, config.dataset, config.data_fingerprint,
                                      state.splits.fingerprint))
    if batch_norm:
        models.recompute_batch_norm(vae, data.make_pipeline(
            state.splits.train, config.image_size, config.batch_size, shuffle_seed=config.seed,
            data_range=config.data_range).take(BN_BATCHES), config.seed)
    return config, vae, state


def load_splits(config, fingerprint=None, channels=None):
    """data.load of a run's data set. An image folder is streamed (data.load_folder); when a
    run made before streaming recorded another fingerprint or channel count for it (a folder
    with files that do not decode, or with a few RGB files among grayscale ones), the folder
    is read as it was then (check_files=True: every file decoded once up front), so that such
    runs resume and load with the same split."""
    splits = data.load(config.dataset, config.data_dir, config.image_size, config.seed)
    if fingerprint and splits.fingerprint is not None and (
            fingerprint != splits.fingerprint or (channels or splits.channels) != splits.channels):
        older = data.load_folder(config.dataset, config.image_size, config.seed, check_files=True)
        if older.fingerprint == fingerprint and (channels or older.channels) == older.channels:
            return older
    return splits


def saved_data_identity(run_dir):
    """(data_fingerprint, channels) that run_dir's config.json records, or (None, None)."""
    try:
        saved = read_config_file(os.path.join(run_dir, CONFIG_FILE))
    except UsageError:  # missing or damaged: check_resume says so
        return None, None
    return saved.get('data_fingerprint'), saved.get('channels')


BATCH = 500  # images per encoder or decoder call
PROGRESS_MIN = 5000  # images from which a progress bar is shown


def decode_images(vae, z, data_range, desc='decoding'):
    """z (N, Z) -> the decoder means as uint8 (N, S, S, C), in batches of BATCH (a progress
    bar when N is large)."""
    z = np.asarray(z, np.float32)
    batches = range(0, len(z), BATCH)
    out = []
    for i in utils.progress(batches, len(z) >= PROGRESS_MIN, desc=desc, unit='batch', leave=False):
        decoded = np.asarray(vae.decode(z[i:i + BATCH]))
        if not np.all(np.isfinite(decoded)):  # to_uint8 would make them black, silently
            raise UsageError('the decoder gives values that are not finite for these z (they '
                             'are too far from the prior): ask for z nearer 0')
        out.append(data.to_uint8(decoded, data_range))  # uint8 per batch: N float64 would not fit
    return np.concatenate(out)


def encode_images(vae, images, num_images, config, dims=None):
    """mu and log_var (N, Z), float32, of uint8 images (an unbatched tf.data set of num_images
    or an array), in evaluation mode (the posterior's mean path: see models.forward), in
    batches of BATCH (a progress bar when N is large); only the first `dims` of z if given."""
    if isinstance(images, np.ndarray):
        images = tf.data.Dataset.from_tensor_slices(images)
    encode = tf.function(lambda x: [t[:, :dims] for t in vae(x)[1:]], reduce_retracing=True)
    batches = data.make_pipeline(images, config.image_size, BATCH, drop_remainder=False,
                                 data_range=config.data_range)
    out = [[t.numpy() for t in encode(x)] for x in utils.progress(
        batches, desc='encoding', unit='batch', total=math.ceil(num_images / BATCH), leave=False,
        show=num_images >= PROGRESS_MIN)]
    return tuple(np.concatenate(t) for t in zip(*out))


# ---- the priors: N(0, I) and the ex-post Gaussian mixture (prior_gmm.npz) -----------

# N(0, I), or the Gaussian mixture fitted to the encoder means (prior_gmm.npz), and the
# suffix of their FID keys and exported files.
PRIORS = {'normal': '', 'gmm': '_gmm'}
GMM_COMPONENTS = 10


def prior_samples(vae, config, n, seed=None, gmm=None):
    """n decoded samples as uint8 of the prior: the run's fixed z (prior_z, from `seed`, the
    run's by default), or the mixture `gmm` (a dict of models.fit_gmm's arrays) for the top
    latent group, the others (models.Hierarchical's) those of the fixed z."""
    seed = config.seed if seed is None else seed
    if gmm is not None:
        with np.errstate(over='ignore', invalid='ignore'):
            top = models.sample_gmm(gmm, n, seed).astype(np.float32)
        if not np.all(np.isfinite(top)):  # a mixture read_prior passed, yet too wide for float32
            raise UsageError(f'the mixture prior of {config.run_dir} gives z that are not finite '
                             f'in float32: fit it again (generate.py fit_prior)')
    z = prior_z(n, vae.z_dim, seed)
    if gmm is not None:
        z[:, :top.shape[1]] = top
    return decode_images(vae, z, config.data_range,
                         'sampling the ' + ('mixture' if gmm is not None else 'normal') + ' prior')


def fit_prior(run_dir, config, vae, state, components=GMM_COMPONENTS, why=None):
    """Fits the ex-post prior (Ghosh et al. 2020): a Gaussian mixture over the encoder means
    of the whole training split, of the top latent group (all of z but for models.Hierarchical,
    whose lower groups come from its conditional prior: prior_samples); saves it as <run_dir>/prior_gmm.npz (plain arrays, with
    the checkpoint step it belongs to), says so on one line (ending with `why`, if given)
    and returns it."""
    path = os.path.join(run_dir, PRIOR_FILE)
    start = time.time()
    splits = state.splits
    means, _ = encode_images(vae, splits.train, splits.num_train, config, dims=vae.groups[0])
    encoded = time.time()
    try:
        gmm = models.fit_gmm(means, components, config.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    fitted = time.time()
    gmm.update(step=np.array(int(state.step.numpy())), components=np.array(components),
               seed=np.array(config.seed), num_means=np.array(len(means)),
               fit_seconds=np.array(fitted - encoded))
    try:
        utils.save_npz(path, **gmm)
    except OSError as e:
        raise UsageError(f'cannot write {path}: {e.strerror}') from None
    print(f'fitted a {components}-component Gaussian mixture (full covariances) to the '
          f'{len(means)} encoder means of the training split in {fitted - encoded:.1f} s '
          f"({gmm['n_iter']} EM iterations{'' if gmm['converged'] else ', not converged'}; "
          f'encoding took {encoded - start:.1f} s): {path}' + (f', as {why}' if why else ''),
          flush=True)
    return gmm


def read_prior(path):
    """The arrays of a prior_gmm.npz; ValueError if they are not a mixture's that samples
    finite z: a file edited by hand or damaged on the disk (NaN, strings, a covariance that
    is not positive definite or overflows float32) would otherwise crash the sampler or
    decode garbage without a word; load_prior then fits it again, saying why."""
    with np.load(path, allow_pickle=False) as f:
        gmm = {k: f[k] for k in f.files}
    missing = {'weights', 'means', 'covariances', 'step', 'components'} - set(gmm)
    if missing:
        raise ValueError(f"no {', '.join(sorted(missing))}")
    for key in ('step', 'components'):
        if gmm[key].shape != () or gmm[key].dtype.kind not in 'iu':
            raise ValueError(f'{key} is not an integer')
    for key in ('weights', 'means', 'covariances'):
        if gmm[key].dtype.kind not in 'fiu':
            raise ValueError(f'{key} are not numbers')
        with np.errstate(over='ignore'):
            if not np.all(np.isfinite(gmm[key].astype(np.float32))):
                raise ValueError(f'{key} are not finite (in float32)')
    if gmm['means'].ndim != 2:
        raise ValueError('the arrays do not fit together')
    k, z_dim = gmm['means'].shape
    if gmm['weights'].shape != (k,) or gmm['covariances'].shape != (k, z_dim, z_dim) or k < 1:
        raise ValueError('the arrays do not fit together')
    if np.any(gmm['weights'] < 0) or not gmm['weights'].sum() > 0:
        raise ValueError('the weights are not a distribution (negative, or all zero)')
    try:
        np.linalg.cholesky(gmm['covariances'].astype(np.float64))
    except np.linalg.LinAlgError:
        raise ValueError('a covariance is not positive definite') from None
    return gmm


def load_prior(run_dir, config, vae, state, components=None):
    """The run's ex-post prior, fitted now (saying why on one line) if there is none, if it
    belongs to an older checkpoint than the run's newest, or if it has another number of
    components than `components` (None: any; GMM_COMPONENTS when it is fitted now)."""
    try:
        gmm = read_prior(os.path.join(run_dir, PRIOR_FILE))
        reason = _why_refit(gmm, int(state.step.numpy()), components, config.z_dim)
    except FileNotFoundError:
        gmm, reason = None, 'the run had none'
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        gmm, reason = None, f'the stored one cannot be read ({e})'
    if reason is None:
        return gmm
    return fit_prior(run_dir, config, vae, state, components or GMM_COMPONENTS, reason)


def _why_refit(gmm, step, components, z_dim):
    """Why a stored mixture cannot serve the checkpoint of `step`, or None."""
    if int(gmm['step']) != step:
        return f"the stored one was fitted at step {int(gmm['step'])} and the checkpoint is at step {step}"
    if components and int(gmm['components']) != components:
        return f"the stored one has {int(gmm['components'])} components, not {components}"
    if gmm['means'].shape[1] != z_dim:
        return f"the stored one is not of this run's z_dim {z_dim}"
    return None

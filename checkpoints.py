"""The checkpoints of a run folder (<run>/checkpoints/): restore the newest that restores, save
only finite weights, keep the KEEP_CHECKPOINTS newest, set aside those that do not restore, and
read the formats of earlier versions; `load_model`, a trained run for evaluation and generation.
"""
import gc
import hashlib
import os
import re
import shutil
import sys
import time
import types
import zipfile

import numpy as np
import tensorflow as tf

import config as settings
import data
import files
import models
import run_folder
import utils
from utils import UsageError

KEEP_CHECKPOINTS = 3  # the newest checkpoints kept; older ones are deleted as new ones are saved
STATISTICS_BATCHES = 200  # training batches over which load_model recomputes the statistics


def checkpoint_dir(run_dir):
    return os.path.join(run_dir, run_folder.CHECKPOINTS)


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
        files.write_text(path, f'model_checkpoint_path: "ckpt-{number}"\n' + ''.join(
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
            remove_orphan_statistics(self.directory)
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
            raise Diverged(step, 'weights not finite', self.last_good())
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
        remove_orphan_statistics(self.directory)  # of the checkpoints the manager rotated out
        return path

    def latest(self):
        return tf.train.latest_checkpoint(self.directory)

    def last_checkpoint(self):
        path = self.latest()
        return f'{path} holds the last good weights' if path else 'no checkpoint was written'

    def last_good(self):
        return self.last_checkpoint() + ' (try a lower --lr)'


class Diverged(utils.RunFailed):
    """The loss or the weights went non-finite at `step` (exit status 1)."""

    def __init__(self, step, what, advice):
        super().__init__(f'training diverged at step {step}: {what}; {advice}')
        self.step = step


def no_checkpoint_restores(directory, skipped, advice):
    listed = '; '.join(f'{os.path.basename(p)} ({r})' for p, r in skipped)
    return f'no checkpoint in {directory} restores: {listed}; {advice}'


def read_run(run_dir):
    """The Config of a run folder (run_folder.read_config) whose model this machine can hold:
    a config.json edited to a z_dim beyond memory is refused, naming the file, before any
    work."""
    config = run_folder.read_config(run_dir)
    try:
        models.check_memory(config, copies=1)
    except UsageError as e:
        raise UsageError(f'{os.path.join(run_dir, run_folder.CONFIG_FILE)}: {e}; repair it or '
                         f'delete the run folder') from None
    return config


def load_model(run_dir, statistics=True, average=True):
    """(config, vae, state) of a trained run, restored from its newest checkpoint that restores
    (a damaged newer one is skipped, said so and left as it is), for evaluation or generation:
    no optimizer, no training machinery. The one file it may write is its own: the recomputed
    statistics beside the checkpoint (below). state holds the checkpoint's path, step,
    train_seconds and the run's data (splits).

    statistics: recompute the statistics that training keeps of the weights (batch norm's, the
    likelihood's: models.recompute_statistics) under the restored weights over
    STATISTICS_BATCHES training batches instead of using the checkpoint's moving averages,
    which lag the weights; False keeps the checkpoint's as they are.
    average: with --ema, the moving average of the weights (the run's model); False: the
    weights trained, whose statistics are recomputed and not stored.
    """
    config = read_run(run_dir)
    vae = models.make_vae(config)
    state = types.SimpleNamespace(step=tf.Variable(0, dtype=tf.int64),
                                  train_seconds=tf.Variable(0.0, dtype=tf.float64))
    restored = dict(vae=vae, step=state.step, train_seconds=state.train_seconds)
    if config.ema is not None:  # the average is the optimizer's
        restored['optimizer'] = models.make_optimizer(config)
        restored['optimizer'].build(vae.trainable_variables)
    state.path = Checkpoints(run_dir, restored).restore(write=False)
    if not state.path:
        raise UsageError(f'{run_dir} has no checkpoint')
    if config.ema is not None and average:
        inner = restored['optimizer']
        getattr(inner, 'inner_optimizer', inner).finalize_variable_values(vae.trainable_variables)
        print(f'{run_dir}: the moving average of the weights (--ema {config.ema}) of '
              f'{os.path.basename(state.path)}', flush=True)
    elif config.ema is not None:
        print(f'{run_dir}: the weights trained (not their moving average, --ema {config.ema}) '
              f'of {os.path.basename(state.path)}', flush=True)
    stored = config.ema is None or average  # the run's model: its statistics are kept
    state.splits = data.load_run_data(config, config.data_fingerprint, config.channels)
    if state.splits.fingerprint != config.data_fingerprint:
        raise UsageError(settings.data_changed(run_dir, config.dataset, config.data_fingerprint,
                                               state.splits.fingerprint))
    if statistics and not (stored and read_statistics(state.path, vae)):
        print(f"{run_dir}: recomputing batch norm's and the likelihood's statistics for "
              f'{os.path.basename(state.path)} over {STATISTICS_BATCHES} training batches'
              + (' (once: they are stored beside it)' if stored else ''), flush=True)
        models.recompute_statistics(vae, statistics_batches(config, state.splits), config.seed,
                                    STATISTICS_BATCHES)
        if stored:
            write_statistics(state.path, vae)
    return config, vae, state


# ---- the statistics recomputed for a checkpoint, stored beside it --------------------------

STATISTICS_SUFFIX = '.statistics.npz'  # ckpt-<step>.statistics.npz
OLD_SUFFIXES = ('.batch_norm.npz',)  # earlier versions' (batch norm's only): never read


def statistics_batches(config, splits):
    """The training batches over which a run's statistics are recomputed: the first
    STATISTICS_BATCHES of its training split shuffled with its seed."""
    return data.make_pipeline(splits.train, config.image_size, config.batch_size,
                              shuffle_seed=config.seed,
                              data_range=config.data_range).take(STATISTICS_BATCHES)


def _index_digest(path):
    """The sha256 of a checkpoint's index file: what the statistics were computed for (a later
    checkpoint of the same step, after a restart, has another)."""
    with open(path + '.index', 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_statistics(path, vae):
    """Sets the VAE's statistics (models.statistics) to those stored for checkpoint `path` (see
    load_model); False (nothing set) if there are none, or they belong to another checkpoint,
    another number of batches or other variables."""
    variables = models.statistics(vae)
    try:
        with np.load(path + STATISTICS_SUFFIX, allow_pickle=False) as f:
            stored = {k: f[k] for k in f.files}
        values = [stored[str(i)] for i in range(len(variables))]
        fits = (str(stored['index_sha256']) == _index_digest(path)
                and int(stored['batches']) == STATISTICS_BATCHES
                and len(stored) == len(variables) + 2
                and all(v.shape == tuple(w.shape) for v, w in zip(values, variables)))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    if fits:
        for variable, value in zip(variables, values):
            variable.assign(value)
    return fits


def write_statistics(path, vae):
    """Stores the VAE's statistics beside checkpoint `path`, atomically, for read_statistics;
    a folder that cannot be written (read-only) keeps none, silently."""
    arrays = {str(i): np.asarray(v) for i, v in enumerate(models.statistics(vae))}
    try:
        files.save_npz(path + STATISTICS_SUFFIX, index_sha256=np.array(_index_digest(path)),
                       batches=np.array(STATISTICS_BATCHES), **arrays)
    except OSError:
        pass


def remove_orphan_statistics(directory):
    """Deletes the stored statistics of checkpoints that are gone (rotated out, set aside)."""
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        for suffix in (STATISTICS_SUFFIX, *OLD_SUFFIXES):
            if name.endswith(suffix) and not os.path.exists(
                    os.path.join(directory, name[:-len(suffix)] + '.index')):
                os.remove(os.path.join(directory, name))

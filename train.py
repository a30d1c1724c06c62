"""Trains a sigma-VAE: python train.py --experiment_name sigma --model sigma

Writes under <output_dir>/<experiment_name>/: config.json, checkpoints/,
logs/ (TensorBoard), images/ (prior samples and reconstructions, named by step)
and metrics.jsonl (one row of test-split metrics per epoch). Running the same
command again resumes from the newest checkpoint that restores.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import types
import typing
from typing import Optional

import utils  # first: TensorFlow starts quietly; Ctrl-C ends the command in one line
utils.start(__name__)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
from utils import UsageError  # noqa: E402

# Changing one of these changes the model, its test split (seed) or what a step and an epoch
# are (batch_size): a run that differs in them is refused on resume.
MODEL_KEYS = ('model', 'z_dim', 'dataset', 'image_size', 'data_range', 'mixed_precision',
              'channels', 'seed', 'batch_size', 'data_fingerprint')
# Resuming with another value of these is allowed, and said (the objective changes from then on).
OBJECTIVE_KEYS = ('beta', 'lr', 'log_sigma_min')
# A config.json without one of these was not written by train.py.
REQUIRED_KEYS = ('model', 'z_dim', 'dataset', 'image_size', 'data_range', 'seed', 'batch_size')
MAX_SEED = 2 ** 31 - 1
STRATEGIES = ('default', 'mirrored', 'multi_worker')
# --mixed_precision -> Keras dtype policy
POLICIES = {None: 'float32', 'float16': 'mixed_float16', 'bfloat16': 'mixed_bfloat16'}
PRECISIONS = ('float16', 'bfloat16')
NUM_SAMPLES = 100  # a 10x10 grid of prior samples
NUM_RECONSTRUCTIONS = 50  # test images, shown beside their reconstructions in a 10x10 grid
BN_BATCHES = 200  # training batches over which load_model recomputes batch norm's statistics
REFRESH_EVERY = 10  # steps between progress-bar updates (each one waits for the device)
# The metrics of training and test alike (Evaluator.summarize): per-image means.
METRICS = ('loss', 'rec', 'kl', 'neg_elbo', 'bits_per_dim', 'log_sigma')


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
    channels: Optional[int] = None  # not a flag: the data's, written into config.json
    data_fingerprint: Optional[str] = None  # not a flag: an image folder's (data.Splits)

    @property
    def run_dir(self):
        return os.path.join(self.output_dir, self.experiment_name)


def _log_sigma_min(text):
    if text.lower() in ('none', 'off'):
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number or 'none', got '{text}'")
    return value


def make_parser():
    d = Config()
    p = utils.ArgumentParser(
        prog='train.py', description='Train a VAE with a learned, optimal or fixed decoder variance (sigma-VAE).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--model', choices=list(losses.DECODERS), default=d.model,
                   help='decoder likelihood, from losses.DECODERS: averaged MSE, sigma = 1, learned shared sigma, '
                        'batch- or image-optimal sigma, per-value sigma, discretized logistic')
    p.add_argument('--experiment_name', default=d.experiment_name,
                   help='name of the run folder under --output_dir; None means the model name')
    p.add_argument('--output_dir', default=d.output_dir, help='folder that holds the run folders')
    p.add_argument('--epochs', '--epoch', dest='epochs', type=int, default=d.epochs,
                   help='passes over the training split')
    p.add_argument('--batch_size', type=int, default=d.batch_size, help='images per training step')
    p.add_argument('--lr', type=float, default=d.lr, help='Adam learning rate')
    p.add_argument('--z_dim', type=int, default=d.z_dim, help='latent dimensions')
    p.add_argument('--dataset', default=d.dataset,
                   help='tensorflow-datasets name (svhn_cropped, mnist, fashion_mnist, cifar10, '
                        'celeb_a) or the path of a folder of PNG/JPEG images')
    p.add_argument('--data_dir', default=d.data_dir,
                   help='tensorflow-datasets data folder (or one holding the Fashion-MNIST IDX files)')
    p.add_argument('--image_size', type=int, choices=sorted(models.ARCHITECTURES),
                   default=d.image_size, help='images are resized to this square size')
    p.add_argument('--data_range', choices=list(data.DATA_RANGES), default=d.data_range,
                   metavar='RANGE', help="pixel scale and decoder output: '-1,1' with tanh (the TF "
                                         "original) or '0,1' with sigmoid (the PyTorch sibling)")
    p.add_argument('--seed', type=int, default=d.seed,
                   help=f'seed of weights, noise, shuffling and an image folder\'s test split (0 to {MAX_SEED})')
    p.add_argument('--sample_every', type=int, default=d.sample_every,
                   help='steps between sample and reconstruction grids (also written each epoch)')
    p.add_argument('--max_steps', type=int, default=d.max_steps,
                   help='stop after this many steps in all, even mid-epoch (demos, tests)')
    p.add_argument('--checkpoint_every', type=int, default=d.checkpoint_every,
                   help="steps between checkpoints besides each epoch's end (at most this much work is lost to a kill)")
    p.add_argument('--beta', type=float, default=d.beta, help='weight of the KL term (beta-VAE)')
    p.add_argument('--log_sigma_min', type=_log_sigma_min, default=d.log_sigma_min,
                   help="soft lower bound of every learned or optimal log sigma (and the logistic's log "
                        "scale); 'none' turns it off")
    p.add_argument('--xla', action=argparse.BooleanOptionalAction, default=d.xla,
                   help='compile the training step with XLA (jit_compile)')
    p.add_argument('--strategy', choices=STRATEGIES, default=d.strategy,
                   help='tf.distribute: one device, mirrored over local GPUs, or multi_worker (TF_CONFIG)')
    p.add_argument('--mixed_precision', nargs='?', const='float16', choices=PRECISIONS,
                   default=d.mixed_precision,
                   help='compute in float16 with loss scaling (GPUs; the bare flag) or bfloat16 '
                        '(recent CPUs, TPUs); losses, log sigma and the encoder heads stay float32')
    p.add_argument('--restart', action='store_true', default=d.restart,
                   help='when no checkpoint of the run folder restores, start over from step 0 '
                        '(the damaged checkpoints are kept in checkpoints/damaged/) instead of stopping')
    return p


def parse_args(argv=None):
    """Command-line arguments -> a validated Config; bad values exit with status 2."""
    parser = make_parser()
    config = Config(**vars(parser.parse_args(argv)))
    try:
        check_config(config)
    except UsageError as e:
        parser.error(str(e))
    return config


def check_config(config):
    """Raises UsageError for a setting that cannot work; fills in experiment_name."""
    for name in ('epochs', 'batch_size', 'z_dim', 'sample_every', 'max_steps', 'checkpoint_every'):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise UsageError(f'--{name} must be positive, got {value}')
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise UsageError(f'--lr must be a positive number, got {config.lr}')
    if not config.beta >= 0 or not math.isfinite(config.beta):
        raise UsageError(f'--beta must be a non-negative number, got {config.beta}')
    if config.log_sigma_min is not None and not math.isfinite(config.log_sigma_min):
        raise UsageError(f"--log_sigma_min must be a finite number or 'none', got {config.log_sigma_min}")
    if not 0 <= config.seed <= MAX_SEED:
        raise UsageError(f'--seed must be between 0 and {MAX_SEED}, got {config.seed}')
    if not config.dataset.strip():
        raise UsageError('--dataset must name a data set or a folder, got an empty string')
    if not config.output_dir.strip():
        raise UsageError('--output_dir must name a folder, got an empty string')
    if config.experiment_name is None:
        config.experiment_name = config.model
    utils.check_name(config.experiment_name, '--experiment_name')


# ---- the run folder: config.json, checkpoints -------------------------------

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


def check_resume(config):
    """Refuses (UsageError) to resume a run folder's checkpoints with another value of a
    MODEL_KEY, or when its config.json is damaged. Reads only. Returns the changes of an
    OBJECTIVE_KEY ('--beta 1.0 -> 0.5'), which a resume accepts (and config.json records)."""
    path = os.path.join(config.run_dir, 'config.json')
    if not utils.CheckpointFolder(checkpoint_dir(config.run_dir)).any():
        rows, _ = utils.read_rows(os.path.join(config.run_dir, 'metrics.jsonl'))
        if rows and not config.restart:
            raise UsageError(
                f"{config.run_dir} holds metrics rows up to step {rows[-1]['step']} but no checkpoint "
                f"in {checkpoint_dir(config.run_dir)}: put the checkpoints back, or start over with "
                f"--restart (the rows are dropped)")
        return []
    if not os.path.exists(path):
        raise UsageError(f'{config.run_dir} holds checkpoints but no config.json, which says what '
                         f'they are a model of: put it back, or delete the run folder')
    saved = read_config_file(path)
    for key in MODEL_KEYS:
        before, now = saved.get(key, getattr(Config(), key)), getattr(config, key)
        if key == 'data_fingerprint' and before != now:
            raise UsageError(data_changed(config.run_dir, config.dataset, before, now))
        if before != now:
            raise UsageError(
                f"{config.run_dir} holds a run with --{key} {before}, not {now}: resume it "
                f"with the same value, or start fresh with another --experiment_name (or "
                f"delete the folder)")
    return [f'--{key} {saved[key]} -> {getattr(config, key)}' for key in OBJECTIVE_KEYS
            if key in saved and saved[key] != getattr(config, key)]


def data_changed(run_dir, dataset, before, now):
    """The error of an image folder that no longer holds the images a run started with."""
    return (f'{dataset} holds other images than when {run_dir} started (then: {before}; now: '
            f'{now}): its test split would change; use the folder as it was, or start a new run '
            f'(another --experiment_name)')


def read_config(run_dir):
    """The Config of a run folder, from its config.json; output_dir and experiment_name
    are where the folder is now."""
    path = os.path.join(run_dir, 'config.json')
    if not os.path.isfile(path):
        raise UsageError(f'{run_dir} is not a run folder (no config.json)')
    config = Config(**read_config_file(path))
    config.output_dir, config.experiment_name = os.path.split(os.path.normpath(run_dir))
    return config


def checkpoint_dir(run_dir):
    return os.path.join(run_dir, 'checkpoints')


def load_model(run_dir, batch_norm=True):
    """(config, vae, state) of a trained run, restored from its newest checkpoint that restores
    (a damaged newer one is skipped, and said so), for evaluation or generation: no optimizer,
    no training machinery. state holds the checkpoint's path, step, train_seconds, the fixed
    prior z of its sample grids and the run's data (splits).

    batch_norm: recompute batch norm's statistics under the restored weights over BN_BATCHES
    training batches (models.recompute_batch_norm) instead of using the checkpoint's moving
    averages, which lag the weights; False keeps the checkpoint's as they are.
    """
    config = read_config(run_dir)
    vae = make_vae(config)
    state = types.SimpleNamespace(
        step=tf.Variable(0, dtype=tf.int64), train_seconds=tf.Variable(0.0, dtype=tf.float64),
        prior_z=tf.Variable(tf.zeros((NUM_SAMPLES, config.z_dim))))
    checkpoint = tf.train.Checkpoint(vae=vae, step=state.step, train_seconds=state.train_seconds,
                                     prior_z=state.prior_z)
    folder = utils.CheckpointFolder(checkpoint_dir(run_dir))
    state.path, skipped = folder.find(
        lambda path: checkpoint.restore(path).expect_partial().assert_existing_objects_matched())
    for path, reason in skipped:
        print(f'skipped checkpoint {path}: it does not restore ({reason})', file=sys.stderr)
    if not state.path:
        raise UsageError(f'{run_dir} has no checkpoint' if not skipped else no_checkpoint_restores(
            folder.directory, skipped, 'fix or restore the files'))
    state.splits = data.load(config.dataset, config.data_dir, config.image_size, config.seed)
    if state.splits.fingerprint != config.data_fingerprint:
        raise UsageError(data_changed(run_dir, config.dataset, config.data_fingerprint,
                                      state.splits.fingerprint))
    if batch_norm:
        models.recompute_batch_norm(vae, data.make_pipeline(
            state.splits.train, config.image_size, config.batch_size, shuffle_seed=config.seed,
            data_range=config.data_range).take(BN_BATCHES), config.seed)
    return config, vae, state


def no_checkpoint_restores(directory, skipped, advice):
    listed = '; '.join(f'{os.path.basename(p)} ({r})' for p, r in skipped)
    return f'no checkpoint in {directory} restores: {listed}; {advice}'


class RunFailed(UsageError):
    """The run stopped on a failure of the machine or of training, not of the input (exit
    status 1): a loss that went non-finite, a checkpoint that could not be written."""


class Diverged(RunFailed):
    """The loss or the weights went non-finite (exit status 1)."""


def all_finite(variables):
    return all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables)


def check_tf_config():
    """Raises UsageError unless TF_CONFIG (if set) describes a cluster and this task in it."""
    text = os.environ.get('TF_CONFIG')
    if text is None:
        return

    def address(h):  # host:port
        host, _, port = h.rpartition(':') if isinstance(h, str) else ('', '', '')
        return bool(host) and port.isdigit() and 0 < int(port) < 65536

    try:
        spec = json.loads(text)
        cluster, task = spec['cluster'], spec['task']
        valid = (isinstance(cluster, dict) and cluster and isinstance(task, dict)
                 and set(cluster) <= {'chief', 'worker'}  # the roles of MultiWorkerMirroredStrategy
                 and all(isinstance(a, list) and a and all(map(address, a)) for a in cluster.values())
                 and task.get('type') in cluster and type(task.get('index')) is int
                 and 0 <= task['index'] < len(cluster[task['type']])
                 and isinstance(spec.get('rpc_layer', ''), str))
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise UsageError('TF_CONFIG must be JSON like {"cluster": {"worker": ["host:port", ...]}, '
                         f'"task": {{"type": "worker", "index": 0}}}}, got {text[:200]!r}')


def make_strategy(name):
    """The tf.distribute strategy of --strategy."""
    if name == 'mirrored':
        return tf.distribute.MirroredStrategy()
    if name == 'multi_worker':
        check_tf_config()
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except (ValueError, TypeError, tf.errors.OpError) as e:  # a TF_CONFIG it cannot use
            raise UsageError(f'TF_CONFIG cannot start the cluster: {utils.error_reason(e)}') from None
    return tf.distribute.get_strategy()


def is_chief(strategy):
    """Whether this process writes files: the only one, the chief, or worker 0 without a chief."""
    resolver = getattr(strategy, 'cluster_resolver', None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = 'chief' in resolver.cluster_spec().as_dict()
    return resolver.task_type == 'chief' or (not has_chief and resolver.task_type == 'worker'
                                             and resolver.task_id == 0)


def make_vae(config, sync_batch_norm=False):
    """The VAE of a config, with its likelihood from losses.DECODERS (under the current
    distribution strategy's scope, if any)."""
    likelihood = losses.DECODERS[config.model](data.DATA_RANGES[config.data_range],
                                               config.log_sigma_min)
    return models.VAE(config.image_size, config.channels, config.z_dim, likelihood,
                      config.data_range, sync_batch_norm)


class Evaluator:
    """The metrics of a VAE, one set of names for training and test (`summarize`), and the
    test split's, compiled once (`__call__`)."""

    def __init__(self, vae, config):
        self.vae, self.config = vae, config
        self.num_values = int(np.prod(vae.encoder.input_shape[1:]))  # D, values per image
        self.log_scale = data.log_scale(config.data_range)
        self.step = tf.function(self._step, reduce_retracing=True)

    def summarize(self, rec, kl, log_sigma):
        """Per-image means (nats, on the data scale) -> the metrics of training and test alike.

        rec = -log p(x|z), kl = KL(q(z|x) || p(z)); neg_elbo = rec + kl, loss = rec + beta kl,
        bits_per_dim = neg_elbo in bits per value on the 0-255 scale; log_sigma is the
        likelihood's (the mean over values where sigma is predicted per value).
        """
        return {'loss': rec + self.config.beta * kl, 'rec': rec, 'kl': kl, 'neg_elbo': rec + kl,
                'bits_per_dim': losses.bits_per_dim(rec + kl, self.num_values, self.log_scale),
                'log_sigma': log_sigma}

    def _step(self, x, seed):
        """Sums over a test batch of rec, kl, log sigma, the discrete rec and the MSE per value
        of the reconstruction from z = mu, and the number of images."""
        eps = tf.random.stateless_normal((tf.shape(x)[0], self.config.z_dim), seed=seed)
        params, mu, log_var = self.vae(x, eps, training=False)
        rec, discrete, log_sigma = self.vae.likelihood.test_terms(x, params)
        kl = tf.reduce_sum(losses.kl_divergence(mu, log_var), -1)
        mse = losses.per_image_mean(tf.square(x - self.vae.reconstruct(x)))
        return [tf.reduce_sum(t) for t in (rec, kl, log_sigma, discrete, mse)] + [
            tf.cast(tf.shape(x)[0], tf.float32)]

    def __call__(self, test_ds):
        """The test split's metrics, named test_<metric>: per-image means in nats, bits/dim of
        the density (test_bits_per_dim) and of the 8-bit values (test_bits_per_dim_discrete),
        and the MSE per value of the reconstructions (test_mse)."""
        sums = 0.0
        for i, x in enumerate(test_ds):  # sums stay on the device: one host sync at the end
            sums += tf.stack(self.step(x, tf.constant([self.config.seed, i], tf.int64)))
        rec, kl, log_sigma, discrete, mse = (float(s) for s in sums[:-1] / sums[-1])
        stats = self.summarize(rec, kl, log_sigma)
        stats['bits_per_dim_discrete'] = losses.bits_per_dim(discrete + kl, self.num_values, 0.0)
        stats['mse'] = mse
        return {'test_' + k: v for k, v in stats.items()}


class Trainer:
    """Model, optimizer, checkpoint and the compiled steps of one run.

    Data parallel under any tf.distribute strategy, with the model of one device: the batch
    (config.batch_size) is global, each replica's loss is its share of the global batch's
    objective (sums; means over the global batch for mse) and the optimizer sums the
    gradients, a likelihood's batch statistics (the optimal sigma*) are means over all
    replicas, batch norm uses the global batch's statistics (synchronized), and the noise of
    step s is drawn for the global batch from the seed (config.seed, s).
    """

    def __init__(self, config, strategy=None):
        self.config = config
        self.strategy = strategy or tf.distribute.get_strategy()
        self.chief = is_chief(self.strategy)
        keras.utils.set_random_seed(config.seed)
        with self.strategy.scope():
            self.vae = make_vae(config, self.strategy.num_replicas_in_sync > 1)
            self.optimizer = keras.optimizers.Adam(config.lr)
            if config.mixed_precision == 'float16':  # bfloat16 has float32's range: no scaling
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.vae.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
            self.train_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
            self.prior_z = tf.Variable(
                tf.random.stateless_normal((NUM_SAMPLES, config.z_dim), seed=[config.seed, 1]),
                trainable=False, name='prior_z')
            # Sums of the training METRICS and the number of steps since the last metrics row,
            # checkpointed so that a row's train averages cover its whole epoch across resumes.
            self.train_sums = tf.Variable(tf.zeros(len(METRICS), tf.float64), trainable=False,
                                          name='train_sums')
            self.train_count = tf.Variable(0, dtype=tf.int64, trainable=False, name='train_count')
        self.checkpoint = tf.train.Checkpoint(
            vae=self.vae, optimizer=self.optimizer, step=self.step, epoch=self.epoch,
            train_seconds=self.train_seconds, prior_z=self.prior_z, train_sums=self.train_sums,
            train_count=self.train_count)
        self.checkpoint_dir = checkpoint_dir(config.run_dir)
        self.manager = None  # made by restore() or the first save()
        self.saved_step = None  # the step of the checkpoint written or restored last
        self.evaluate = Evaluator(self.vae, config)
        self.update = tf.function(self._update, jit_compile=config.xla)
        self.train_step = tf.function(self._train_step)

    def _manager(self):
        if self.manager is None:
            # Every worker saves (saving is collective); only the chief's copy is kept.
            save_dir = self.checkpoint_dir if self.chief else os.path.join(
                self.config.run_dir, f'.tmp-worker-{self.strategy.cluster_resolver.task_id}')
            self.manager = tf.train.CheckpointManager(self.checkpoint, save_dir, max_to_keep=3)
        return self.manager

    def _restore_from(self, path):
        self.checkpoint.restore(path).assert_existing_objects_matched()

    def restore(self):
        """Restores the newest checkpoint that restores completely; returns its path, or None
        when the run folder holds no checkpoint.

        Newer ones that do not restore are skipped, said so on stderr, and (the chief) moved
        into checkpoints/damaged/, so that they are neither retried nor overwritten; older
        good ones are kept. When none restores, raises UsageError naming them, unless
        config.restart: then the run starts over from step 0. The chief also deletes
        TensorFlow's temporaries and the remains of interrupted saves. The learning rate is
        the one given now, not the saved one.
        """
        folder = utils.CheckpointFolder(self.checkpoint_dir)
        path, skipped = folder.find(self._restore_from)
        if skipped and not path and not self.config.restart:
            raise UsageError(no_checkpoint_restores(
                self.checkpoint_dir, skipped, f'start over with --restart (damaged files are kept in '
                f'{os.path.join(self.checkpoint_dir, utils.DAMAGED)}/), or delete the run folder'))
        if self.chief:
            folder.remove_temporaries()
            for skipped_path, reason in skipped:
                number = int(skipped_path.rsplit('-', 1)[1])
                moved = number in folder.files
                damaged = folder.set_aside([number])
                print(f'skipped checkpoint {skipped_path}: it does not restore ({reason})'
                      + (f'; its files are now in {damaged}/' if moved else ''), file=sys.stderr)
            folder.write_state(int(path.rsplit('-', 1)[1]) if path else None)
            if skipped and not path:
                print('no checkpoint restores: starting over from step 0 (--restart)',
                      file=sys.stderr)
            for name in os.listdir(self.config.run_dir):
                if name.startswith('.tmp-worker-'):  # a killed worker's save folder
                    shutil.rmtree(os.path.join(self.config.run_dir, name), ignore_errors=True)
        if path:
            self.optimizer.learning_rate.assign(self.config.lr)
            self.saved_step = int(self.step.numpy())
        else:
            self.reset_train_means()
        self._manager()
        return path

    def save(self):
        """Checkpoints the run; raises Diverged, saving nothing, if a weight is not finite, and
        RunFailed if the checkpoint cannot be written (a full disk): then the previous
        checkpoints are intact and the temporaries of the failed save deleted."""
        step = int(self.step.numpy())
        if not all_finite(self.vae.weights):
            raise Diverged(f'training diverged at step {step}: weights not finite; '
                           + self.last_good())
        try:
            path = self._manager().save(checkpoint_number=self.step)
        except (tf.errors.OpError, OSError) as e:
            if self.chief:
                utils.CheckpointFolder(self.checkpoint_dir).remove_temporaries()
            raise RunFailed(f'cannot write the checkpoint of step {step} ({utils.error_reason(e)}); '
                            + self.last_checkpoint()) from None
        self.saved_step = step
        if not self.chief:
            tf.io.gfile.rmtree(self.manager.directory)
            return tf.train.latest_checkpoint(self.checkpoint_dir)
        return path

    def last_checkpoint(self):
        path = tf.train.latest_checkpoint(self.checkpoint_dir)
        return f'{path} holds the last good weights' if path else 'no checkpoint was written'

    def last_good(self):
        return self.last_checkpoint() + ' (try a lower --lr)'

    def train_means(self):
        """The means of the training METRICS since the last metrics row (a host sync)."""
        count = max(int(self.train_count.numpy()), 1)
        return {k: float(v) / count for k, v in zip(METRICS, self.train_sums.numpy())}

    def reset_train_means(self):
        self.train_sums.assign(tf.zeros_like(self.train_sums))
        self.train_count.assign(0)

    def _update(self, x):
        """One Adam step on this replica's part x (b, S, S, C) of the global batch.

        Returns the metrics of the global batch (the same on every replica).
        """
        vae, likelihood = self.vae, self.vae.likelihood
        with tf.GradientTape() as tape:
            mu, log_var = vae.encoder(x, training=True)
            params = vae.decoder(mu + tf.exp(0.5 * log_var) * self._noise(x), training=True)
            objective, rec, log_sigma = likelihood.train_terms(x, params, self._global_mean)
            kl = losses.kl_divergence(mu, log_var)
            rec_term, kl_term = likelihood.reduce(objective, kl, self._global_batch(x))
            scaled = self.optimizer.scale_loss(rec_term + self.config.beta * kl_term)
        gradients = tape.gradient(scaled, vae.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, vae.trainable_variables))
        return self.evaluate.summarize(*self._global_means(rec, tf.reduce_sum(kl, -1), log_sigma))

    # -- replica plumbing: the global batch seen from one replica's part x of it

    @staticmethod
    def _global_batch(x):
        return tf.shape(x)[0] * tf.distribute.get_replica_context().num_replicas_in_sync

    @staticmethod
    def _global_means(*values):
        """Per-image values (b,) of this replica -> their means over the global batch."""
        replica = tf.distribute.get_replica_context()
        count = tf.cast(tf.size(values[0]), tf.float32)
        sums = replica.all_reduce('sum', [tf.reduce_sum(v) for v in values] + [count])
        return [s / sums[-1] for s in sums[:-1]]

    def _global_mean(self, values):
        return self._global_means(values)[0]

    def _noise(self, x):
        """eps for this replica's rows of the global batch, drawn from (seed, step)."""
        replica = tf.distribute.get_replica_context()
        b = tf.shape(x)[0]
        eps = tf.random.stateless_normal((self._global_batch(x), self.config.z_dim), seed=tf.stack(
            [tf.constant(self.config.seed, tf.int64), tf.cast(self.step, tf.int64)]))
        return eps[replica.replica_id_in_sync_group * b:][:b]

    def _train_step(self, x):
        """One step on a (distributed) global batch; summaries are the chief's."""
        per_replica = self.strategy.run(self.update, args=(x,))
        stats = {k: self.strategy.experimental_local_results(v)[0] for k, v in per_replica.items()}
        self.step.assign_add(1)
        self.train_sums.assign_add(tf.cast(tf.stack([stats[k] for k in METRICS]), tf.float64))
        self.train_count.assign_add(1)
        if self.chief:
            for name, value in stats.items():
                tf.summary.scalar('train/' + name, value, step=self.step)
        return stats

    def write_images(self, recon_inputs):
        """The 10x10 grids of prior samples (the fixed z) and of test images beside their
        reconstructions, as PNGs named by step and as TensorBoard images (images/samples,
        images/reconstructions) when a default summary writer is set."""
        step = int(self.step.numpy())
        folder = os.path.join(self.config.run_dir, 'images')
        os.makedirs(folder, exist_ok=True)
        data_range = self.config.data_range
        samples = data.to_uint8(self.vae.decode(self.prior_z), data_range)
        pairs = utils.side_by_side(data.to_uint8(recon_inputs, data_range),
                                   data.to_uint8(self.vae.reconstruct(recon_inputs), data_range))
        for name, images in (('samples', samples), ('reconstructions', pairs)):
            grid = utils.image_grid(images, 10, 10)
            utils.save_png(os.path.join(folder, f'{name}_{step:08d}.png'), grid)
            tf.summary.image('images/' + name, grid[None], step=step)  # no-op without a writer


def train(config):
    """Trains (or resumes) the run that `config` describes; returns the last metrics row.

    Raises UsageError (bad input, exit status 2), RunFailed (exit status 1), or SystemExit
    with status 130 / 143 after Ctrl-C / SIGTERM.
    """
    check_config(config)
    with utils.private_tempdir():  # nothing is left in $TMPDIR, even after a SIGKILL
        strategy = make_strategy(config.strategy)  # first: multi-worker starts before other ops
        keras.mixed_precision.set_dtype_policy(POLICIES[config.mixed_precision])
        try:
            return _train(config, strategy)
        finally:
            keras.mixed_precision.set_dtype_policy('float32')


def check_memory(config):
    """Refuses a --z_dim whose dense layers alone need more than this machine's memory, at 6
    float32 copies of each weight: the weights, their gradients, Adam's two moments, the
    initial values and the copy of a checkpoint being written."""
    needed = 6 * 4 * models.latent_weights(config.image_size, config.z_dim)
    try:
        memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return
    if needed > memory:
        raise UsageError(f'--z_dim {config.z_dim} is too large: the layers next to z alone would '
                         f'need about {needed / 2 ** 30:,.0f} GiB to train, '
                         f'more than the {memory / 2 ** 30:,.0f} GiB of memory here')


def make_trainer(config, strategy):
    """The Trainer, or UsageError if its model does not fit in memory."""
    check_memory(config)
    try:
        return Trainer(config, strategy)
    except (tf.errors.ResourceExhaustedError, MemoryError) as e:
        raise UsageError(f'the model of --z_dim {config.z_dim} does not fit in memory '
                         f'({utils.error_reason(e)[:120]}); use a smaller --z_dim') from None


def _train(config, strategy):
    chief = is_chief(strategy)
    lock = utils.FolderLock(config.run_dir, 'train.py')
    if chief:
        lock.check()  # fail at once, not after loading the data
    # Everything is checked before anything is written: the data, the run folder's config.
    splits = data.load(config.dataset, config.data_dir, config.image_size, config.seed)
    config.channels, config.data_fingerprint = splits.channels, splits.fingerprint
    steps_per_epoch = splits.num_train // config.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f'{splits.source} has {splits.num_train} training images, '
                         f'fewer than one batch of {config.batch_size}')
    changes = check_resume(config)
    if changes and chief:
        print(f"resuming with {', '.join(changes)}: the steps from here on use the new "
              f"value (config.json records it)", file=sys.stderr)
    trainer = make_trainer(config, strategy)
    with contextlib.ExitStack() as stack:
        if chief:
            try:
                os.makedirs(config.run_dir, exist_ok=True)
                stack.enter_context(lock)
                check_resume(config)  # again: another process may have written it meanwhile
                utils.remove_temporary_files(config.run_dir)
            except OSError as e:
                raise UsageError(f'cannot write to {config.run_dir}: {e.strerror}') from None
        interrupts = stack.enter_context(utils.Interrupts())
        try:
            return _run(config, strategy, trainer, splits, steps_per_epoch, interrupts)
        except utils.Interrupted as e:  # before the loop, or after its own handling
            print(f'interrupted ({e}) at step {int(trainer.step.numpy())}; '
                  f'{trainer.last_checkpoint()}', file=sys.stderr)
            raise SystemExit(e.status) from None


def resume_rows(config, trainer, metrics_path):
    """The rows of metrics.jsonl up to the restored step; the chief sets damaged lines aside in
    metrics.jsonl.damaged (saying so) and drops rows written after the checkpoint (they would
    be written again)."""
    step = int(trainer.step.numpy())
    rows, damaged = utils.read_rows(metrics_path)
    kept = [r for r in rows if r['step'] <= step]
    if trainer.chief and damaged:
        utils.append_lines(metrics_path + '.damaged', damaged)
        print(f'{metrics_path}: {len(damaged)} damaged line(s) set aside in '
              f'{metrics_path}.damaged', file=sys.stderr)
    if trainer.chief and (damaged or len(kept) < len(rows)):
        utils.write_text(metrics_path, ''.join(json.dumps(r) + '\n' for r in kept))
    return kept


class TrainClock:
    """Adds the seconds spent in training steps (not in evaluations or saves) to a variable."""

    def __init__(self, seconds):
        self.seconds, self.tick = seconds, None

    def start(self):
        self.tick = time.time()

    def stop(self):
        tick, self.tick = self.tick, None  # first: a signal here must not count it twice
        if tick is not None:
            self.seconds.assign_add(time.time() - tick)


def _run(config, strategy, trainer, splits, steps_per_epoch, interrupts):
    chief = trainer.chief
    train_ds = data.make_pipeline(splits.train, config.image_size, config.batch_size,
                                  shuffle_seed=config.seed, data_range=config.data_range)
    test_ds = data.make_pipeline(splits.test, config.image_size, config.batch_size,
                                 drop_remainder=False, data_range=config.data_range)
    recon_inputs = next(iter(test_ds.unbatch().batch(NUM_RECONSTRUCTIONS)))
    metrics_path = os.path.join(config.run_dir, 'metrics.jsonl')
    with interrupts.held():  # a consistent folder before anything else
        restored = trainer.restore()
        step = int(trainer.step.numpy())
        if chief:
            utils.write_text(os.path.join(config.run_dir, 'config.json'),
                             json.dumps(dataclasses.asdict(config), indent=2) + '\n')
        rows = resume_rows(config, trainer, metrics_path)

    total = config.epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    print(f'{splits.source}: {splits.num_train} train / {splits.num_test} test images, '
          f'{splits.channels} channel(s) at {config.image_size}x{config.image_size}; '
          f'{steps_per_epoch} steps per epoch; model {config.model}, '
          f'{trainer.vae.count_params()} parameters; {strategy.num_replicas_in_sync} replica(s); '
          f'run folder {config.run_dir}', flush=True)
    if restored:
        print(f'resumed from {restored} at step {step}, epoch {step / steps_per_epoch:.2f}',
              flush=True)
    row = rows[-1] if rows else None
    writer = (tf.summary.create_file_writer(os.path.join(config.run_dir, 'logs')) if chief
              else tf.summary.create_noop_writer())
    clock = TrainClock(trainer.train_seconds)
    bar = None
    try:
        with writer.as_default():
            if row is not None and row['step'] == step:
                trainer.reset_train_means()  # the checkpoint may predate the row's reset
            elif step and (step % steps_per_epoch == 0 or step == total):
                # An interrupt just before the epoch's end was handled saved it without its row.
                with interrupts.held():
                    row = end_of_epoch(trainer, test_ds, recon_inputs, step, steps_per_epoch,
                                       metrics_path, save=False)
                if row:
                    print(format_row(row), flush=True)
            if step >= total:
                print(f'nothing to do: step {step} of {total} reached (raise --epochs or --max_steps)')
                return row
            # The rest of the current epoch (a fresh shuffle after a resume), then whole epochs.
            left_in_epoch = steps_per_epoch - step % steps_per_epoch
            batches = iter(strategy.experimental_distribute_dataset(
                train_ds.take(left_in_epoch).concatenate(train_ds.repeat())))
            bar = utils.progress(show=chief, total=total, initial=step, unit='step',
                                 dynamic_ncols=True, desc=config.experiment_name)
            clock.start()
            for step in range(step + 1, total + 1):
                stats = trainer.train_step(next(batches))
                bar.update(1)
                end = step % steps_per_epoch == 0 or step == total
                if step % REFRESH_EVERY == 0 or end:
                    check_finite(stats, step, trainer)
                    bar.set_postfix({k: f'{v:.4g}' for k, v in trainer.train_means().items()
                                     if k in ('loss', 'rec', 'kl', 'log_sigma')})
                if step % config.sample_every == 0 and chief:
                    trainer.write_images(recon_inputs)
                if end or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    check_finite(stats, step, trainer)
                    clock.stop()
                    with interrupts.held():  # an epoch's end is evaluated and saved whole
                        trainer.epoch.assign(step // steps_per_epoch)
                        if end:
                            row = end_of_epoch(trainer, test_ds, recon_inputs, step,
                                               steps_per_epoch, metrics_path)
                            if row:
                                bar.write(format_row(row))
                        else:
                            trainer.save()
                    clock.start()
    except utils.Interrupted as e:
        clock.stop()  # the time since the last checkpoint counts too
        if bar is not None:
            bar.close()
        step = int(trainer.step.numpy())
        if config.strategy == 'multi_worker':  # saving is collective: the others would hang
            print(f'interrupted at step {step}; not saved under multi_worker, '
                  f'the last checkpoint is {tf.train.latest_checkpoint(trainer.checkpoint_dir)}',
                  file=sys.stderr)
        else:
            # Further signals are ignored until this save is complete (utils.Interrupts).
            if trainer.saved_step != step:
                trainer.epoch.assign(step // steps_per_epoch)
                trainer.save()
            path = tf.train.latest_checkpoint(trainer.checkpoint_dir)
            print(f'interrupted at step {step}; saved {path}', file=sys.stderr)
        raise SystemExit(e.status) from None
    finally:
        if bar is not None:
            bar.close()
        writer.flush()
    return row


def format_row(row):
    """A metrics row on one line: the step, then the test metrics."""
    keys = ['step', 'epoch'] + [k for k in row if k.startswith('test_')]
    return ' '.join(f'{k} {row[k]:.5g}' if isinstance(row[k], float) else f'{k} {row[k]}'
                    for k in keys)


def end_of_epoch(trainer, test_ds, recon_inputs, step, steps_per_epoch, metrics_path,
                 save=True):
    """Evaluates, writes grids and a metrics row (the chief), then checkpoints (every worker).

    The caller holds signals off for all of it (a few seconds): were an interrupt to save the
    epoch's end without its row, the resume would evaluate it again, and a run interrupted
    more often than an evaluation takes would never get past that epoch's end.
    """
    if not trainer.chief:
        if save:
            trainer.save()
        return None
    row = {'step': step, 'epoch': round(step / steps_per_epoch, 4), 'wall_time': time.time(),
           'train_seconds': round(float(trainer.train_seconds.numpy()), 2)}
    row.update({'train_' + k: v for k, v in trainer.train_means().items()})
    row.update(trainer.evaluate(test_ds))
    for key, value in row.items():
        if key.startswith('test_'):
            tf.summary.scalar('test/' + key[5:], value, step=step)
    trainer.write_images(recon_inputs)
    utils.append_jsonl(metrics_path, row)
    trainer.reset_train_means()
    if save:
        trainer.save()
    return row


def check_finite(stats, step, trainer):
    bad = [k for k, v in stats.items() if not np.isfinite(float(v))]
    if bad:
        raise Diverged(f"training diverged at step {step}: {', '.join(bad)} not finite; "
                       + trainer.last_good())


def main(argv=None):
    config = parse_args(argv)
    try:
        train(config)
    except UsageError as e:
        print(f'train.py: error: {e}', file=sys.stderr)
        return 1 if isinstance(e, RunFailed) else 2
    except OSError as e:  # e.g. a full disk while writing images or metrics
        print(f"train.py: error: cannot write {e.filename or 'into ' + config.run_dir}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training started
        print('train.py: interrupted', file=sys.stderr)
        return 130
    except SystemExit:  # interrupted (130, 143): the checkpoint is saved
        ignore_interrupts()
        raise
    return 0


def ignore_interrupts():
    """On the way out after an interrupt: a further Ctrl-C or SIGTERM (while TensorFlow shuts
    down) must not turn the exit into a traceback and status -2."""
    if threading.current_thread() is threading.main_thread():
        for s in utils.Interrupts.SIGNALS:
            signal.signal(s, signal.SIG_IGN)


if __name__ == '__main__':
    sys.exit(main())

"""Trains a sigma-VAE: python train.py --experiment_name sigma --model sigma

Writes under <output_dir>/<experiment_name>/: config.json, checkpoints/,
logs/ (TensorBoard), images/ (prior samples and reconstructions, named by step)
and metrics.jsonl (one row of test-split metrics per epoch). Running the same
command again resumes from the latest checkpoint.
"""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
import types
from typing import Optional

import utils  # first: TensorFlow starts quietly
utils.quiet_tensorflow()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
from utils import UsageError  # noqa: E402

# Changing one of these changes the model: a run that differs in them is refused on resume.
MODEL_KEYS = ('model', 'z_dim', 'dataset', 'image_size', 'data_range', 'mixed_precision',
              'channels')
STRATEGIES = ('default', 'mirrored', 'multi_worker')
# --mixed_precision -> Keras dtype policy
POLICIES = {None: 'float32', 'float16': 'mixed_float16', 'bfloat16': 'mixed_bfloat16'}
PRECISIONS = ('float16', 'bfloat16')
NUM_SAMPLES = 100  # a 10x10 grid of prior samples
NUM_RECONSTRUCTIONS = 50  # test images, shown beside their reconstructions in a 10x10 grid
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
    channels: Optional[int] = None  # not a flag: the data's, written into config.json

    @property
    def run_dir(self):
        return os.path.join(self.output_dir, self.experiment_name)


def _log_sigma_min(text):
    if text.lower() in ('none', 'off'):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got '{text}'") from None


def make_parser():
    d = Config()
    p = argparse.ArgumentParser(
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
    p.add_argument('--data_range', choices=sorted(data.DATA_RANGES), default=d.data_range,
                   help='pixel scale and decoder output: -1,1 with tanh (TF original) or 0,1 with sigmoid '
                        '(PyTorch sibling); write --data_range=-1,1 with "="')
    p.add_argument('--seed', type=int, default=d.seed, help='seed of weights, noise and shuffling')
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
    return p


def parse_args(argv=None):
    """Command-line arguments -> a validated Config; bad values exit with status 2."""
    parser = make_parser()
    config = Config(**vars(parser.parse_args(argv)))
    for name in ('epochs', 'batch_size', 'z_dim', 'sample_every', 'max_steps', 'checkpoint_every'):
        value = getattr(config, name)
        if value is not None and value <= 0:
            parser.error(f'--{name} must be positive, got {value}')
    if not config.lr > 0 or not math.isfinite(config.lr):
        parser.error(f'--lr must be a positive number, got {config.lr}')
    if not config.beta >= 0 or not math.isfinite(config.beta):
        parser.error(f'--beta must be a non-negative number, got {config.beta}')
    if config.experiment_name is None:
        config.experiment_name = config.model
    name = config.experiment_name
    if not name or name == '.' or '..' in name or '/' in name or os.sep in name:
        parser.error(f"--experiment_name must be a plain name, not a path: '{name}'")
    return config


def check_run_dir(config, chief=True):
    """Creates the run folder; refuses to resume a checkpoint of another model."""
    path = os.path.join(config.run_dir, 'config.json')
    if os.path.exists(path) and tf.train.latest_checkpoint(os.path.join(config.run_dir, 'checkpoints')):
        with open(path) as f:
            saved = json.load(f)
        for key in MODEL_KEYS:
            if saved.get(key, getattr(Config(), key)) != getattr(config, key):
                raise UsageError(
                    f"{config.run_dir} holds a run with --{key} {saved.get(key)}, not "
                    f"{getattr(config, key)}: resume it with the same value, or start fresh "
                    f"with another --experiment_name (or delete the folder)")
    if not chief:
        return
    try:
        os.makedirs(config.run_dir, exist_ok=True)
        utils.remove_temporary_files(config.run_dir)
        utils.write_text(path, json.dumps(dataclasses.asdict(config), indent=2) + '\n')
    except OSError as e:
        raise UsageError(f'cannot write to {config.run_dir}: {e.strerror}') from None


def read_config(run_dir):
    """The Config of a run folder, from its config.json; output_dir and experiment_name
    are where the folder is now."""
    path = os.path.join(run_dir, 'config.json')
    if not os.path.isfile(path):
        raise UsageError(f'{run_dir} is not a run folder (no config.json)')
    with open(path) as f:
        saved = json.load(f)
    config = Config(**{k: v for k, v in saved.items() if k in Config.__dataclass_fields__})
    config.output_dir, config.experiment_name = os.path.split(os.path.normpath(run_dir))
    return config


def load_model(run_dir):
    """(config, vae, state) of a trained run, restored from its newest checkpoint for
    evaluation or generation: no optimizer, no training machinery. state holds the
    checkpoint's path, step, train_seconds and the fixed prior z of its sample grids."""
    config = read_config(run_dir)
    if config.channels is None:
        raise UsageError(f'{run_dir} was written by an older version of train.py (config.json '
                         f'has no channels); retrain it')
    vae = make_vae(config)
    state = types.SimpleNamespace(
        step=tf.Variable(0, dtype=tf.int64), train_seconds=tf.Variable(0.0, dtype=tf.float64),
        prior_z=tf.Variable(tf.zeros((NUM_SAMPLES, config.z_dim))))
    checkpoint = tf.train.Checkpoint(vae=vae, step=state.step, train_seconds=state.train_seconds,
                                     prior_z=state.prior_z)
    state.path = tf.train.latest_checkpoint(os.path.join(run_dir, 'checkpoints'))
    if not state.path:
        raise UsageError(f'{run_dir} has no checkpoint')
    checkpoint.restore(state.path).expect_partial().assert_existing_objects_matched()
    return config, vae, state


class Diverged(UsageError):
    """The loss or the weights went non-finite (exit status 1)."""


class Interrupted(Exception):
    """SIGTERM received: handled like Ctrl-C, with exit status 143."""


def _raise_interrupted(signum, frame):
    raise Interrupted()


def all_finite(variables):
    return all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in variables)


def make_strategy(name):
    """The tf.distribute strategy of --strategy."""
    if name == 'mirrored':
        return tf.distribute.MirroredStrategy()
    if name == 'multi_worker':
        return tf.distribute.MultiWorkerMirroredStrategy()
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
        self.checkpoint = tf.train.Checkpoint(
            vae=self.vae, optimizer=self.optimizer, step=self.step, epoch=self.epoch,
            train_seconds=self.train_seconds, prior_z=self.prior_z)
        self.checkpoint_dir = os.path.join(config.run_dir, 'checkpoints')
        # Every worker saves (saving is collective); only the chief's copy is kept.
        save_dir = self.checkpoint_dir if self.chief else os.path.join(
            config.run_dir, f'.tmp-worker-{self.strategy.cluster_resolver.task_id}')
        self.manager = tf.train.CheckpointManager(self.checkpoint, save_dir, max_to_keep=3)
        self.metrics = {k: keras.metrics.Mean(name=k) for k in METRICS}
        self.evaluate = Evaluator(self.vae, config)
        self.update = tf.function(self._update, jit_compile=config.xla)
        self.train_step = tf.function(self._train_step)

    def restore(self):
        """Restores the latest checkpoint, if any; returns its path or None.

        The learning rate is the one given now, not the saved one.
        """
        path = tf.train.latest_checkpoint(self.checkpoint_dir)
        if path:
            self.checkpoint.restore(path).assert_existing_objects_matched()
            self.optimizer.learning_rate.assign(self.config.lr)
        return path

    def save(self):
        """Checkpoints the run; raises Diverged, saving nothing, if a weight is not finite."""
        if not all_finite(self.vae.weights):
            raise Diverged(f'training diverged at step {int(self.step.numpy())}: weights not finite; '
                           + self.last_good())
        path = self.manager.save(checkpoint_number=self.step)
        if not self.chief:
            tf.io.gfile.rmtree(self.manager.directory)
            return tf.train.latest_checkpoint(self.checkpoint_dir)
        return path

    def last_good(self):
        path = tf.train.latest_checkpoint(self.checkpoint_dir)
        return (f'{path} holds the last good weights' if path else 'no checkpoint was written') + \
            ' (try a lower --lr)'

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
        for name, value in stats.items():
            self.metrics[name].update_state(value)
            if self.chief:
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
    """Trains (or resumes) the run that `config` describes; returns the last metrics row."""
    strategy = make_strategy(config.strategy)  # first: multi-worker must start before other ops
    keras.mixed_precision.set_dtype_policy(POLICIES[config.mixed_precision])
    try:
        return _train(config, strategy)
    finally:
        keras.mixed_precision.set_dtype_policy('float32')


def _train(config, strategy):
    chief = is_chief(strategy)
    splits = data.load(config.dataset, config.data_dir, config.image_size, config.seed)
    config.channels = splits.channels
    check_run_dir(config, chief)
    steps_per_epoch = splits.num_train // config.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f'{splits.source} has {splits.num_train} training images, '
                         f'fewer than one batch of {config.batch_size}')
    train_ds = data.make_pipeline(splits.train, config.image_size, config.batch_size,
                                  shuffle_seed=config.seed, data_range=config.data_range)
    test_ds = data.make_pipeline(splits.test, config.image_size, config.batch_size,
                                 drop_remainder=False, data_range=config.data_range)
    recon_inputs = next(iter(test_ds.unbatch().batch(NUM_RECONSTRUCTIONS)))

    trainer = Trainer(config, strategy)
    restored = trainer.restore()
    step = int(trainer.step.numpy())
    metrics_path = os.path.join(config.run_dir, 'metrics.jsonl')
    # Rows written after the checkpoint we resume from would be written again: drop them.
    rows = [r for r in utils.read_jsonl(metrics_path) if r['step'] <= step]
    if chief:
        utils.write_text(metrics_path, ''.join(json.dumps(r) + '\n' for r in rows))

    total = config.epochs * steps_per_epoch
    if config.max_steps:
        total = min(total, config.max_steps)
    print(f'{splits.source}: {splits.num_train} train / {splits.num_test} test images, '
          f'{splits.channels} channel(s) at {config.image_size}x{config.image_size}; '
          f'{steps_per_epoch} steps per epoch; model {config.model}, '
          f'{trainer.vae.count_params()} parameters; {strategy.num_replicas_in_sync} replica(s); '
          f'run folder {config.run_dir}')
    if restored:
        print(f'resumed from {restored} at step {step}, epoch {step / steps_per_epoch:.2f}')
    if step >= total:
        print(f'nothing to do: step {step} of {total} reached (raise --epochs or --max_steps)')
        return rows[-1] if rows else None

    # The rest of the current epoch (a fresh shuffle after a resume), then whole epochs.
    left_in_epoch = steps_per_epoch - step % steps_per_epoch
    batches = iter(strategy.experimental_distribute_dataset(
        train_ds.take(left_in_epoch).concatenate(train_ds.repeat())))
    writer = (tf.summary.create_file_writer(os.path.join(config.run_dir, 'logs')) if chief
              else tf.summary.create_noop_writer())
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    # No bar when standard error is not a terminal (a log file, a pipe): the rows say enough.
    bar = tqdm(total=total, initial=step, unit='step', dynamic_ncols=True, desc=config.experiment_name,
               disable=True if not chief else None)
    row = rows[-1] if rows else None
    tick = time.time()
    try:
        with writer.as_default():
            for step in range(step + 1, total + 1):
                stats = trainer.train_step(next(batches))
                bar.update(1)
                end = step % steps_per_epoch == 0 or step == total
                if step % REFRESH_EVERY == 0 or end:
                    check_finite(stats, step, trainer)
                    bar.set_postfix({k: f'{float(m.result()):.4g}' for k, m in trainer.metrics.items()
                                     if k in ('loss', 'rec', 'kl', 'log_sigma')})
                if step % config.sample_every == 0 and chief:
                    trainer.write_images(recon_inputs)
                if end or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    check_finite(stats, step, trainer)
                    trainer.train_seconds.assign_add(time.time() - tick)
                    trainer.epoch.assign(step // steps_per_epoch)
                    if end:
                        row = end_of_epoch(trainer, test_ds, recon_inputs, step, steps_per_epoch,
                                           metrics_path)
                        if row:
                            bar.write(format_row(row))
                    else:
                        trainer.save()
                    tick = time.time()
    except (KeyboardInterrupt, Interrupted) as e:
        bar.close()
        if config.strategy == 'multi_worker':  # saving is collective: the others would hang
            print(f'\ninterrupted at step {int(trainer.step.numpy())}; not saved under multi_worker, '
                  f'the last checkpoint is {tf.train.latest_checkpoint(trainer.checkpoint_dir)}',
                  file=sys.stderr)
        else:
            path = trainer.save()
            print(f'\ninterrupted at step {int(trainer.step.numpy())}; saved {path}', file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Interrupted) else 130)
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
        writer.flush()
    return row


def format_row(row):
    """A metrics row on one line: the step, then the test metrics."""
    keys = ['step', 'epoch'] + [k for k in row if k.startswith('test_')]
    return ' '.join(f'{k} {row[k]:.5g}' if isinstance(row[k], float) else f'{k} {row[k]}'
                    for k in keys)


def end_of_epoch(trainer, test_ds, recon_inputs, step, steps_per_epoch, metrics_path):
    """Evaluates, writes grids and a metrics row (the chief), then checkpoints (every worker)."""
    if not trainer.chief:
        trainer.save()
        return None
    row = {'step': step, 'epoch': round(step / steps_per_epoch, 4), 'wall_time': time.time(),
           'train_seconds': round(float(trainer.train_seconds.numpy()), 2)}
    row.update({'train_' + k: float(m.result()) for k, m in trainer.metrics.items()})
    for m in trainer.metrics.values():
        m.reset_state()
    row.update(trainer.evaluate(test_ds))
    for key, value in row.items():
        if key.startswith('test_'):
            tf.summary.scalar('test/' + key[5:], value, step=step)
    trainer.write_images(recon_inputs)
    utils.append_jsonl(metrics_path, row)
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
        return 1 if isinstance(e, Diverged) else 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Trains a sigma-VAE: python train.py --experiment_name sigma --model sigma

Writes the run folder <output_dir>/<experiment_name>/ (see run_folder.py): config.json,
checkpoints/, logs/ (TensorBoard), images/ (prior samples and reconstructions, named by step)
and metrics.jsonl (one row of test-split metrics per epoch). Running the same command again
resumes from the newest checkpoint that restores.
"""
import utils  # first: from here on a Ctrl-C ends the command in one line
utils.start()  # TensorFlow, quietly

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import run_folder  # noqa: E402
from run_folder import Config, Diverged  # noqa: E402
from utils import UsageError  # noqa: E402

# --mixed_precision -> Keras dtype policy
POLICIES = {None: 'float32', 'float16': 'mixed_float16', 'bfloat16': 'mixed_bfloat16'}
NUM_RECONSTRUCTIONS = 50  # test images, shown beside their reconstructions in a 10x10 grid
REFRESH_EVERY = 10  # steps between progress-bar updates (each one waits for the device)


# ---- flags: one per field of Config ---------------------------------------------

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


POSITIVE_INT, POSITIVE_FLOAT = utils.positive(int), utils.positive(float)


def config_flags():
    """Config field -> the argparse arguments of its flag (the default is Config's); made at each
    call, so that --model offers the decoders registered by then."""
    return {
        'model': dict(choices=list(losses.DECODERS),
                      help='decoder likelihood, from losses.DECODERS: averaged MSE, sigma = 1, learned '
                           'shared sigma, batch- or image-optimal sigma, per-value sigma, discretized '
                           'logistic'),
        'experiment_name': dict(help='name of the run folder under --output_dir; None means the model name'),
        'output_dir': dict(help='folder that holds the run folders'),
        'epochs': dict(type=POSITIVE_INT, help='passes over the training split'),
        'batch_size': dict(type=POSITIVE_INT, help='images per training step'),
        'lr': dict(type=POSITIVE_FLOAT, help='Adam learning rate'),
        'z_dim': dict(type=POSITIVE_INT, help='latent dimensions'),
        'arch': dict(choices=list(models.NETWORKS),
                     help="encoder and decoder, from models.NETWORKS: the original's convolutions, or "
                          "residual stages"),
        'width': dict(type=POSITIVE_INT, help="the network's base channels; None: its default "
                                              "(original 64, resnet 32)"),
        'depth': dict(type=POSITIVE_INT, help='residual blocks per level (resnet); None: its default (2)'),
        'dataset': dict(help='tensorflow-datasets name (svhn_cropped, mnist, fashion_mnist, cifar10, '
                             'celeb_a) or the path of a folder of PNG/JPEG images'),
        'data_dir': dict(help='tensorflow-datasets data folder (or one holding the Fashion-MNIST IDX files)'),
        'image_size': dict(type=int, choices=sorted(models.ARCHITECTURES),
                           help='images are resized to this square size'),
        'data_range': dict(choices=list(data.DATA_RANGES), metavar='RANGE',
                           help="pixel scale and decoder output: '-1,1' with tanh (the TF original) or "
                                "'0,1' with sigmoid (the PyTorch sibling)"),
        'seed': dict(type=int, help=f"seed of weights, noise, shuffling, the fixed prior z and an image "
                                    f"folder's test split (0 to {run_folder.MAX_SEED})"),
        'sample_every': dict(type=POSITIVE_INT,
                             help='steps between sample and reconstruction grids (also written each epoch)'),
        'max_steps': dict(type=POSITIVE_INT,
                          help='stop after this many steps in all, even mid-epoch (demos, tests)'),
        'checkpoint_every': dict(type=POSITIVE_INT,
                                 help="steps between checkpoints besides each epoch's end (at most "
                                      "this much work is lost to a kill)"),
        'beta': dict(type=float, help='weight of the KL term (beta-VAE)'),
        'kl_warmup': dict(type=POSITIVE_INT, metavar='STEPS',
                          help='ramp the KL weight linearly from 0 to --beta over the first STEPS steps'),
        'free_bits': dict(type=POSITIVE_FLOAT, metavar='NATS',
                          help='count the KL of each latent group as max(NATS, its batch mean): no '
                               'gradient on a group below NATS'),
        'skip_threshold': dict(type=POSITIVE_FLOAT, metavar='NORM',
                               help='skip the update of a step whose global gradient norm is above '
                                    'NORM (counted as skipped_updates in the metrics rows)'),
        'log_sigma_min': dict(type=_log_sigma_min,
                              help="soft lower bound of every learned or optimal log sigma (and the "
                                   "logistic's log scale); 'none' turns it off"),
        'xla': dict(action=argparse.BooleanOptionalAction,
                    help='compile the training step with XLA (jit_compile)'),
        'strategy': dict(choices=run_folder.STRATEGIES,
                         help='tf.distribute: one device, mirrored over local GPUs, or multi_worker '
                              '(TF_CONFIG)'),
        'mixed_precision': dict(nargs='?', const='float16', choices=run_folder.PRECISIONS,
                                help='compute in float16 with loss scaling (GPUs; the bare flag) or '
                                     'bfloat16 (recent CPUs, TPUs); losses, log sigma and the encoder '
                                     'heads stay float32'),
        'restart': dict(action='store_true',
                        help='when no checkpoint of the run folder restores, start over from step 0 '
                             '(the damaged checkpoints are kept in checkpoints/damaged/) instead of '
                             'stopping'),
    }


def add_config_flags(parser, names=None, defaults=None):
    """Adds the flags of these Config fields (None: all) to an argparse parser, with Config's
    defaults (or `defaults`, a dict, for some of them); compare.py takes its shared flags here."""
    specs = config_flags()
    names = names or tuple(specs)
    d = {**{f: getattr(Config(), f) for f in names}, **(defaults or {})}
    for name in names:
        flags = ['--epochs', '--epoch'] if name == 'epochs' else ['--' + name]
        parser.add_argument(*flags, dest=name, default=d[name], **specs[name])


def make_parser():
    p = utils.ArgumentParser(
        prog='train.py', description='Train a VAE with a learned, optimal or fixed decoder '
                                     'variance (sigma-VAE).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_flags(p)
    return p


def parse_args(argv=None):
    """Command-line arguments -> a checked Config; bad values exit with status 2."""
    parser = make_parser()
    config = Config(**vars(parser.parse_args(argv)))
    try:
        config.check()
    except UsageError as e:
        parser.error(str(e))
    return config


# ---- devices ---------------------------------------------------------------------

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


# ---- the trainer -----------------------------------------------------------------

class Trainer:
    """Model, optimizer, checkpoints and the compiled steps of one run.

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
            self.vae = run_folder.make_vae(config, self.strategy.num_replicas_in_sync > 1)
            self.optimizer = keras.optimizers.Adam(config.lr)
            if config.mixed_precision == 'float16':  # bfloat16 has float32's range: no scaling
                self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)
            self.optimizer.build(self.vae.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
            self.train_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
            self.skipped_updates = tf.Variable(0, dtype=tf.int64, trainable=False,
                                               name='skipped_updates')
            # The sum and count of each training metric since the last metrics row, checkpointed
            # by name so that a row's train averages cover its whole epoch across resumes.
            self.train_sums = {k: tf.Variable(tf.zeros(2, tf.float64), trainable=False, name=k)
                               for k in losses.METRICS}
        worker = getattr(getattr(self.strategy, 'cluster_resolver', None), 'task_id', 0)
        self.checkpoints = run_folder.Checkpoints(
            config.run_dir, dict(vae=self.vae, optimizer=self.optimizer, step=self.step,
                                 epoch=self.epoch, train_seconds=self.train_seconds),
            self.train_sums, self.chief, worker, dict(skipped_updates=self.skipped_updates))
        # The fixed z of the sample grids (run_folder.prior_z): the same z in every grid.
        self.prior_z = run_folder.prior_z(run_folder.NUM_SAMPLES, self.vae.z_dim, config.seed)
        self.evaluate = models.Evaluator(self.vae, config.beta, config.seed)
        self.update = tf.function(self._update, jit_compile=config.xla)
        self.train_step = tf.function(self._train_step)

    def restore(self):
        """Restores the newest checkpoint that restores (see run_folder.Checkpoints.restore);
        returns its path, or None. The learning rate is the one given now, not the saved one."""
        path = self.checkpoints.restore(self.config.restart)
        if path:
            self.optimizer.learning_rate.assign(self.config.lr)
        else:
            self.reset_train_means()
        return path

    def save(self):
        return self.checkpoints.save(int(self.step.numpy()), self.vae.weights)

    def train_means(self):
        """The means of the training metrics since the last metrics row (a host sync)."""
        return {k: float(v[0]) / max(float(v[1]), 1.0)
                for k, v in ((k, s.numpy()) for k, s in self.train_sums.items())}

    def reset_train_means(self):
        for s in self.train_sums.values():
            s.assign(tf.zeros_like(s))

    def _gradients(self, x):
        """This replica's part x (b, S, S, C) of the global batch -> (metrics of the global
        batch, the same on every replica; this replica's gradients, scaled under float16)."""
        vae, config = self.vae, self.config
        with tf.GradientTape() as tape:
            eps = models.replica_noise((tf.shape(x)[0], vae.z_dim), config.seed, self.step)
            params, mu, log_var = vae(x, eps, training=True)
            loss, stats = losses.vae_loss(
                vae.likelihood, x, params, mu, log_var,
                losses.kl_weight(config.beta, self.step, config.kl_warmup),
                losses.replica_mean, losses.replica_batch(x), free_bits=config.free_bits,
                groups=vae.groups)
            scaled = self.optimizer.scale_loss(loss)
        return stats, tape.gradient(scaled, vae.trainable_variables)

    def _update(self, x):
        """One Adam step on this replica's part x (b, S, S, C) of the global batch.

        Returns the metrics of the global batch (the same on every replica).
        """
        stats, gradients = self._gradients(x)
        self.optimizer.apply_gradients(zip(gradients, self.vae.trainable_variables))
        return stats

    def _apply(self, gradients):
        self.optimizer.apply_gradients(zip(gradients, self.vae.trainable_variables))

    def gradient_norm(self, gradients):
        """The global norm of the global batch's gradient, from this replica's share (one
        all-reduce of the gradients); unscaled under float16 loss scaling."""
        total = tf.distribute.get_replica_context().all_reduce('sum', gradients)
        norm = tf.linalg.global_norm(total)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            norm = norm / tf.cast(self.optimizer.dynamic_scale, norm.dtype)
        return norm

    def _skipping_step(self, x):
        """The update of one step unless its gradient norm is above --skip_threshold (vdvae);
        a skipped one changes nothing but skipped_updates. The choice is made outside the
        replicas (a cond around the optimizer's merge_call is not allowed within them).
        A non-finite norm under float16 loss scaling goes to the optimizer, which lowers
        the scale."""
        def replica(x):
            stats, gradients = self._gradients(x)
            return stats, gradients, self.gradient_norm(gradients)

        per_replica, gradients, norm = self.strategy.run(replica, args=(x,))
        norm = self.strategy.experimental_local_results(norm)[0]
        skip = norm > self.config.skip_threshold
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            skip = tf.logical_and(skip, tf.math.is_finite(norm))

        def apply():
            self.strategy.run(self._apply, args=(gradients,))
            return tf.constant(0, tf.int64)

        self.skipped_updates.assign_add(tf.cond(skip, lambda: tf.constant(1, tf.int64), apply))
        return per_replica

    def _train_step(self, x):
        """One step on a (distributed) global batch; summaries are the chief's."""
        if self.config.skip_threshold is None:
            per_replica = self.strategy.run(self.update, args=(x,))
        else:
            per_replica = self._skipping_step(x)
        stats = {k: self.strategy.experimental_local_results(v)[0] for k, v in per_replica.items()}
        self.step.assign_add(1)
        for name, value in stats.items():
            self.train_sums[name].assign_add(tf.stack([tf.cast(value, tf.float64), tf.constant(1.0, tf.float64)]))
            if self.chief:
                tf.summary.scalar('train/' + name, value, step=self.step)
        return stats

    def write_images(self, recon_inputs):
        """The 10x10 grids of prior samples (the fixed z) and of test images beside their
        reconstructions, as PNGs named by step and as TensorBoard images (images/samples,
        images/reconstructions) when a default summary writer is set."""
        step = int(self.step.numpy())
        folder = os.path.join(self.config.run_dir, run_folder.IMAGES)
        os.makedirs(folder, exist_ok=True)
        data_range = self.config.data_range
        samples = data.to_uint8(self.vae.decode(self.prior_z), data_range)
        pairs = utils.side_by_side(data.to_uint8(recon_inputs, data_range),
                                   data.to_uint8(self.vae.reconstruct(recon_inputs), data_range))
        for name, images in (('samples', samples), ('reconstructions', pairs)):
            grid = utils.image_grid(images, 10, 10)
            utils.save_png(os.path.join(folder, f'{name}_{step:08d}.png'), grid)
            tf.summary.image('images/' + name, grid[None], step=step)  # no-op without a writer


def check_memory(config):
    """Refuses a --z_dim whose dense layers alone need more than this machine's memory, at 6
    float32 copies of each weight: the weights, their gradients, Adam's two moments, the
    initial values and the copy of a checkpoint being written."""
    needed = 6 * 4 * models.latent_weights(config.image_size, config.z_dim, config.arch,
                                           config.width, config.depth)
    memory = run_folder.physical_memory()
    if memory and needed > memory:
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


# ---- the loop --------------------------------------------------------------------

def train(config):
    """Trains (or resumes) the run that `config` describes; returns the last metrics row.

    Raises UsageError (bad input, exit status 2), RunFailed (exit status 1), or SystemExit
    with status 130 / 143 after Ctrl-C / SIGTERM.
    """
    config.check()
    with utils.private_tempdir():  # nothing is left in $TMPDIR, even after a SIGKILL
        strategy = make_strategy(config.strategy)  # first: multi-worker starts before other ops
        keras.mixed_precision.set_dtype_policy(POLICIES[config.mixed_precision])
        try:
            return _train(config, strategy)
        except OSError as e:  # e.g. a full disk while writing images or metrics
            raise utils.RunFailed(f"cannot write {e.filename or 'into ' + config.run_dir}: "
                                  f"{e.strerror or e}") from None
        finally:
            keras.mixed_precision.set_dtype_policy('float32')


def _train(config, strategy):
    chief = is_chief(strategy)
    lock = run_folder.FolderLock(config.run_dir, 'train.py')
    if chief:
        lock.check()  # fail at once, not after loading the data
    # Everything is checked before anything is written: the data, the run folder's config.
    splits = run_folder.load_splits(config, *run_folder.saved_data_identity(config.run_dir))
    config.channels, config.data_fingerprint = splits.channels, splits.fingerprint
    steps_per_epoch = splits.num_train // config.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f'{splits.source} has {splits.num_train} training images, '
                         f'fewer than one batch of {config.batch_size}')
    changes = run_folder.check_resume(config)
    if changes and chief:
        print(f"resuming with {', '.join(changes)}: the steps from here on use the new "
              f"value (config.json records it)", file=sys.stderr)
    trainer = make_trainer(config, strategy)
    with contextlib.ExitStack() as stack:
        if chief:
            try:
                os.makedirs(config.run_dir, exist_ok=True)
                stack.enter_context(lock)
                run_folder.check_resume(config)  # again: another process may have written it meanwhile
                utils.remove_temporary_files(config.run_dir)
            except OSError as e:
                raise UsageError(f'cannot write to {config.run_dir}: {e.strerror}') from None
        interrupts = stack.enter_context(utils.Interrupts())
        try:
            return _run(config, strategy, trainer, splits, steps_per_epoch, interrupts)
        except utils.Interrupted as e:  # before the loop, or after its own handling
            print(f'interrupted ({e}) at step {int(trainer.step.numpy())}; '
                  f'{trainer.checkpoints.last_checkpoint()}', file=sys.stderr)
            raise SystemExit(e.status) from None


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
    with interrupts.held():  # a consistent folder before anything else
        restored = trainer.restore()
        step = int(trainer.step.numpy())
        if chief:
            run_folder.write_config(config)
        rows = run_folder.resume_rows(config.run_dir, step, chief)

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
    writer = (tf.summary.create_file_writer(os.path.join(config.run_dir, run_folder.LOGS))
              if chief else tf.summary.create_noop_writer())
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
                                       save=False)
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
                                               steps_per_epoch)
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
                  f'the last checkpoint is {trainer.checkpoints.latest()}', file=sys.stderr)
        else:
            # Further signals are ignored until this save is complete (utils.Interrupts).
            if trainer.checkpoints.saved_step != step:
                trainer.epoch.assign(step // steps_per_epoch)
                trainer.save()
            print(f'interrupted at step {step}; saved {trainer.checkpoints.latest()}',
                  file=sys.stderr)
        raise SystemExit(e.status) from None
    finally:
        if bar is not None:
            bar.close()
        writer.flush()
    return row


BITS_PER_VALUE = 8  # a uniform guess over the 256 values of a pixel


def format_row(row):
    """A metrics row on one line: the step, then the test metrics. A test figure of the 8-bit
    values above 8 bits/dim (worse than a uniform guess) is flagged: early in training it comes
    from batch norm's moving statistics, which lag the weights, not from the model, and
    evaluate.py (which recomputes them) measures it."""
    keys = ['step', 'epoch'] + [k for k in row if k.startswith('test_')]
    line = ' '.join(f'{k} {row[k]:.5g}' if isinstance(row[k], float) else f'{k} {row[k]}'
                    for k in keys)
    if row.get('test_bits_per_dim_discrete', 0) > BITS_PER_VALUE:
        line += (f' (above {BITS_PER_VALUE} bits/dim: batch norm\'s moving statistics lag the '
                 f'weights; evaluate.py measures)')
    return line


def end_of_epoch(trainer, test_ds, recon_inputs, step, steps_per_epoch, save=True):
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
    if trainer.config.skip_threshold is not None or int(trainer.skipped_updates.numpy()):
        row['skipped_updates'] = int(trainer.skipped_updates.numpy())
    row.update(trainer.evaluate(test_ds))
    for key, value in row.items():
        if key.startswith('test_'):
            tf.summary.scalar('test/' + key[5:], value, step=step)
    trainer.write_images(recon_inputs)
    run_folder.append_row(trainer.config.run_dir, row)
    trainer.reset_train_means()
    if save:
        trainer.save()
    return row


def check_finite(stats, step, trainer):
    bad = [k for k, v in stats.items() if not np.isfinite(float(v))]
    if bad:
        raise Diverged(f"training diverged at step {step}: {', '.join(bad)} not finite; "
                       + trainer.checkpoints.last_good())


def main(argv=None):
    return utils.run_command('train.py', parse_args, train, argv)


if __name__ == '__main__':
    sys.exit(main())

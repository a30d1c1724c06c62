"""Training a run: the Trainer (a run's model, optimizer, checkpoints and compiled step), the
loop (resume, steps, the end of each epoch, interrupts) and the devices (tf.distribute).

train(config) trains (or resumes) the run folder <output_dir>/<experiment_name>/ that config
describes (run_folder.py): config.json, checkpoints/, logs/ (TensorBoard), images/ (prior
samples and reconstructions, named by step) and metrics.jsonl (one row per epoch).
"""
import contextlib
import json
import os
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import checkpoints
import config as settings
import data
import files
import image_folders
import losses
import models
import priors
import run_folder
import utils
from checkpoints import Diverged
from utils import UsageError

# --mixed_precision -> Keras dtype policy
POLICIES = {None: 'float32', 'float16': 'mixed_float16', 'bfloat16': 'mixed_bfloat16'}
NUM_RECONSTRUCTIONS = 50  # test images, shown beside their reconstructions in a 10x10 grid
REFRESH_EVERY = 10  # steps between progress-bar updates (each one waits for the device)
SKIP_WINDOW = 50  # steps: a run whose updates were all skipped over as many stops


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
            self.vae = models.make_vae(config, self.strategy.num_replicas_in_sync > 1)
            self.optimizer = models.make_optimizer(config)
            self.optimizer.build(self.vae.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name='epoch')
            self.train_seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False)
            self.skipped_updates = tf.Variable(0, dtype=tf.int64, trainable=False,
                                               name='skipped_updates')
            # The smallest and largest gradient norm since the Loop last read them (not saved).
            self.norm_range = tf.Variable([np.inf, 0.0], trainable=False, name='norm_range')
            # The sum and count of each training metric since the last metrics row, checkpointed
            # by name so that a row's train averages cover its whole epoch across resumes.
            self.train_sums = {k: tf.Variable(tf.zeros(2, tf.float64), trainable=False, name=k)
                               for k in losses.METRICS}
        worker = getattr(getattr(self.strategy, 'cluster_resolver', None), 'task_id', 0)
        self.checkpoints = checkpoints.Checkpoints(
            config.run_dir, dict(vae=self.vae, optimizer=self.optimizer, step=self.step,
                                 epoch=self.epoch, train_seconds=self.train_seconds),
            self.train_sums, self.chief, worker, dict(skipped_updates=self.skipped_updates))
        # The fixed z of the sample grids (priors.prior_z): the same z in every grid.
        self.prior_z = priors.prior_z(run_folder.NUM_SAMPLES, self.vae.z_dim, config.seed)
        self.update = tf.function(self._update, jit_compile=config.xla)
        self.train_step = tf.function(self._train_step)

    def restore(self):
        """Restores the newest checkpoint that restores (see checkpoints.Checkpoints.restore);
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
        with tf.GradientTape() as tape:
            loss, stats = self.vae.objective(x, self.step)
            scaled = self.optimizer.scale_loss(loss)
        return stats, tape.gradient(scaled, self.vae.trainable_variables)

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
        low, high = self.norm_range[0], self.norm_range[1]
        self.norm_range.assign(tf.stack([tf.minimum(low, norm), tf.maximum(high, norm)]))
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
        images/reconstructions) when a default summary writer is set; of the weights as they
        are (the caller puts in the average with --ema: models.averaged)."""
        step = int(self.step.numpy())
        folder = os.path.join(self.config.run_dir, run_folder.IMAGES)
        os.makedirs(folder, exist_ok=True)
        data_range = self.config.data_range
        samples = data.to_uint8(self.vae.decode(self.prior_z), data_range)
        recons = data.to_uint8(self.vae.reconstruct(recon_inputs), data_range)
        pairs = utils.side_by_side(data.to_uint8(recon_inputs, data_range), recons)
        for name, images in (('samples', samples), ('reconstructions', pairs)):
            grid = utils.image_grid(images, 10, 10)
            files.save_png(os.path.join(folder, f'{name}_{step:08d}.png'), grid)
            tf.summary.image('images/' + name, grid[None], step=step)  # no-op without a writer


def make_trainer(config, strategy):
    """The Trainer, or UsageError if its model does not fit in memory."""
    models.check_memory(config, copies=6)
    try:
        return Trainer(config, strategy)
    except (tf.errors.ResourceExhaustedError, MemoryError) as e:
        raise UsageError(f'the model of --z_dim {config.z_dim} does not fit in memory '
                         f'({utils.error_reason(e)[:120]}); use a smaller --z_dim') from None


def check_resume(config):
    """Refuses (UsageError) to resume a run folder's checkpoints with another value of a setting
    that config.py declares MODEL, or when its config.json is damaged. Reads only. Returns the
    changes of OBJECTIVE settings ('--beta 1.0 -> 0.5'), which a resume accepts."""
    path = os.path.join(config.run_dir, run_folder.CONFIG_FILE)
    folder = checkpoints.checkpoint_dir(config.run_dir)
    if not checkpoints.CheckpointFolder(folder).any():
        rows = run_folder.read_metrics(config.run_dir)
        if rows and not config.restart:
            raise UsageError(
                f"{config.run_dir} holds metrics rows up to step {rows[-1]['step']} but no checkpoint "
                f"in {folder}: put the checkpoints back, or start over with --restart (the rows "
                f"are dropped)")
        return []
    if not os.path.exists(path):
        raise UsageError(f'{config.run_dir} holds checkpoints but no {run_folder.CONFIG_FILE}, which '
                         f'says what they are a model of: put it back, or delete the run folder')
    return settings.resume_changes(run_folder.read_config_file(path), config)


# ---- the loop --------------------------------------------------------------------

def train(config):
    """Trains (or resumes) the run that `config` describes; returns the last metrics row.

    Raises UsageError (bad input, exit status 2), RunFailed (exit status 1), or SystemExit
    with status 130 / 143 after Ctrl-C / SIGTERM.
    """
    config.check()
    with files.private_tempdir():  # nothing is left in $TMPDIR, even after a SIGKILL
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
        run_folder.check_run_folder(config.run_dir)  # the tool writes only into its own folders
        lock.check()  # fail at once, not after loading the data
    # Everything is checked before anything is written: the data, the run folder's config.
    saved = run_folder.saved_config(config.run_dir)
    splits = data.load_run_data(config, saved and saved.data_fingerprint, saved and saved.channels)
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
    loop = Loop(trainer, splits, steps_per_epoch)  # an empty test split is refused here
    with contextlib.ExitStack() as stack:
        if chief:
            try:
                os.makedirs(config.run_dir, exist_ok=True)
                stack.enter_context(lock)
                run_folder.check_run_folder(config.run_dir)  # again: after another process, too
                check_resume(config)
                files.mark_folder(config.run_dir, 'a run folder')
                files.remove_temporary_files(config.run_dir,
                                             os.path.join(config.run_dir, run_folder.IMAGES))
            except OSError as e:
                raise UsageError(f'cannot write to {config.run_dir}: {e.strerror}') from None
        loop.interrupts = stack.enter_context(utils.Interrupts())
        try:
            return loop.run()
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


class Loop:
    """The steps of a run, from its newest checkpoint to its last step (config's --epochs or
    --max_steps): the step (`steps`), the end of each epoch (test metrics, grids, a metrics row,
    a checkpoint: `end_of_epoch`), the start (`resume`) and an interrupt (`interrupted`: a
    checkpoint of the step reached)."""

    def __init__(self, trainer, splits, steps_per_epoch):
        self.trainer, self.config, self.splits = trainer, trainer.config, splits
        self.steps_per_epoch, self.interrupts = steps_per_epoch, None  # interrupts: run()'s
        config = self.config
        self.train_ds = data.make_pipeline(splits.train, config.image_size, config.batch_size,
                                           shuffle_seed=config.seed, data_range=config.data_range)
        self.test_ds = data.make_pipeline(splits.test, config.image_size, config.batch_size,
                                          drop_remainder=False, data_range=config.data_range)
        try:
            self.recon_inputs = next(iter(self.test_ds.unbatch().batch(NUM_RECONSTRUCTIONS)))
        except StopIteration:
            raise UsageError(f'the test split of {splits.source} ({splits.num_test} files) gives '
                             f'no image: {unreadable()}') from None
        self.skipped = len(image_folders.skipped_files())  # said at each epoch's end when it grows
        self.window = None  # (step, skipped updates) where check_skipping's window starts
        self.total = config.epochs * steps_per_epoch
        if config.max_steps:
            self.total = min(self.total, config.max_steps)
        self.row, self.bar = None, None  # the last metrics row; the progress bar
        self.clock = TrainClock(trainer.train_seconds)

    def run(self):
        """Trains to the last step; returns the last metrics row."""
        trainer = self.trainer
        step = self.resume()
        writer = (tf.summary.create_file_writer(os.path.join(self.config.run_dir, run_folder.LOGS))
                  if trainer.chief else tf.summary.create_noop_writer())
        try:
            with writer.as_default():
                if self.row is not None and self.row['step'] == step:
                    trainer.reset_train_means()  # the checkpoint may predate the row's reset
                elif step and (step % self.steps_per_epoch == 0 or step == self.total):
                    # An interrupt just before the epoch's end was handled saved it without its row.
                    with self.interrupts.held():
                        self.end_of_epoch(step, save=False)
                if step >= self.total:
                    print(f'nothing to do: step {step} of {self.total} reached (raise --epochs or '
                          f'--max_steps)')
                    return self.row
                self.clock.start()
                self.started = step
                self.steps(step)
        except utils.Interrupted as e:
            self.clock.stop()  # the time since the last checkpoint counts too
            self.interrupted(e)
        finally:
            if self.bar is not None:
                self.bar.close()
            writer.flush()
        return self.row

    def resume(self):
        """Restores the newest checkpoint and the metrics rows up to it; says where the run
        stands. Returns the step restored (0 for a new run)."""
        trainer, config, splits = self.trainer, self.config, self.splits
        with self.interrupts.held():  # a consistent folder before anything else
            restored = trainer.restore()
            step = int(trainer.step.numpy())
            if trainer.chief:
                run_folder.write_config(config)
            rows = run_folder.resume_rows(config.run_dir, step, trainer.chief)
        self.row = rows[-1] if rows else None
        print(f'{splits.source}: {splits.num_train} train / {splits.num_test} test images, '
              f'{splits.channels} channel(s) at {config.image_size}x{config.image_size}; '
              f'{self.steps_per_epoch} steps per epoch; model {config.model}, '
              f'{trainer.vae.count_params()} parameters; '
              f'{trainer.strategy.num_replicas_in_sync} replica(s); run folder {config.run_dir}'
              + (f'; the test metrics and grids use the moving average of the weights (--ema '
                 f'{config.ema})' if config.ema is not None else ''), flush=True)
        if restored:
            print(f'resumed from {restored} at step {step}, epoch '
                  f'{step / self.steps_per_epoch:.2f}', flush=True)
        return step

    def steps(self, step):
        """The steps after `step`: the rest of its epoch (a fresh shuffle after a resume), then
        whole epochs; a checkpoint at each epoch's end and every --checkpoint_every steps."""
        trainer, config, per_epoch = self.trainer, self.config, self.steps_per_epoch
        batches = iter(trainer.strategy.experimental_distribute_dataset(
            self.train_ds.take(per_epoch - step % per_epoch).concatenate(self.train_ds.repeat())))
        self.window = (step, int(trainer.skipped_updates.numpy()))
        self.bar = utils.progress(show=trainer.chief, total=self.total, initial=step, unit='step',
                                  dynamic_ncols=True, desc=config.experiment_name)
        for step in range(step + 1, self.total + 1):
            try:
                batch = next(batches)
            except (StopIteration, tf.errors.OutOfRangeError):
                self.ran_out(step - 1)
            stats = trainer.train_step(batch)
            self.bar.update(1)
            end = step % per_epoch == 0 or step == self.total
            save = end or (config.checkpoint_every and step % config.checkpoint_every == 0)
            if step % REFRESH_EVERY == 0 or save:
                check_finite(stats, step, trainer)
                self.check_skipping(step)
                self.bar.set_postfix({k: f'{v:.4g}' for k, v in trainer.train_means().items()
                                      if k in ('loss', 'rec', 'kl', 'log_sigma')})
            if step % config.sample_every == 0 and trainer.chief:
                with models.averaged(trainer.vae, trainer.optimizer):  # with --ema (as trained)
                    trainer.write_images(self.recon_inputs)
            if save:
                self.clock.stop()
                with self.interrupts.held():  # an epoch's end is evaluated and saved whole
                    trainer.epoch.assign(step // per_epoch)
                    if end:
                        self.end_of_epoch(step)
                    else:
                        trainer.save()
                self.clock.start()

    def check_skipping(self, step):
        """Stops the run (RunFailed, in one line) when every update of the last SKIP_WINDOW
        steps (or of all the steps this process takes, if fewer) was skipped: --skip_threshold
        below every gradient norm, training does nothing. Names the norms it saw."""
        if self.config.skip_threshold is None:
            return
        skipped = int(self.trainer.skipped_updates.numpy())
        first, skipped_before = self.window
        span = min(SKIP_WINDOW, self.total - self.started)
        if step - first < span:
            return
        if skipped - skipped_before == step - first:
            low, high = self.trainer.norm_range.numpy()
            raise utils.RunFailed(
                f'every update of the last {step - first} steps was skipped: their gradient '
                f'norms were {low:.3g} to {high:.3g}, above --skip_threshold '
                f'{self.config.skip_threshold:g} (docs/networks.md gives typical norms); raise '
                f'it, or leave it out; {self.trainer.checkpoints.last_checkpoint()}')
        self.window = (step, skipped)
        self.trainer.norm_range.assign([np.inf, 0.0])

    def end_of_epoch(self, step, save=True):
        """Evaluates, writes grids and a metrics row (the chief), then checkpoints (every worker).

        The caller holds signals off for all of it (a few seconds): were an interrupt to save
        the epoch's end without its row, the resume would evaluate it again, and a run
        interrupted more often than an evaluation takes would never get past that epoch's end.
        """
        trainer = self.trainer
        if trainer.chief:
            row = {'step': step, 'epoch': round(step / self.steps_per_epoch, 4),
                   'wall_time': time.time(),
                   'train_seconds': round(float(trainer.train_seconds.numpy()), 2)}
            row.update({'train_' + k: v for k, v in trainer.train_means().items()})
            if self.config.skip_threshold is not None or int(trainer.skipped_updates.numpy()):
                row['skipped_updates'] = int(trainer.skipped_updates.numpy())
            # With --ema the average, and the statistics of training recomputed for it (as
            # evaluate.py's): optimal's sigma and batch norm's of the weights trained are not its.
            with models.averaged(trainer.vae, trainer.optimizer,
                                 checkpoints.statistics_batches(self.config, self.splits),
                                 self.config.seed, checkpoints.STATISTICS_BATCHES):
                row.update(trainer.vae.test_metrics(self.test_ds, self.config.seed))
                trainer.write_images(self.recon_inputs)
            for key, value in row.items():
                if key.startswith('test_'):
                    tf.summary.scalar('test/' + key[5:], value, step=step)
            run_folder.append_row(self.config.run_dir, row)
            trainer.reset_train_means()
            self.row = row
            say = self.bar.write if self.bar is not None else print
            say(format_row(row))
            if len(image_folders.skipped_files()) > self.skipped:
                self.skipped = len(image_folders.skipped_files())
                say(f'warning: {unreadable()}', file=sys.stderr)
        if save:
            trainer.save()

    def ran_out(self, step):
        """The training split gives no more batches (its files vanished or became unreadable):
        saves the step reached and stops in one line (RunFailed)."""
        trainer = self.trainer
        if self.bar is not None:
            self.bar.close()
        if step and trainer.checkpoints.saved_step != step:
            trainer.epoch.assign(step // self.steps_per_epoch)
            trainer.save()
        raise utils.RunFailed(f'the training split of {self.splits.source} gives no more batches '
                              f'of {self.config.batch_size} after step {step}: {unreadable()}; '
                              f'{trainer.checkpoints.last_checkpoint()}')

    def interrupted(self, e):
        """Ctrl-C or SIGTERM: saves the step reached (further signals are ignored until the save
        is complete: utils.Interrupts) and exits with the signal's status."""
        trainer = self.trainer
        if self.bar is not None:
            self.bar.close()
        step = int(trainer.step.numpy())
        if self.config.strategy == 'multi_worker':  # saving is collective: the others would hang
            print(f'interrupted at step {step}; not saved under multi_worker, '
                  f'the last checkpoint is {trainer.checkpoints.latest()}', file=sys.stderr)
        else:
            if trainer.checkpoints.saved_step != step:
                trainer.epoch.assign(step // self.steps_per_epoch)
                trainer.save()
            print(f'interrupted at step {step}; saved {trainer.checkpoints.latest()}',
                  file=sys.stderr)
        raise SystemExit(e.status) from None


BITS_PER_VALUE = 8  # a uniform guess over the 256 values of a pixel


def format_row(row):
    """A metrics row on one line: the step, then the test metrics. A test figure of the 8-bit
    values above 8 bits/dim (worse than a uniform guess) is flagged: early in training it comes
    from batch norm's moving statistics, which lag the weights, not from the model, and
    evaluate.py (which recomputes them) measures it."""
    keys = ['step', 'epoch'] + [k for k in row if k.startswith('test_')] + [
        k for k in ('skipped_updates',) if row.get(k)]
    line = ' '.join(f'{k} {row[k]:.5g}' if isinstance(row[k], float) else f'{k} {row[k]}'
                    for k in keys)
    if row.get('test_bits_per_dim_discrete', 0) > BITS_PER_VALUE:
        line += (f' (above {BITS_PER_VALUE} bits/dim: batch norm\'s moving statistics lag the '
                 f'weights; evaluate.py measures)')
    return line


def unreadable():
    """What the streams of this process could not read: 'N image files could not be read, e.g.
    A, B, C'."""
    files = image_folders.skipped_files()
    if not files:
        return 'its image files could not be read'
    return f"{len(files)} image file(s) could not be read, e.g. {', '.join(files[:3])}"


def check_finite(stats, step, trainer):
    bad = [k for k, v in stats.items() if not np.isfinite(float(v))]
    if bad:
        raise Diverged(step, f"{', '.join(bad)} not finite", trainer.checkpoints.last_good())

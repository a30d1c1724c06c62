"""Training throughput on a shared, noisy machine: steps in memory and the whole command.

python benchmarks/bench_train.py [--repeats 5] [--steps 20] [--cli_repeats 3]

1. Steps on tensors in memory. For each model, batch size, XLA setting and precision
   (float32, bfloat16) it times --steps training steps, --repeats times. The repeats of all
   settings are interleaved (round robin), and each timing is preceded by a burst of matrix
   products in the setting's precision, so that every model figure has a peak measured
   seconds before it: the share of matmul is the median of these paired ratios. It also
   reports the share against the highest peak seen in the whole run, and how far repeats
   disagree (min-max). FLOPs are counted from the layer shapes (training = 3 x forward).
2. The whole command on real Fashion-MNIST: `train.py --epochs 1` in its own process, with
   progress bar, summaries and checkpoint, float32 and bfloat16 alternating, --cli_repeats
   times each; images/s from the run's own train_seconds, its one-epoch training bits/dim,
   the test bits/dim its metrics row gives (batch norm's moving statistics: training's running
   check) and the test figures evaluate.py would give (statistics recomputed, float32).
"""
import argparse
import fcntl
import json
import os
import pty
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import utils  # first: TensorFlow starts quietly
utils.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import run_folder  # noqa: E402
import train  # noqa: E402

PEAK_SIZE = 2048  # the matmul burst: n x n times n x n


def forward_flops(model):
    """Multiply-adds x 2 of the Conv2D, Conv2DTranspose and Dense layers of a Keras model, per image."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):
            k = np.prod(layer.kernel_size)
            _, h, w, c_in = layer.input.shape  # each input value is spread over k x c_out outputs
            total += 2 * k * c_in * layer.filters * h * w
        elif isinstance(layer, keras.layers.Conv2D):
            k = np.prod(layer.kernel_size)
            _, h, w, c_out = layer.output.shape
            total += 2 * k * layer.input.shape[-1] * c_out * h * w
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)


class MatmulPeak:
    """A short burst of compiled n x n matmuls in one dtype -> GFLOP/s."""

    def __init__(self, dtype, n=PEAK_SIZE):
        self.n = n
        self.a, self.b = (tf.cast(tf.random.normal((n, n)), dtype) for _ in range(2))
        self.mm = tf.function(lambda a, b: tf.reduce_sum(tf.cast(tf.matmul(a, b), tf.float32)))
        self.mm(self.a, self.b).numpy()

    def __call__(self, reps=4):
        start = time.perf_counter()
        for _ in range(reps):
            out = self.mm(self.a, self.b)
        out.numpy()
        return 2 * self.n ** 3 * reps / (time.perf_counter() - start) / 1e9


def make_step(model, precision, batch, xla, channels=1):
    """A Trainer's compiled update and its batches, built under the precision's policy."""
    precision = None if precision == 'float32' else precision
    config = run_folder.Config(model=model, batch_size=batch, xla=xla, mixed_precision=precision,
                          channels=channels, output_dir=tempfile.gettempdir(),
                          experiment_name='bench')
    keras.mixed_precision.set_dtype_policy(train.POLICIES[precision])
    try:
        trainer = train.Trainer(config)
    finally:
        keras.mixed_precision.set_dtype_policy('float32')
    rng = np.random.default_rng(0)
    batches = [tf.constant(np.round(rng.uniform(0, 255, (batch, 28, 28, channels))) / 127.5 - 1,
                           tf.float32) for _ in range(4)]
    for x in batches:  # trace and warm up
        trainer.update(x)
    float(trainer.update(batches[0])['loss'])
    flops = 3 * (forward_flops(trainer.vae.encoder) + forward_flops(trainer.vae.decoder))
    return trainer.update, batches, flops


def time_steps(step, batches, steps):
    start = time.perf_counter()
    for i in range(steps):
        stats = step(batches[i % len(batches)])
    float(stats['loss'])  # wait for the device
    return (time.perf_counter() - start) / steps


def spread(values):
    return f'{min(values):.0f}-{max(values):.0f}'


def bench_steps(args):
    peaks = {p: MatmulPeak(tf.bfloat16 if p == 'bfloat16' else tf.float32) for p in args.precisions}
    settings = [(m, p, b, x) for m in args.models for b in args.batches for x in args.xla
                for p in args.precisions]
    print(f'building and tracing {len(settings)} settings ...', flush=True)
    built = {s: make_step(*s) for s in settings}
    seen = {s: [] for s in settings}  # (images/s, peak GFLOP/s just before)
    peaks_seen = {p: [] for p in peaks}
    for r in range(args.repeats):
        print(f'repeat {r + 1}/{args.repeats}', flush=True)
        for s in settings:
            step, batches, flops = built[s]
            peak = peaks[s[1]]()
            peaks_seen[s[1]].append(peak)
            seen[s].append((s[2] / time_steps(step, batches, args.steps), peak))
    for p, values in peaks_seen.items():
        print(f'\n{p} matmul ({PEAK_SIZE}², tf.function), {len(values)} bursts: median '
              f'{statistics.median(values):.1f}, min {min(values):.1f}, max {max(values):.1f} GFLOP/s')
    header = ('model', 'precision', 'batch', 'XLA', 'images/s (median)', 'repeats min-max',
              'MFLOP/image', 'GFLOP/s', 'of paired matmul', 'of best matmul')
    print('\n| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
    for s in settings:
        model, precision, batch, xla = s
        flops = built[s][2]
        ips = [i for i, _ in seen[s]]
        paired = statistics.median(i * flops / 1e9 / peak for i, peak in seen[s])
        median = statistics.median(ips)
        gflops = median * flops / 1e9
        best = max(peaks_seen[precision])
        print(f'| {model} | {precision} | {batch} | {"on" if xla else "off"} | '
              f'{median:.0f} | {spread(ips)} | {flops / 1e6:.1f} | {gflops:.1f} | {paired:.0%} | '
              f'{gflops / best:.0%} |', flush=True)


def run_cli(model, precision, output_dir, name):
    """One epoch of the real training command, its progress bar drawn on a terminal (a
    pseudo-terminal read by a thread) as a user sees it; its last metrics row."""
    argv = [sys.executable, os.path.join(REPO, 'train.py'), '--model', model, '--dataset',
            'fashion_mnist', '--epochs', '1', '--output_dir', output_dir, '--experiment_name', name]
    if precision:
        argv += ['--mixed_precision', precision]
    terminal, child = pty.openpty()
    # A terminal 120 columns wide: on one of width 0 (a new pseudo-terminal's) tqdm draws nothing.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 120, 0, 0))
    screen = []
    reader = threading.Thread(target=_read_all, args=(terminal, screen), daemon=True)
    reader.start()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=child)
    os.close(child)
    reader.join(timeout=5)
    if proc.returncode:
        raise SystemExit(f'{" ".join(argv)} failed:\n{b"".join(screen)[-2000:].decode(errors="replace")}')
    with open(os.path.join(output_dir, name, 'metrics.jsonl')) as f:
        return json.loads(f.read().splitlines()[-1])


def evaluate_test(run_dir):
    """The test metrics of a run as evaluate.py computes them (run_folder.load_model: batch norm
    statistics recomputed under the final weights; float32 whatever the training precision)."""
    config, vae, state = run_folder.load_model(run_dir)
    test_ds = data.make_pipeline(state.splits.test, config.image_size, config.batch_size,
                                 drop_remainder=False, data_range=config.data_range)
    return models.Evaluator(vae, config.beta, config.seed)(test_ds)


def _read_all(fd, chunks):
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # the terminal's other end closed
            return
        if not data:
            return
        chunks.append(data)


def bench_cli(args):
    print(f'\nthe whole command: train.py --dataset fashion_mnist --epochs 1 (937 steps of 64), '
          f'{args.cli_repeats} x each precision, alternating', flush=True)
    header = ('model', 'precision', 'repeat', 'images/s', 'train bits/dim',
              'test bits/dim (row)', 'test bits/dim', 'test 8-bit bits/dim', 'test MSE')
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    ratios = {m: [] for m in args.cli_models}
    with tempfile.TemporaryDirectory() as out:
        for model in args.cli_models:
            for r in range(args.cli_repeats):
                ips = {}
                for precision in args.precisions:
                    name = f'{model}_{precision}_{r}'
                    row = run_cli(model, precision if precision != 'float32' else None, out, name)
                    ips[precision] = row['step'] * 64 / row['train_seconds']
                    test = evaluate_test(os.path.join(out, name))
                    lines.append(f"| {model} | {precision} | {r + 1} | {ips[precision]:.0f} | "
                                 f"{row['train_bits_per_dim']:.3f} | {row['test_bits_per_dim']:.3f} | "
                                 f"{test['test_bits_per_dim']:.3f} | "
                                 f"{test['test_bits_per_dim_discrete']:.3f} | {test['test_mse']:.4f} |")
                    print(lines[-1], flush=True)
                if 'float32' in ips and 'bfloat16' in ips:
                    ratios[model].append(ips['bfloat16'] / ips['float32'])
    print('\n' + '\n'.join(lines))
    for model, values in ratios.items():
        if values:
            print(f'{model}: bfloat16 / float32 images/s of the whole command, paired: '
                  f'median {statistics.median(values):.2f}x, min {min(values):.2f}x, '
                  f'max {max(values):.2f}x over {len(values)} pairs')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--repeats', type=int, default=5, help='interleaved timings of each setting')
    p.add_argument('--steps', type=int, default=20, help='steps per timing')
    p.add_argument('--models', default='sigma,sigma_pixel,logistic')
    p.add_argument('--batches', default='64,256')
    p.add_argument('--xla', default='off,on')
    p.add_argument('--precisions', default='float32,bfloat16')
    p.add_argument('--cli_models', default='sigma', help="models of the whole-command part ('' skips it)")
    p.add_argument('--cli_repeats', type=int, default=3)
    args = p.parse_args()
    args.models = [m for m in args.models.split(',') if m]
    args.cli_models = [m for m in args.cli_models.split(',') if m]
    for m in args.models + args.cli_models:
        if m not in losses.DECODERS:
            p.error(f'unknown model {m}')
    args.batches = [int(b) for b in args.batches.split(',')]
    args.xla = [x == 'on' for x in args.xla.split(',')]
    args.precisions = args.precisions.split(',')
    print(f'TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, devices: '
          f'{[d.device_type for d in tf.config.list_physical_devices()]}', flush=True)
    start = time.time()
    if args.models:
        bench_steps(args)
    if args.cli_models:
        bench_cli(args)
    print(f'\n{(time.time() - start) / 60:.1f} min in all')


if __name__ == '__main__':
    main()

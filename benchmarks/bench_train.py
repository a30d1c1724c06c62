"""Training throughput on a shared, noisy machine: steps in memory and the whole command.

python benchmarks/bench_train.py [--archs original,resnet,...] [--repeats 5] [--steps 20] [--cli_repeats 3]

Every network of networks.NETWORKS (--arch of train.py, at its default --width and --depth) is
measured unless --archs names some.

0. First, the CPU's bfloat16 / float32 matmul speed (five pairs of bursts of 2048² products) and
   its bfloat16 features (AVX-512 BF16, AMX): without them oneDNN computes bfloat16 through
   float32 and --mixed_precision bfloat16 slows the matmuls down (0.55x on one VM of ours).
1. Steps on tensors in memory. For each network, model, batch size, XLA setting and precision
   (float32, bfloat16) it times --steps training steps, --repeats times. The repeats of all
   settings are interleaved (round robin), and each timing is preceded by a burst of matrix
   products in the setting's precision, so that every model figure has a peak measured
   seconds before it: the share of matmul is the median of these paired ratios. It also
   reports the share against the highest peak seen in the whole run, how far repeats
   disagree (min-max), and bfloat16's speed over float32's (the median of the ratios of the
   two timings of a repeat, taken one after the other), per setting and per network. FLOPs:
   the calls of Conv, Conv-transpose and Dense layers one training step makes (run once,
   eagerly), each with its own shapes (training = 3 x forward), checked against the same count
   over the graphs of the encoder and decoder (every node, a shared layer's too).
2. The whole command on real Fashion-MNIST: `train.py --arch A --epochs 1` in its own process,
   with progress bar, summaries and checkpoint, float32 and bfloat16 alternating,
   --cli_repeats times each (--cli_max_steps: a part of the epoch); images/s from the run's own
   train_seconds, its training bits/dim, the test bits/dim its metrics row gives (batch norm's
   moving statistics: training's running check) and the test figures evaluate.py would give
   (statistics recomputed, float32).
"""
import argparse
import fcntl
import json
import math
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

import utils  # noqa: E402  (after the path)
utils.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import checkpoints  # noqa: E402
import config as settings  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import networks  # noqa: E402
import trainer as training  # noqa: E402

PEAK_SIZE = 2048  # the matmul burst: n x n times n x n


# The layers whose FLOPs are counted; what else a network computes (batch norm, activations,
# additions, the likelihood) is left out.
CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
CONV_TRANSPOSES = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                   keras.layers.Conv3DTranspose)
COUNTED = CONV_TRANSPOSES + CONVS + (keras.layers.Dense,)


def layer_flops(layer, input_shape, output_shape):
    """Multiply-adds x 2 of one call of a convolution, transposed convolution or dense layer,
    per image, from that call's input and output shapes (batch first); 0 for other layers."""
    if isinstance(layer, CONV_TRANSPOSES):  # each input value is spread over k x c_out outputs
        return (2 * math.prod(layer.kernel_size) * input_shape[-1] * layer.filters
                * math.prod(input_shape[1:-1]))
    if isinstance(layer, CONVS):  # each output value gathers k x c_in / groups inputs
        return (2 * math.prod(layer.kernel_size) * (input_shape[-1] // layer.groups)
                * output_shape[-1] * math.prod(output_shape[1:-1]))
    if isinstance(layer, keras.layers.Dense):  # on the last axis, at every other position
        return 2 * input_shape[-1] * layer.units * math.prod(input_shape[1:-1])
    return 0


def forward_flops(model):
    """Multiply-adds x 2 of the Conv, Conv-transpose and Dense layers of a functional Keras
    model, per image: every call in the model's graph (its nodes), with that call's shapes, so
    that a layer called twice, or shared with another model, counts each of its calls here;
    a nested model counts once per call. Layers inside a subclassed layer's call are not
    nodes of the graph and are not seen (StepCalls sees them)."""
    graph = getattr(model, '_functional', None) or model  # a built Sequential's graph
    nodes = getattr(graph, '_nodes_by_depth', None)
    if nodes is None:
        raise TypeError(f'{model.name}: not a functional Keras model, its graph cannot be read')
    total = 0
    for node in (n for depth in nodes.values() for n in depth):
        op = node.operation
        if isinstance(op, keras.Model):
            total += forward_flops(op)
        elif isinstance(op, COUNTED):
            total += layer_flops(op, node.input_tensors[0].shape, node.output_tensors[0].shape)
    return int(total)


class StepCalls:
    """Counts, per image, the FLOPs (as layer_flops) of every call of a Conv, Conv-transpose
    or Dense layer of `model` (nested ones too, subclassed layers' included) made while the
    context is open, with the shapes of the call, by wrapping the layers' call methods."""

    def __init__(self, model):
        self.layers = [l for l in model._flatten_layers(include_self=True, recursive=True)
                       if isinstance(l, COUNTED)]
        self.flops = self.calls = 0

    def _wrap(self, layer):
        call = layer.call

        def counting(inputs, *args, **kwargs):
            outputs = call(inputs, *args, **kwargs)
            self.flops += int(layer_flops(layer, tuple(inputs.shape), tuple(outputs.shape)))
            self.calls += 1
            return outputs
        return counting

    def __enter__(self):
        for layer in self.layers:  # on the instance; object's: no attribute tracking
            object.__setattr__(layer, 'call', self._wrap(layer))
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            object.__delattr__(layer, 'call')


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


def cpu_flags():
    """The CPU's bfloat16 matrix features this machine reports (Linux' /proc/cpuinfo): AVX-512
    BF16 and AMX are what make bfloat16 matmuls faster than float32 on x86; None: unknown."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f
                          if line.startswith('flags')), [])
    except OSError:
        return None
    return [f for f in ('avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile') if f in flags]


def precision_ratio(pairs=5):
    """bfloat16 over float32 matmul GFLOP/s on this machine, the two bursts of a pair one after
    the other -> (median, min, max of the pairs' ratios, float32 and bfloat16 medians). Below 1
    (no AVX-512 BF16 / AMX: oneDNN converts), --mixed_precision bfloat16 slows the matmuls down."""
    f32, b16 = MatmulPeak(tf.float32), MatmulPeak(tf.bfloat16)
    seen = [(f32(), b16()) for _ in range(pairs)]
    ratios = [b / f for f, b in seen]
    return (statistics.median(ratios), min(ratios), max(ratios),
            statistics.median(f for f, _ in seen), statistics.median(b for _, b in seen))


def report_precision_ratio():
    """Prints precision_ratio and cpu_flags in one line: the first line of the benchmark."""
    flags = cpu_flags()
    ratio, low, high, f32, b16 = precision_ratio()
    features = ('unknown' if flags is None else ', '.join(flags) if flags
                else 'no avx512f, avx512_bf16 or amx_bf16')
    verdict = ('bfloat16 is faster here' if ratio >= 1 else
               'bfloat16 is SLOWER here: --mixed_precision bfloat16 slows the matmuls down')
    print(f'bfloat16 / float32 matmul ({PEAK_SIZE}², 5 pairs): {ratio:.2f}x (min {low:.2f}x, '
          f'max {high:.2f}x); float32 {f32:.1f}, bfloat16 {b16:.1f} GFLOP/s; CPU features: '
          f'{features}; {verdict}', flush=True)


def make_step(arch, model, precision, batch, xla, channels=1):
    """A Trainer's compiled update and its batches, built under the precision's policy, and
    the training FLOPs of one image: 3 x the forward FLOPs of the calls one step makes."""
    precision = None if precision == 'float32' else precision
    config = settings.Config(model=model, arch=arch, batch_size=batch, xla=xla,
                               mixed_precision=precision, channels=channels,
                               output_dir=tempfile.gettempdir(), experiment_name='bench')
    keras.mixed_precision.set_dtype_policy(training.POLICIES[precision])
    try:
        trainer = training.Trainer(config)
    finally:
        keras.mixed_precision.set_dtype_policy('float32')
    rng = np.random.default_rng(0)
    batches = [tf.constant(np.round(rng.uniform(0, 255, (batch, 28, 28, channels))) / 127.5 - 1,
                           tf.float32) for _ in range(4)]
    # One step run eagerly (two images: FLOPs per image do not depend on the batch) sees every
    # layer call the compiled one makes, however the network wires its models.
    with StepCalls(trainer.vae) as step_calls:
        trainer._update(batches[0][:2])
    # An encoder of (x, eps) runs the whole pass, the decoder's layers included (models.forward).
    encoder, decoder = trainer.vae.encoder, trainer.vae.decoder
    graphs = forward_flops(encoder) + (0 if len(encoder.inputs) == 2 else forward_flops(decoder))
    for x in batches:  # trace and warm up
        trainer.update(x)
    float(trainer.update(batches[0])['loss'])
    return trainer.update, batches, 3 * step_calls.flops, (graphs, step_calls)


def time_steps(step, batches, steps):
    start = time.perf_counter()
    for i in range(steps):
        stats = step(batches[i % len(batches)])
    float(stats['loss'])  # wait for the device
    return (time.perf_counter() - start) / steps


def spread(values):
    return f'{min(values):.0f}-{max(values):.0f}'


def paired_ratios(seen, settings):
    """{bfloat16 setting: its images/s over float32's of the same setting, per repeat (the two
    timings of a repeat are taken one after the other)}."""
    ratios = {}
    for s in settings:
        if s[2] == 'bfloat16':
            other = s[:2] + ('float32',) + s[3:]
            if other in seen:
                ratios[s] = [b / f for (b, _), (f, _) in zip(seen[s], seen[other])]
    return ratios


def bench_steps(args):
    peaks = {p: MatmulPeak(tf.bfloat16 if p == 'bfloat16' else tf.float32) for p in args.precisions}
    settings = [(a, m, p, b, x) for a in args.archs for m in args.models for b in args.batches
                for x in args.xla for p in args.precisions]
    print(f'building and tracing {len(settings)} settings ...', flush=True)
    built, counts = {}, {}
    for s in settings:
        built[s] = make_step(*s)
        graphs, calls = built[s][3]
        counts.setdefault(s[:2], (graphs, calls.flops, calls.calls))
    for (arch, model), (graphs, flops, calls) in counts.items():
        check = 'the same' if graphs == flops else "DIFFERENT: the table takes the step's calls"
        print(f'{arch} {model}: forward {flops / 1e6:.3f} MFLOP/image in the {calls} layer calls '
              f'of one step; the graphs of encoder + decoder count {graphs / 1e6:.3f} ({check})',
              flush=True)
    seen = {s: [] for s in settings}  # (images/s, peak GFLOP/s just before)
    peaks_seen = {p: [] for p in peaks}
    for r in range(args.repeats):
        print(f'repeat {r + 1}/{args.repeats}', flush=True)
        for s in settings:
            step, batches, flops, _ = built[s]
            peak = peaks[s[2]]()
            peaks_seen[s[2]].append(peak)
            seen[s].append((s[3] / time_steps(step, batches, args.steps), peak))
    for p, values in peaks_seen.items():
        print(f'\n{p} matmul ({PEAK_SIZE}², tf.function), {len(values)} bursts: median '
              f'{statistics.median(values):.1f}, min {min(values):.1f}, max {max(values):.1f} GFLOP/s')
    ratios = paired_ratios(seen, settings)
    header = ('arch', 'model', 'precision', 'batch', 'XLA', 'images/s (median)', 'repeats min-max',
              'MFLOP/image', 'GFLOP/s', 'of paired matmul', 'of best matmul', 'bfloat16 / float32')
    print('\n| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
    for s in settings:
        arch, model, precision, batch, xla = s
        flops = built[s][2]
        ips = [i for i, _ in seen[s]]
        paired = statistics.median(i * flops / 1e9 / peak for i, peak in seen[s])
        median = statistics.median(ips)
        gflops = median * flops / 1e9
        best = max(peaks_seen[precision])
        ratio = f'{statistics.median(ratios[s]):.2f}x' if s in ratios else ''
        print(f'| {arch} | {model} | {precision} | {batch} | {"on" if xla else "off"} | '
              f'{median:.0f} | {spread(ips)} | {flops / 1e6:.1f} | {gflops:.1f} | {paired:.0%} | '
              f'{gflops / best:.0%} | {ratio} |', flush=True)
    for arch in args.archs:
        for xla in args.xla:
            values = [statistics.median(v) for s, v in ratios.items() if s[0] == arch and s[4] == xla]
            if values:
                print(f'{arch}, XLA {"on" if xla else "off"}: bfloat16 / float32 images/s of the '
                      f'steps, median of {len(values)} settings {statistics.median(values):.2f}x '
                      f'(min {min(values):.2f}x, max {max(values):.2f}x)')


def run_cli(arch, model, precision, output_dir, name, max_steps=None):
    """One epoch (or max_steps of it) of the real training command, its progress bar drawn on
    a terminal (a pseudo-terminal read by a thread) as a user sees it; its last metrics row."""
    argv = [sys.executable, os.path.join(REPO, 'train.py'), '--arch', arch, '--model', model,
            '--dataset', 'fashion_mnist', '--epochs', '1', '--output_dir', output_dir,
            '--experiment_name', name]
    if max_steps:
        argv += ['--max_steps', str(max_steps)]
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
    """The test metrics of a run as evaluate.py computes them (checkpoints.load_model: batch norm
    statistics recomputed under the final weights; float32 whatever the training precision)."""
    config, vae, state = checkpoints.load_model(run_dir)
    test_ds = data.make_pipeline(state.splits.test, config.image_size, config.batch_size,
                                 drop_remainder=False, data_range=config.data_range)
    return vae.test_metrics(test_ds, config.seed)


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
    steps = (f'{args.cli_max_steps} of the epoch\'s 937 steps of 64' if args.cli_max_steps
             else '937 steps of 64')
    print(f'\nthe whole command: train.py --arch A --dataset fashion_mnist --epochs 1 '
          f'{"--max_steps " + str(args.cli_max_steps) + " " if args.cli_max_steps else ""}'
          f'({steps}), {args.cli_repeats} x each precision, alternating', flush=True)
    header = ('arch', 'model', 'precision', 'repeat', 'steps', 'images/s', 'train bits/dim',
              'test bits/dim (row)', 'test bits/dim', 'test 8-bit bits/dim', 'test MSE')
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    ratios = {(a, m): [] for a in args.archs for m in args.cli_models}
    with tempfile.TemporaryDirectory() as out:
        for arch, model in ratios:
            for r in range(args.cli_repeats):
                ips = {}
                for precision in args.precisions:
                    name = f'{arch}_{model}_{precision}_{r}'
                    row = run_cli(arch, model, precision if precision != 'float32' else None, out,
                                  name, args.cli_max_steps)
                    ips[precision] = row['step'] * 64 / row['train_seconds']
                    test = evaluate_test(os.path.join(out, name))
                    lines.append(f"| {arch} | {model} | {precision} | {r + 1} | {row['step']} | "
                                 f"{ips[precision]:.0f} | "
                                 f"{row['train_bits_per_dim']:.3f} | {row['test_bits_per_dim']:.3f} | "
                                 f"{test['test_bits_per_dim']:.3f} | "
                                 f"{test['test_bits_per_dim_discrete']:.3f} | {test['test_mse']:.4f} |")
                    print(lines[-1], flush=True)
                if 'float32' in ips and 'bfloat16' in ips:
                    ratios[arch, model].append(ips['bfloat16'] / ips['float32'])
    print('\n' + '\n'.join(lines))
    for (arch, model), values in ratios.items():
        if values:
            print(f'{arch} {model}: bfloat16 / float32 images/s of the whole command, paired: '
                  f'median {statistics.median(values):.2f}x, min {min(values):.2f}x, '
                  f'max {max(values):.2f}x over {len(values)} pairs')


def names(text, known, what, parser):
    """A comma-separated list of names, each one of `known`."""
    values = [v for v in text.split(',') if v]
    for v in values:
        if v not in known:
            parser.error(f"unknown {what} {v!r} (known: {', '.join(known)})")
    return values


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--archs', default=','.join(networks.NETWORKS),
                   help='networks (networks.NETWORKS, at their default --width and --depth) of both '
                        'parts, comma-separated')
    p.add_argument('--repeats', type=int, default=5, help='interleaved timings of each setting')
    p.add_argument('--steps', type=int, default=20, help='steps per timing')
    p.add_argument('--models', default='sigma,sigma_pixel,logistic',
                   help="decoders (losses.DECODERS) of the steps part ('' skips it)")
    p.add_argument('--batches', default='64,256', help='batch sizes of the steps part')
    p.add_argument('--xla', default='off,on', help='XLA settings of the steps part')
    p.add_argument('--precisions', default='float32,bfloat16', help='precisions of both parts')
    p.add_argument('--cli_models', default='sigma',
                   help="decoders of the whole-command part ('' skips it)")
    p.add_argument('--cli_repeats', type=int, default=3,
                   help='runs of the whole command per network, decoder and precision')
    p.add_argument('--cli_max_steps', type=int,
                   help="train.py's --max_steps: time this many steps of the epoch; None: the "
                        "whole epoch, 937 steps (the first step's tracing, within train_seconds, "
                        "weighs more in a short run)")
    args = p.parse_args()
    args.archs = names(args.archs, list(networks.NETWORKS), 'network', p)
    if not args.archs:
        p.error('--archs names no network')
    args.models = names(args.models, list(losses.DECODERS), 'model', p)
    args.cli_models = names(args.cli_models, list(losses.DECODERS), 'model', p)
    args.precisions = names(args.precisions, ['float32', 'bfloat16'], 'precision', p)
    if not args.precisions:
        p.error('--precisions names no precision')
    args.batches = [int(b) for b in args.batches.split(',')]
    args.xla = [x == 'on' for x in names(args.xla, ['off', 'on'], 'XLA setting', p)]
    for flag in ('repeats', 'steps', 'cli_repeats', 'cli_max_steps'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f'--{flag} must be at least 1')
    report_precision_ratio()
    print(f'TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, devices: '
          f'{[d.device_type for d in tf.config.list_physical_devices()]}; networks: '
          f'{", ".join(args.archs)}', flush=True)
    start = time.time()
    if args.models:
        bench_steps(args)
    if args.cli_models:
        bench_cli(args)
    print(f'\n{(time.time() - start) / 60:.1f} min in all')


if __name__ == '__main__':
    main()

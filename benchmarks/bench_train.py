"""Training throughput: images/s, FLOPs and the share of this machine's matmul speed.

python benchmarks/bench_train.py [--repeats 5] [--steps 20] [--quick]

For each model, 1 and 3 channels and batch sizes 64 and 256 (28x28 images) it
times steady-state training steps on tensors already in memory (median of
--repeats timings of --steps steps, after warm-up), with and without XLA, and
prints images/s, the training FLOPs per image counted from the layer shapes
(forward x 3: the backward pass costs about twice the forward), the achieved
GFLOP/s and its ratio to an fp32 matmul measured in the same run. It then times
the real Fashion-MNIST input pipeline against in-memory tensors.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # first: TensorFlow starts quietly
utils.quiet_tensorflow()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402


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


def matmul_gflops(n=2048, repeats=5):
    """Median fp32 GFLOP/s of an n x n matmul, compiled, on this machine."""
    a = tf.random.normal((n, n))
    b = tf.random.normal((n, n))
    mm = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    mm(a, b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            out = mm(a, b)
        out.numpy()
        times.append((time.perf_counter() - start) / 5)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def time_steps(step, batches, steps, repeats):
    """Median seconds per step over `repeats` runs of `steps` steps, after warm-up."""
    for x in batches[:3]:
        step(x)
    float(step(batches[0])['loss'])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(steps):
            stats = step(batches[i % len(batches)])
        float(stats['loss'])  # wait for the device
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def make_trainer(model, channels, batch_size, xla):
    config = train.Config(model=model, batch_size=batch_size, xla=xla, output_dir='/tmp/bench',
                          experiment_name='bench', channels=channels)
    return train.Trainer(config)


def bench_models(args, matmul):
    print(f'\nfp32 matmul (2048x2048, tf.function): {matmul:.1f} GFLOP/s\n')
    header = ('model', 'C', 'batch', 'xla', 'images/s', 'MFLOP/img', 'GFLOP/s', 'of matmul')
    print('| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
    rng = np.random.default_rng(0)
    for model in args.models:
        for channels in (1, 3):
            for batch in (64, 256):
                for xla in (False, True):
                    trainer = make_trainer(model, channels, batch, xla)
                    batches = [tf.constant(rng.uniform(-1, 1, (batch, 28, 28, channels)), tf.float32)
                               for _ in range(4)]
                    seconds = time_steps(trainer.update, batches, args.steps, args.repeats)
                    flops = 3 * (forward_flops(trainer.vae.encoder) + forward_flops(trainer.vae.decoder))
                    ips = batch / seconds
                    gflops = ips * flops / 1e9
                    print(f'| {model} | {channels} | {batch} | {"on" if xla else "off"} | {ips:.0f} | '
                          f'{flops / 1e6:.1f} | {gflops:.1f} | {gflops / matmul:.0%} |', flush=True)


def bench_pipeline(args):
    """Training steps fed by the real Fashion-MNIST pipeline vs the same tensors in memory."""
    try:
        splits = data.load('fashion_mnist')
    except Exception as e:  # noqa: BLE001 - a benchmark reports and goes on
        print(f'\npipeline: skipped, Fashion-MNIST not available ({e})')
        return
    trainer = make_trainer('sigma', 1, 64, False)
    ds = data.make_pipeline(splits.train, 28, 64, shuffle_seed=0)
    n = args.steps * args.repeats
    for x in ds.take(n):  # fills the cache, as the first epoch does
        pass
    in_memory = [x for x in ds.take(8)]
    memory = time_steps(trainer.update, in_memory, args.steps, args.repeats)
    times = []
    iterator = iter(ds.repeat())
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            stats = trainer.update(next(iterator))
        float(stats['loss'])
        times.append((time.perf_counter() - start) / args.steps)
    pipeline = statistics.median(times)
    print(f'\npipeline (sigma, batch 64): real Fashion-MNIST {64 / pipeline:.0f} images/s, '
          f'in-memory tensors {64 / memory:.0f} images/s: the pipeline costs '
          f'{(pipeline / memory - 1):+.1%}')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--steps', type=int, default=20)
    p.add_argument('--models', default=','.join(losses.DECODERS))
    args = p.parse_args()
    args.models = args.models.split(',')
    print(f'TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores, devices: '
          f'{[d.device_type for d in tf.config.list_physical_devices()]}')
    matmul = matmul_gflops()
    bench_models(args, matmul)
    bench_pipeline(args)
    print(f'\nfp32 matmul again at the end: {matmul_gflops():.1f} GFLOP/s')


if __name__ == '__main__':
    main()

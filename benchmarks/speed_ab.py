"""Steps of variants of the code side by side in one process: this version against the earlier
batch norm and optimizer (REPORT_speed.md), interleaved, each timing after a float32 matmul burst.

python benchmarks/speed_ab.py hierarchical+before,hierarchical,original+before,original \
    [repeats] [steps]

A variant is a network (--arch) with options joined by '+': `xla` (jit_compile the update),
`kerasbn` (Keras' BatchNormalization instead of networks.BatchNorm), `kerasadam` (Keras' Adam
instead of models.Adam), `before` (both: the step before REPORT_speed.md). The order of the
variants rotates from repeat to repeat. Prints images/s (median, min-max), the share of the
paired matmul burst (as bench_train.py), each variant's images/s over the first variant's
within each repeat, and the process's CPU time per step (all threads: the work done, less
sensitive than the wall clock to other processes on a shared machine).
"""
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402  (sets the path to the repository)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import models  # noqa: E402
import networks  # noqa: E402


@contextlib.contextmanager
def keras_batch_norm():
    made = networks._batch_norm
    networks._batch_norm = lambda sync, **kw: keras.layers.BatchNormalization(
        momentum=networks.BN_MOMENTUM, epsilon=networks.BN_EPSILON, synchronized=sync, **kw)
    try:
        yield
    finally:
        networks._batch_norm = made


@contextlib.contextmanager
def keras_adam():
    made = models.Adam
    models.Adam = keras.optimizers.Adam
    try:
        yield
    finally:
        models.Adam = made


@contextlib.contextmanager
def before():
    with keras_batch_norm(), keras_adam():
        yield


OPTIONS = {'kerasbn': keras_batch_norm, 'kerasadam': keras_adam, 'before': before}


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    variants = sys.argv[1].split(',')
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    peak = bench_train.MatmulPeak(tf.float32)
    built = {}
    for v in variants:
        arch, *options = v.split('+')
        with contextlib.ExitStack() as stack:
            for o in options:
                if o != 'xla':
                    stack.enter_context(OPTIONS[o]())
            built[v] = bench_train.make_step(arch, 'sigma', 'float32', 64, 'xla' in options)
    seen = {v: [] for v in variants}  # (images/s, share of the paired matmul, CPU ms per step)
    peaks = []
    for r in range(repeats):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            step, batches, flops, _ = built[v]
            peaks.append(peak())
            cpu = time.process_time()
            images = 64 / bench_train.time_steps(step, batches, steps)
            seen[v].append((images, images * flops / 1e9 / peaks[-1],
                            (time.process_time() - cpu) / steps * 1e3))
    print(f'float32 matmul: median {statistics.median(peaks):.0f} GFLOP/s '
          f'({min(peaks):.0f}-{max(peaks):.0f})')
    print('| variant | images/s | min-max | of paired matmul | min-max | '
          '/ first variant, per repeat | CPU ms per step |\n|---|---|---|---|---|---|---|')
    first = [i for i, _, _ in seen[variants[0]]]
    for v in variants:
        images, shares, cpu = zip(*seen[v])
        relative = [a / b for a, b in zip(images, first)]
        print(f'| {v} | {statistics.median(images):.0f} | {min(images):.0f}-{max(images):.0f} | '
              f'{statistics.median(shares):.0%} | {min(shares):.0%}-{max(shares):.0%} | '
              f'{statistics.median(relative):.2f}x ({min(relative):.2f}-{max(relative):.2f}) | '
              f'{statistics.median(cpu):.1f} (min {min(cpu):.1f}) |')


if __name__ == '__main__':
    main()

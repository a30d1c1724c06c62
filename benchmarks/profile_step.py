"""Where a training step's time goes: TensorFlow's profiler over compiled steps in memory.

python benchmarks/profile_step.py [--arch hierarchical] [--model sigma] [--steps 10] [--xla]
                                  [--threads N]

Builds a step as bench_train.py does (float32, batch 64, 28x28x1), profiles --steps of them and
prints the ops' time per step: by kind (convolutions forward and backward, batch norm, the
optimizer, matmuls, the rest) and by layer (forward and backward together), from the trace's
op events. --threads 1 runs one op at a time on one thread (inter- and intra-op), so that the
ops' times add up to the step's and do not overlap; the default threading overlaps them.
"""
import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train  # noqa: E402  (sets the path to the repository)

import tensorflow as tf  # noqa: E402
from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: E402

FRAMES = ('ExecutorState', 'EagerLocalExecute', 'KernelAndDeviceFunc')  # whole-step events


def kind(name, op_type):
    """An op's kind, from its scope name and type (e.g. 'conv backward')."""
    backward = 'backward' if 'gradient_tape' in name else 'forward'
    if 'Conv' in op_type:
        return 'conv ' + backward
    if 'MatMul' in op_type:
        return 'matmul ' + backward
    if 'batch_norm' in name or 'BatchNorm' in op_type:
        return 'batch norm ' + backward
    if name.startswith('adam') or '/adam' in name:
        return 'optimizer'
    return 'other ' + backward


def layer(name):
    """The layer (or top-level scope) of an op: vae/encoder/<layer>/... -> <layer>."""
    parts = name.replace('gradient_tape/', '').split('/')
    key = parts[2] if len(parts) > 2 and parts[0].startswith('vae') else parts[0]
    return re.sub(r'_\d+$', '', key) if not parts[0].startswith('vae') else key


def op_times(logdir, steps):
    """{(op name, op type): ms per step} from the profiler's trace in logdir."""
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)[0], 'rb') as f:
        space.ParseFromString(f.read())
    times = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            for event in line.events:
                full = plane.event_metadata[event.metadata_id].name
                if ':' in full and not full.startswith(FRAMES):
                    name, op_type = full.rsplit(':', 1)
                    times[name, op_type] += event.duration_ps / 1e9 / steps
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='hierarchical')
    p.add_argument('--model', default='sigma')
    p.add_argument('--steps', type=int, default=10)
    p.add_argument('--xla', action='store_true', help='jit_compile the update (--xla)')
    p.add_argument('--threads', type=int, help='inter- and intra-op threads (default: TF\'s)')
    p.add_argument('--top', type=int, default=30, help='layers listed')
    args = p.parse_args()
    if args.threads:
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    step, batches, flops, _ = bench_train.make_step(args.arch, args.model, 'float32', 64, args.xla)
    seconds = bench_train.time_steps(step, batches, args.steps)
    print(f'{args.arch} {args.model}: {seconds * 1e3:.1f} ms per step of 64 '
          f'({64 / seconds:.0f} images/s, {64 * flops / seconds / 1e9:.1f} GFLOP/s) unprofiled')
    logdir = tempfile.mkdtemp()
    tf.profiler.experimental.start(logdir)
    bench_train.time_steps(step, batches, args.steps)
    tf.profiler.experimental.stop()
    times = op_times(logdir, args.steps)
    total = sum(times.values())
    print(f'ops: {total:.1f} ms per step in {len(times)} ops (overlapping unless --threads 1)')
    by_kind, count = collections.Counter(), collections.Counter()
    for (name, op_type), ms in times.items():
        by_kind[kind(name, op_type)] += ms
        count[kind(name, op_type)] += 1
    for k, ms in by_kind.most_common():
        print(f'  {ms:7.2f} ms {ms / total:6.1%}  {count[k]:4d} ops  {k}')
    by_layer = collections.Counter()
    for (name, _), ms in times.items():
        by_layer[layer(name)] += ms
    print('by layer, forward and backward:')
    for k, ms in by_layer.most_common(args.top):
        print(f'  {ms:7.2f} ms  {k}')


if __name__ == '__main__':
    main()

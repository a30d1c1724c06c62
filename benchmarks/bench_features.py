"""Time and extra memory of the sample-quality distances of features.py on large sets.

python benchmarks/bench_features.py [--n 10000] [--dim 128] [--chunk_mb 64]

Makes two sets of --n features of --dim values (ReLU of Gaussians, the second shifted and wider,
float32 as a network gives them) and measures, each in a fresh child process so that its peak
is its own, precision and recall (k = 3), KID (100 subsets of 1000) and the FID:
  - the wall time of the call;
  - the peak of the memory NumPy allocated during the call beyond what it held before
    (tracemalloc, which sees NumPy's buffers);
  - the rise of the process' resident set size high-water mark over its RSS before the call
    (getrusage ru_maxrss; 0 if the call stayed under an earlier peak, such as TensorFlow's
    import's).
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ('precision_recall', 'kid', 'fid')


def rss_mb():
    """Current resident set size in MB (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def measure(metric, n, dim, chunk_mb):
    """In the child: one JSON line of figures for one metric."""
    import resource
    import tracemalloc
    sys.path.insert(0, REPO)
    import utils
    utils.quiet_tensorflow()
    import numpy as np
    import features
    rng = np.random.default_rng(0)
    real = np.maximum(rng.normal(size=(n, dim)), 0).astype(np.float32)
    fake = np.maximum(rng.normal(0.1, 1.1, size=(n, dim)), 0).astype(np.float32)
    calls = {
        'precision_recall': lambda: features.precision_recall(real, fake,
                                                              chunk_bytes=chunk_mb * 2**20),
        'kid': lambda: features.kernel_inception_distance(real, fake),
        'fid': lambda: features.frechet_distance(*features.feature_statistics(fake),
                                                 *features.feature_statistics(real)),
    }
    rss_before = rss_mb()
    tracemalloc.start()
    held = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    value = calls[metric]()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - held
    tracemalloc.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(metric=metric, value=value, seconds=seconds, peak_mb=peak / 2**20,
                          rss_rise_mb=max(0.0, maxrss - rss_before))), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--n', type=int, default=10000, help='points in each set')
    parser.add_argument('--dim', type=int, default=128, help='features per point')
    parser.add_argument('--chunk_mb', type=int, default=64,
                        help="precision_recall's chunk_bytes, in MB")
    parser.add_argument('--child', choices=METRICS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measure(args.child, args.n, args.dim, args.chunk_mb)
        return 0
    rev = subprocess.run(['git', '-C', REPO, 'log', '-1', '--format=%h %s'],
                         capture_output=True, text=True).stdout.strip()
    print(f'features.py of {REPO} ({rev}); {args.n} x {args.n} points in {args.dim}-d, '
          f'float32 in, chunk {args.chunk_mb} MB; {os.cpu_count()} CPUs, load average '
          f'{os.getloadavg()[0]:.1f}')
    print('| metric | value | seconds | peak extra MB (tracemalloc) | max RSS rise MB |')
    print('|---|---|---|---|---|')
    for metric in METRICS:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', metric,
                              '--n', str(args.n), '--dim', str(args.dim),
                              '--chunk_mb', str(args.chunk_mb)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        value = ', '.join(f'{v:.4g}' for v in r['value']) if isinstance(r['value'], list) \
            else f"{r['value']:.4g}"
        print(f"| {metric} | {value} | {r['seconds']:.1f} | {r['peak_mb']:.0f} "
              f"| {r['rss_rise_mb']:.0f} |", flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

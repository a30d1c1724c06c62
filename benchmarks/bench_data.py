"""An image folder's cost before the first training step, and the pipeline's speed.

python benchmarks/bench_data.py [--sizes 10000,100000,300000] [--root /tmp/bench_data]
                                [--code DIR] [--batches 150] [--step_rate 1100]

Makes (once; reused on later runs) folders of N synthetic 28x28 grayscale PNGs in 10
subfolders (classes) under --root, then, for each, in a fresh child process (so that peak
memory is that process's alone):
  - peak RSS (getrusage ru_maxrss) once the first batch is out, and the RSS of the bare
    imports for reference;
  - seconds from data.load to the first train batch of data.make_pipeline (batch 64);
  - the pipeline's images/s alone over the next --batches batches (nothing else runs).
The training step's consumption rate is given for reference: --step_rate (the sigma model,
float32, batch 64 on this machine's 2 cores: ~1000-1100 images/s, results/bench_train.txt),
or measured with --measure_step (a few steps of train.Trainer on random batches).

--code DIR imports data.py from another checkout (e.g. a worktree of an earlier commit), to
compare the same folders before and after a change. --sizes 2000,5000 is a quick run.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 64


def make_folder(root, n):
    """A folder of n random 28x28 grayscale PNGs in 10 class subfolders; made once."""
    folder = os.path.join(root, f'png28_{n}')
    done = os.path.join(folder, '.complete')
    if os.path.exists(done):
        return folder
    import numpy as np
    from PIL import Image
    print(f'making {folder} ({n} PNGs) ...', file=sys.stderr, flush=True)
    rng = np.random.default_rng(n)
    for c in range(10):
        os.makedirs(os.path.join(folder, f'class{c}'), exist_ok=True)
    for i in range(n):
        image = np.zeros((28, 28), np.uint8)
        r, col = rng.integers(0, 14, 2)
        image[r:r + 14, col:col + 10] = rng.integers(60, 256)
        image = np.clip(image.astype(np.int16) + rng.integers(0, 40, (28, 28)), 0, 255)
        Image.fromarray(image.astype(np.uint8)).save(
            os.path.join(folder, f'class{i % 10}', f'{i:07d}.png'))
    open(done, 'w').close()
    return folder


def rss_mb():
    """Current resident set size in MB (Linux)."""
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def measure(folder, code, batches):
    """In the child: one JSON line of figures for one folder."""
    import resource
    sys.path.insert(0, code)
    import utils
    utils.quiet_tensorflow()
    import tensorflow as tf  # noqa: F401
    import data
    base = rss_mb()
    start = time.perf_counter()
    splits = data.load(folder, None, 28, 0)
    loaded = time.perf_counter() - start
    it = iter(data.make_pipeline(splits.train, 28, BATCH, shuffle_seed=0))
    next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            n += int(next(it).shape[0])
        except StopIteration:
            break
    rate = n / (time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(images=splits.num_train + splits.num_test, load_s=loaded,
                          first_batch_s=first, images_per_s=rate, peak_rss_mb=peak,
                          import_rss_mb=base)), flush=True)


def measure_step(steps=20):
    """images/s of train.Trainer steps on random batches of 64 (sigma model, float32)."""
    sys.path.insert(0, REPO)
    import utils
    utils.quiet_tensorflow()
    import tensorflow as tf
    import run_folder
    import train
    config = run_folder.Config(batch_size=BATCH, channels=1, output_dir='/tmp/bench_data_step',
                               experiment_name='x')
    trainer = train.make_trainer(config, tf.distribute.get_strategy())
    x = tf.random.uniform((BATCH, 28, 28, 1), -1, 1)
    for _ in range(3):
        trainer.train_step(x)
    start = time.perf_counter()
    for _ in range(steps):
        out = trainer.train_step(x)
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, 'numpy') else t, out)
    return steps * BATCH / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='10000,100000,300000')
    parser.add_argument('--root', default='/tmp/bench_data')
    parser.add_argument('--code', default=REPO, help='checkout whose data.py is measured')
    parser.add_argument('--batches', type=int, default=150)
    parser.add_argument('--step_rate', type=float, default=1100.0,
                        help="the training step's images/s, for reference")
    parser.add_argument('--measure_step', action='store_true',
                        help='measure the training step instead of taking --step_rate')
    parser.add_argument('--make_only', action='store_true')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        measure(args.child, args.code, args.batches)
        return 0
    sizes = [int(s) for s in args.sizes.split(',')]
    folders = [make_folder(args.root, n) for n in sizes]
    if args.make_only:
        return 0
    step = measure_step() if args.measure_step else args.step_rate
    rev = subprocess.run(['git', '-C', args.code, 'log', '-1', '--format=%h %s'],
                         capture_output=True, text=True).stdout.strip()
    print(f'data.py of {args.code} ({rev}); batch {BATCH}, 28x28 grayscale PNGs; '
          f'training step consumes {step:.0f} images/s'
          f"{' (measured)' if args.measure_step else ' (--step_rate)'}")
    print('| files | peak RSS MB (imports) | data.load s | first batch s | pipeline images/s '
          '| x training step |')
    print('|---|---|---|---|---|---|')
    for n, folder in zip(sizes, folders):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), '--child', folder,
                              '--code', args.code, '--batches', str(args.batches)],
                             capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith('{')]
        if out.returncode or not lines:
            print(f'| {n} | failed: {out.stderr.strip().splitlines()[-1:]} |')
            continue
        r = json.loads(lines[-1])
        print(f"| {n:,} | {r['peak_rss_mb']:.0f} ({r['import_rss_mb']:.0f}) | {r['load_s']:.2f} "
              f"| {r['first_batch_s']:.2f} | {r['images_per_s']:.0f} "
              f"| {r['images_per_s'] / step:.1f} |", flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

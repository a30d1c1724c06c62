"""The global gradient norms of training steps, per network and decoder: the scale by which to
set --skip_threshold (a step whose norm is above it is skipped).

python benchmarks/grad_norms.py [--archs original,resnet,hierarchical] [--models gaussian,sigma,optimal,logistic] [--steps 300]

Trains each pair on real Fashion-MNIST for --steps steps with train.py's defaults (batch 64,
Adam 1e-3, no heuristics) and records the global norm of every step's gradient, as
--skip_threshold sees it (of the summed objective of the batch, all replicas); prints a table of
the median and the 99th percentile over the first 10 steps and over the rest, and the largest.
"""
import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import utils  # noqa: E402  (after the path)
utils.quiet_tensorflow()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import config as settings  # noqa: E402
import data  # noqa: E402
import trainer as training  # noqa: E402


def norms(arch, model, steps, splits, folder):
    """The gradient norm of each of `steps` training steps of one network and decoder."""
    config = settings.Config(model=model, arch=arch, dataset='fashion_mnist', channels=1,
                             output_dir=folder, experiment_name=f'{arch}_{model}',
                             skip_threshold=1e30)  # never skips: every norm is measured
    config.check()
    trainer = training.Trainer(config)
    batches = iter(data.make_pipeline(splits.train, 28, config.batch_size, shuffle_seed=0))
    out = []
    for _ in utils.progress(range(steps), desc=f'{arch} {model}', unit='step', leave=False):
        trainer.norm_range.assign([np.inf, 0.0])
        trainer.train_step(next(batches))
        out.append(float(trainer.norm_range.numpy()[1]))
    return np.array(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', default='original,resnet,hierarchical')
    p.add_argument('--models', default='gaussian,sigma,optimal,logistic')
    p.add_argument('--steps', type=utils.positive(), default=300)
    args = p.parse_args(argv)
    splits = data.load('fashion_mnist', None, 28, 0)
    print(f'TensorFlow {tf.__version__}, {os.cpu_count()} CPU cores; {args.steps} steps of 64 '
          f'Fashion-MNIST images each, Adam 1e-3, seed 0')
    print('| --arch | --model | first 10 steps: median, 99th pct | steps 11 to end: median, '
          '99th pct | largest |')
    print('|---|---|---|---|---|')
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.archs.split(','):
            for model in args.models.split(','):
                n = norms(arch, model, args.steps, splits, folder)
                first, rest = n[:10], n[10:]
                print(f'| {arch} | {model} | {np.median(first):.3g}, {np.percentile(first, 99):.3g} '
                      f'| {np.median(rest):.3g}, {np.percentile(rest, 99):.3g} | {n.max():.3g} |',
                      flush=True)


if __name__ == '__main__':
    main()

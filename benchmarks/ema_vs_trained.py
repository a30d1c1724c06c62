"""A run's moving average of the weights (--ema) against the weights trained, on its test split.

python benchmarks/ema_vs_trained.py output/hier10/optimal [more run folders] [--iw_samples 100] [--iw_images 1000]

For each run folder that kept an average, loads its newest checkpoint twice (checkpoints.
load_model: the average, then the weights trained; batch norm's statistics and `optimal`'s
sigma recomputed for each) and prints the test -ELBO's bits/dim of the 8-bit values, the IW
estimate of them (K samples on the first images), the test MSE and the KL of each. Writes
nothing but what evaluate.py would (the average's statistics beside its checkpoint).
"""
import argparse
import math
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import utils  # noqa: E402  (after the path)
utils.quiet_tensorflow()

import checkpoints  # noqa: E402
import data  # noqa: E402
import evaluation  # noqa: E402
import losses  # noqa: E402
import run_folder  # noqa: E402


def measure(run_dir, average, iw_samples, iw_images):
    config, vae, state = checkpoints.load_model(run_dir, average=average)
    test_ds = data.make_pipeline(state.splits.test, config.image_size, config.batch_size,
                                 drop_remainder=False, data_range=config.data_range)
    metrics = vae.test_metrics(test_ds, config.seed)
    _, discrete, _ = evaluation.importance_weighted_nll(vae, test_ds, iw_samples, iw_images,
                                                        config.seed)
    iw_bits = losses.bits_per_dim(discrete, math.prod(vae.image_shape), 0.0)
    return (metrics['test_bits_per_dim_discrete'], iw_bits, metrics['test_mse'],
            metrics['test_kl'])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('runs', nargs='+', help='run folders trained with --ema')
    p.add_argument('--iw_samples', type=int, default=100)
    p.add_argument('--iw_images', type=int, default=1000)
    args = p.parse_args()
    rows = []
    for run_dir in args.runs:
        ema = run_folder.read_config(run_dir).ema
        if ema is None:
            print(f'{run_dir}: no --ema, skipped')
            continue
        for average in (True, False):
            figures = measure(run_dir, average, args.iw_samples, args.iw_images)
            rows.append((run_dir, f'average ({ema})' if average else 'trained', *figures))
    print(f'\n| run | weights | 8-bit bits/dim | IW 8-bit bits/dim (K = {args.iw_samples}, '
          f'{args.iw_images} images) | test MSE | KL (nats) |\n|---|---|---|---|---|---|')
    for run_dir, weights, bits, iw_bits, mse, kl in rows:
        print(f'| {run_dir} | {weights} | {bits:.3f} | {iw_bits:.3f} | {mse:.4f} | {kl:.1f} |')


if __name__ == '__main__':
    main()

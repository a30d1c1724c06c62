"""Trains and evaluates every model on one data set with one budget, side by side.

python compare.py --dataset fashion_mnist --epochs 5 --beta_vae 0.1 --output_dir output/compare

Writes into --output_dir one run folder per model (resumed if present), and
results.md (the table), results.json, samples.png (each model's 10x10 prior
samples, labelled) and bits_per_dim.png (test bits/dim against training steps).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

import evaluate
import losses
import train
import utils
from utils import UsageError

COLUMNS = [  # (header, key in the evaluation, format)
    ('model', 'name', '{}'), ('-ELBO (nats)', 'test_neg_elbo', '{:.1f}'),
    ('IW-NLL (nats)', 'iw_nll', '{:.1f}'), ('bits/dim', 'test_bits_per_dim', '{:.3f}'),
    ('IW bits/dim', 'iw_bits_per_dim', '{:.3f}'),
    ('8-bit bits/dim', 'test_bits_per_dim_discrete', '{:.3f}'),
    ('IW 8-bit bits/dim', 'iw_bits_per_dim_discrete', '{:.3f}'),
    ('test MSE', 'test_mse', '{:.4f}'), ('KL (nats)', 'test_kl', '{:.1f}'),
    ('log σ', 'test_log_sigma', '{:.2f}'), ('FID', 'fid', '{:.2f}'),
    ('train time', 'train_seconds', '{:.0f} s'),
]


def make_parser():
    p = utils.ArgumentParser(prog='compare.py', description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--output_dir', default='output/compare', help='folder of the runs and results')
    p.add_argument('--dataset', default='svhn_cropped', help='as for train.py')
    p.add_argument('--data_dir', default=None, help='as for train.py')
    p.add_argument('--data_range', choices=('-1,1', '0,1'), default='-1,1',
                   help='as for train.py; write --data_range=-1,1 with "="')
    p.add_argument('--epochs', type=int, default=10, help='training epochs of every model')
    p.add_argument('--max_steps', type=int, default=None, help='stop every model after this many steps')
    p.add_argument('--batch_size', type=int, default=64, help='as for train.py')
    p.add_argument('--image_size', type=int, choices=(28, 32, 64), default=28, help='as for train.py')
    p.add_argument('--z_dim', type=int, default=20, help='as for train.py')
    p.add_argument('--seed', type=int, default=0, help='as for train.py')
    p.add_argument('--models', default=','.join(losses.DECODERS),
                   help='comma-separated models to train (default: every decoder of losses.py)')
    p.add_argument('--beta_vae', type=float, default=None,
                   help='also train the gaussian model with this KL weight (a beta-VAE)')
    p.add_argument('--iw_samples', type=int, default=1000, help='as for evaluate.py')
    p.add_argument('--iw_images', type=int, default=None, help='as for evaluate.py')
    p.add_argument('--fid_samples', type=int, default=10000, help='as for evaluate.py')
    p.add_argument('--features', choices=evaluate.FEATURE_EXTRACTORS, default='domain',
                   help='FID features, as for evaluate.py')
    return p


def parse_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(',') if m]
    unknown = [m for m in args.models if m not in losses.DECODERS]
    if unknown or not args.models:
        parser.error(f'--models must list models of {list(losses.DECODERS)}, got {args.models}')
    for name in ('epochs', 'batch_size', 'z_dim', 'iw_samples', 'fid_samples', 'max_steps', 'iw_images'):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f'--{name} must be positive, got {value}')
    if args.beta_vae is not None and not (args.beta_vae > 0 and math.isfinite(args.beta_vae)):
        parser.error(f'--beta_vae must be a positive number, got {args.beta_vae}')
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f'--output_dir {args.output_dir} is a file, not a folder')
    for _, config in runs(args):  # the checks of train.py, before anything is trained
        try:
            train.check_config(config)
        except UsageError as e:
            parser.error(str(e))
    return args


def runs(args):
    """(label, train.Config) of every run of the comparison."""
    base = dict(output_dir=args.output_dir, dataset=args.dataset, data_dir=args.data_dir,
                data_range=args.data_range, epochs=args.epochs, max_steps=args.max_steps,
                batch_size=args.batch_size, image_size=args.image_size, z_dim=args.z_dim,
                seed=args.seed)
    out = [(m, train.Config(model=m, experiment_name=m, **base)) for m in args.models]
    if args.beta_vae is not None:
        name = f'beta_vae_{args.beta_vae:g}'
        out.append((f'beta-VAE (beta={args.beta_vae:g})',
                    train.Config(model='gaussian', beta=args.beta_vae, experiment_name=name, **base)))
    return out


def markdown_table(rows):
    lines = ['| ' + ' | '.join(h for h, _, _ in COLUMNS) + ' |',
             '|' + '---|' * len(COLUMNS)]
    for row in rows:
        lines.append('| ' + ' | '.join('–' if row.get(k) is None else f.format(row[k])
                                       for _, k, f in COLUMNS) + ' |')
    return '\n'.join(lines) + '\n'


def samples_figure(path, labelled_grids):
    """Puts each run's sample grid side by side under its label."""
    label_height, gap = 24, 8
    grids = [np.asarray(Image.open(p).convert('RGB')) for _, p in labelled_grids]
    h = max(g.shape[0] for g in grids)
    w = sum(g.shape[1] for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new('RGB', (w, h + label_height), 'white')
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (label, _), grid in zip(labelled_grids, grids):
        draw.text((x + 4, 5), label, fill='black')
        canvas.paste(Image.fromarray(grid), (x, label_height))
        x += grid.shape[1] + gap
    utils.atomic_write(path, lambda tmp: canvas.save(tmp, format='PNG'))


def bits_per_dim_plot(path, curves, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, steps, values in curves:
        ax.plot(steps, values, marker='o', label=label)
    ax.set_xlabel('training step')
    ax.set_ylabel('test bits/dim (0-255 scale)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    utils.atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
    plt.close(fig)


def compare(args):
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f'cannot write to {args.output_dir}: {e.strerror}') from None
    plan = runs(args)
    results, start = [], time.time()
    for i, (label, config) in enumerate(plan):
        done = time.time() - start
        left = f', about {done / i * (len(plan) - i) / 60:.0f} min left' if i else ''
        budget = f'{config.epochs} epochs' + (f', at most {config.max_steps} steps'
                                              if config.max_steps else '')
        print(f'[{i + 1}/{len(plan)}] {label}: training {budget} '
              f'({done / 60:.1f} min elapsed{left})', flush=True)
        train.train(config)
        print(f'[{i + 1}/{len(plan)}] {label}: evaluating', flush=True)
        result = evaluate.evaluate_run(config.run_dir, args.iw_samples, args.iw_images,
                                       args.fid_samples, args.features)
        result['fid'] = result.get(f'fid_{args.features}')
        results.append({'name': label, **result})
    write_outputs(args, results)
    print(markdown_table(results))
    print(f'compared {len(plan)} runs in {(time.time() - start) / 60:.1f} min; '
          f'results in {args.output_dir}/results.md')
    return results


def write_outputs(args, results):
    out = args.output_dir
    utils.write_text(os.path.join(out, 'results.json'), json.dumps(results, indent=2) + '\n')
    title = f'{args.dataset}, data range [{args.data_range}]'
    details = (f'{title}; FID features: {args.features}, N = {args.fid_samples}; '
               f'IW-NLL with K = {args.iw_samples} on '
               f"{f'the first {args.iw_images}' if args.iw_images else 'all'} test images")
    utils.write_text(os.path.join(out, 'results.md'), f'{details}\n\n' + markdown_table(results))
    grids, curves = [], []
    for r in results:
        run_dir = r['run']
        grids.append((r['name'], os.path.join(run_dir, 'images', f"samples_{r['step']:08d}.png")))
        rows = [row for row in utils.read_jsonl(os.path.join(run_dir, 'metrics.jsonl'))
                if 'test_bits_per_dim' in row]
        curves.append((r['name'], [row['step'] for row in rows],
                       [row['test_bits_per_dim'] for row in rows]))
    samples_figure(os.path.join(out, 'samples.png'), grids)
    bits_per_dim_plot(os.path.join(out, 'bits_per_dim.png'), curves, title)


def main(argv=None):
    args = parse_args(argv)
    try:
        compare(args)
    except UsageError as e:
        print(f'compare.py: error: {e}', file=sys.stderr)
        return 1 if isinstance(e, train.RunFailed) else 2
    except SystemExit:  # a run was interrupted (130, 143) and saved
        train.ignore_interrupts()
        raise
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Trains and evaluates every model on one data set with one budget, side by side.

python compare.py --dataset fashion_mnist --epochs 5 --beta_sweep 0.003,0.01,0.03,0.1,0.3,1 --output_dir output/compare

Writes into --output_dir one run folder per model (resumed if present), and
results.md (the table, with the FID under the N(0, I) prior and under the ex-post
Gaussian mixture prior), results.json, samples.png (a row per run: its 10x10 samples of
each prior, side by side) and bits_per_dim.png (test bits/dim against training steps).
With --beta_sweep it also trains the fixed-sigma `gaussian` decoder with each KL weight
beta (a beta-VAE), and draws rate_distortion.png (KL against test MSE) and
fid_vs_beta.png (FID against beta, each decoder at its effective beta).
"""
import utils  # first: from here on a Ctrl-C ends the command in one line

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

import config as settings
import files
import run_folder
from config import Config
from utils import UsageError

PRIORS = settings.registry('priors', 'PRIORS')


COLUMNS = [  # (header, key in the evaluation, format)
    ('model', 'name', '{}'), ('-ELBO (nats)', 'test_neg_elbo', '{:.1f}'),
    ('IW-NLL (nats)', 'iw_nll', '{:.1f}'), ('bits/dim', 'test_bits_per_dim', '{:.3f}'),
    ('IW bits/dim', 'iw_bits_per_dim', '{:.3f}'),
    ('8-bit bits/dim', 'test_bits_per_dim_discrete', '{:.3f}'),
    ('IW 8-bit bits/dim', 'iw_bits_per_dim_discrete', '{:.3f}'),
    ('test MSE', 'test_mse', '{:.4f}'), ('KL (nats)', 'test_kl', '{:.1f}'),
    ('log σ', 'test_log_sigma', '{:.2f}'), ('effective β', 'effective_beta', '{:.3g}'),
    ('active units', 'active_units', '{}'), ('train time', 'train_seconds', '{:.0f} s'),
]  # then the FID of each feature network under each prior (fid_columns)
GROUP_COLUMNS = [  # with several latent groups (--arch hierarchical), top first
    ('KL per group (nats)', 'kl_per_group', '{}'), ('active units per group', 'active_per_group', '{}'),
    ('skipped updates', 'skipped_updates', '{}'), ('diverged', 'diverged', '{}'),
]
SWEEP_COLUMNS = [
    ('run', 'name', '{}'), ('β (effective for decoders)', 'effective_beta', '{:.3g}'),
    ('KL (nats)', 'test_kl', '{:.1f}'), ('test MSE', 'test_mse', '{:.4f}'),
    ('8-bit bits/dim', 'test_bits_per_dim_discrete', '{:.3f}'), ('FID N(0, I)', 'fid', '{:.2f}'),
    ('FID GMM', 'fid_gmm', '{:.2f}'), ('active units', 'active_units', '{}'),
]
BETA_VAE_MODEL = 'gaussian'


def decoders():
    """losses.DECODERS' names, with those registered at run time (config.registry)."""
    return list(settings.registry('losses', 'DECODERS'))  # the fixed-sigma decoder a beta-VAE weights


# train.py's flags that a comparison shares across its runs (Config fields), and its defaults
# where they differ from train.py's.
SHARED_FLAGS = ('output_dir', 'dataset', 'data_dir', 'data_range', 'epochs', 'max_steps',
                'batch_size', 'lr', 'image_size', 'z_dim', 'seed', 'arch', 'width', 'depth',
                'posterior', 'ema')
DEFAULTS = {'output_dir': 'output/compare'}
# The heuristics of deep VAEs, for the runs of --heuristics only.
HEURISTIC_FLAGS = settings.names(Config, settings.HEURISTICS)


def make_parser():
    p = utils.ArgumentParser(prog='compare.py', description=__doc__.splitlines()[0])
    settings.add_flags(p, Config, SHARED_FLAGS, DEFAULTS)
    p.add_argument('--models', default=','.join(decoders()),
                   help='comma-separated models to train (default: every decoder of losses.py)')
    p.add_argument('--beta_vae', type=utils.positive(float), default=None,
                   help='also train the gaussian model with this KL weight (a beta-VAE)')
    p.add_argument('--beta_sweep', default='',
                   help='comma-separated KL weights: a beta-VAE (the gaussian model) for each, '
                        'and the rate-distortion and FID-against-beta figures')
    p.add_argument('--heuristics', default='',
                   help='comma-separated models also trained with ' + ', '.join(
                       '--' + k for k in HEURISTIC_FLAGS) + ' (which no other run uses), as '
                       '<model>_heuristics')
    settings.add_flags(p, Config, HEURISTIC_FLAGS)
    settings.add_flags(p, settings.Evaluation)
    return p


def parse_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(',') if m]
    unknown = [m for m in args.models if m not in decoders()]
    if unknown or not args.models:
        parser.error(f'--models must list models of {list(decoders())}, got {args.models}')
    args.heuristics = [m for m in args.heuristics.split(',') if m]
    if any(m not in decoders() for m in args.heuristics):
        parser.error(f'--heuristics must list models of {list(decoders())}, '
                     f'got {args.heuristics}')
    given = [k for k in HEURISTIC_FLAGS if getattr(args, k) is not None]
    if given and not args.heuristics:  # no run would use them
        parser.error(f'--{given[0]} applies to the runs of --heuristics only: give --heuristics '
                     f'MODELS, or leave it out')
    if args.heuristics and not given:
        parser.error('--heuristics needs at least one of ' + ', '.join('--' + k for k in
                                                                       HEURISTIC_FLAGS))
    try:
        args.beta_sweep = sorted({utils.positive(float)(b) for b in args.beta_sweep.split(',')
                                  if b.strip()})
    except argparse.ArgumentTypeError as e:  # not a ValueError
        parser.error(f'--beta_sweep must list positive numbers: {e}')
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f'--output_dir {args.output_dir} is a file, not a folder')
    for _, config, _ in runs(args):  # the checks of train.py, before anything is written
        try:
            config.check()
        except UsageError as e:
            parser.error(str(e))
    if args.inception_weights is not None:
        files.check_hdf5(args.inception_weights, '--inception_weights')
    args.evaluation = settings.from_flags(settings.Evaluation, args)
    return args


def beta_text(beta):
    """beta as its run's name and label write it: short ('0.1', '1e-05', '3', as '{:g}' writes it,
    which names the runs of earlier versions), but all its digits when '{:g}' would round it, so
    that two values of beta never share one run folder (0.1 and 0.1000001)."""
    short = f'{beta:g}'
    return short if float(short) == beta else repr(float(beta))


def runs(args):
    """(label, train.Config, sweep beta or None) of every run of the comparison: the models,
    then a beta-VAE for --beta_vae and each --beta_sweep value; a beta-VAE whose config is a
    model's (beta = 1) is that model's run, marked as a sweep point."""
    base = {name: getattr(args, name) for name in SHARED_FLAGS}
    out = [[m, Config(model=m, experiment_name=m, **base), None] for m in args.models]
    heuristics = {k: getattr(args, k) for k in HEURISTIC_FLAGS}
    out += [[f'{m} + ' + ', '.join(k for k, v in heuristics.items() if v is not None),
             Config(model=m, experiment_name=f'{m}_heuristics', **base, **heuristics), None]
            for m in args.heuristics]
    betas = [(b, True) for b in args.beta_sweep]
    if args.beta_vae is not None and args.beta_vae not in args.beta_sweep:
        betas.append((args.beta_vae, False))
    for beta, swept in betas:
        config = Config(model=BETA_VAE_MODEL, beta=beta,
                        experiment_name=f'beta_vae_{beta_text(beta)}', **base)
        same = [run for run in out if dataclasses.replace(run[1], experiment_name='') ==
                dataclasses.replace(config, experiment_name='')]
        if same:
            same[0][2] = beta if swept else None
        else:
            out.append([f'beta-VAE (beta={beta_text(beta)})', config, beta if swept else None])
    return [tuple(run) for run in out]


def feature_networks(args):
    """The feature networks of the evaluations, in --features' order ([] for none)."""
    return [] if args.features == 'none' else args.features.split(',')


def fid_columns(networks):
    return [(f'FID {name} {net}', f'fid_{net}{suffix}', '{:.2f}') for net in networks
            for name, suffix in (('N(0, I)', ''), ('GMM', '_gmm'))]


def temperature_of(key, prefix):
    """The temperature of an evaluation key (fid_domain_gmm_t0.8 -> 0.8; 1 without _t), or None
    if the key is not prefix's ('fid_domain' or 'fid_domain_gmm') at some temperature."""
    if key == prefix:
        return 1.0
    if key.startswith(prefix + '_t'):
        try:
            return float(key[len(prefix) + 2:])
        except ValueError:
            return None
    return None


def best_temperature(result, prefix):
    """(t, FID) of the lowest FID of the keys prefix(_t<t>), or None."""
    found = [(t, result[k]) for k in result if (t := temperature_of(k, prefix)) is not None]
    return min(found, key=lambda p: p[1]) if found else None


def quality_rows(results, networks):
    """One row per run and prior: each network's FID, KID (x 10^3, with its standard deviation
    over subsets), precision and recall, and its best temperature by FID."""
    rows = []
    for r in results:
        for prior, suffix in PRIORS.items():
            row = {'name': r['name'], 'prior': 'N(0, I)' if prior == 'normal' else 'GMM'}
            for net in networks:
                key = f'{net}{suffix}'
                if f'fid_{key}' not in r:
                    continue
                row[f'fid_{net}'] = r[f'fid_{key}']
                row[f'kid_{net}'] = (f"{1e3 * r[f'kid_{key}']:.2f} ± {1e3 * r[f'kid_std_{key}']:.2f}"
                                     if f'kid_{key}' in r else None)
                row[f'pr_{net}'] = (f"{r[f'precision_{key}']:.2f} / {r[f'recall_{key}']:.2f}"
                                    if f'precision_{key}' in r else None)
                best = best_temperature(r, f'fid_{key}')
                row[f'best_t_{net}'] = f'{best[0]:g}: {best[1]:.2f}' if best else None
            if len(row) > 2:
                rows.append(row)
    return rows


def quality_columns(networks, temperatures):
    columns = [('run', 'name', '{}'), ('prior', 'prior', '{}')]
    for net in networks:
        columns += [(f'FID {net}', f'fid_{net}', '{:.2f}'), (f'KID×10³ {net}', f'kid_{net}', '{}'),
                    (f'precision / recall {net}', f'pr_{net}', '{}')]
        if temperatures:
            columns.append((f'best t: FID {net}', f'best_t_{net}', '{}'))
    return columns


TIE = 0.02  # FIDs within 2% of each other: a network that cannot tell two runs apart


def disagreements(results, networks):
    """Lines naming the pairs of runs that two feature networks rank differently by FID (t = 1),
    under each prior: opposite orders, or one network separating what the other ties (FIDs
    within TIE of each other); [] when they agree."""
    def order(x, y):
        return 0 if abs(x - y) <= TIE * min(x, y) else (1 if x > y else -1)

    lines = []
    for a, b in ((a, b) for i, a in enumerate(networks) for b in networks[i + 1:]):
        for prior, suffix in PRIORS.items():
            fids = [(r['name'], r.get(f'fid_{a}{suffix}'), r.get(f'fid_{b}{suffix}'))
                    for r in results]
            fids = [f for f in fids if f[1] is not None and f[2] is not None]
            where = 'N(0, I)' if prior == 'normal' else 'the mixture prior'
            for i, x in enumerate(fids):
                for y in fids[i + 1:]:
                    in_a, in_b = order(x[1], y[1]), order(x[2], y[2])
                    if in_a == in_b:
                        continue
                    def says(net, k, o):
                        if o == 0:
                            return (f'{net} ties them ({x[k]:.2f} and {y[k]:.2f}: within '
                                    f'{TIE:.0%})')
                        first, second = (x, y) if o < 0 else (y, x)
                        return f'{net} puts {first[0]} first ({first[k]:.2f} against {second[k]:.2f})'
                    verb = 'disagree' if in_a * in_b < 0 else 'do not agree'
                    lines.append(f'- Under {where} the feature networks {verb} on {x[0]} and '
                                 f'{y[0]}: {says(a, 1, in_a)}, {says(b, 2, in_b)}.')
    return lines


def markdown_table(rows, columns=COLUMNS):
    lines = ['| ' + ' | '.join(h for h, _, _ in columns) + ' |',
             '|' + '---|' * len(columns)]
    for row in rows:
        lines.append('| ' + ' | '.join('–' if row.get(k) is None else f.format(row[k])
                                       for _, k, f in columns) + ' |')
    return '\n'.join(lines) + '\n'


def samples_figure(path, runs, columns):
    """One labelled row per run, one column per prior: each cell a run's 10x10 grid of samples.

    runs: (label, [path of a grid PNG per column]); columns: the column titles.
    """
    label_width, title_height, gap = 150, 22, 8
    grids = [[np.asarray(Image.open(p).convert('RGB')) for p in paths] for _, paths in runs]
    h = max(g.shape[0] for row in grids for g in row)
    w = max(g.shape[1] for row in grids for g in row)
    canvas = Image.new('RGB', (label_width + len(columns) * (w + gap),
                               title_height + len(runs) * (h + gap)), 'white')
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(columns):
        draw.text((label_width + k * (w + gap) + 4, 5), title, fill='black')
    for r, ((label, _), row) in enumerate(zip(runs, grids)):
        y = title_height + r * (h + gap)
        draw.text((4, y + h // 2 - 6), label, fill='black')
        for k, grid in enumerate(row):
            canvas.paste(Image.fromarray(grid), (label_width + k * (w + gap), y))
    files.atomic_write(path, lambda tmp: canvas.save(tmp, format='PNG'))


def bits_per_dim_plot(path, curves, title):
    fig, ax = _pyplot().subplots(figsize=(7, 4.5), dpi=100)
    for label, steps, values in curves:
        ax.plot(steps, values, marker='o', label=label)
    ax.set_xlabel('training step')
    ax.set_ylabel('test bits/dim (0-255 scale)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def compare(args):
    # The work: TensorFlow is imported by now (utils.run_command).
    import checkpoints
    import data
    import evaluation
    import features
    import models
    import trainer
    # The data, and whether they give the FID's features, before anything is written.
    for network in args.features.split(','):
        features.check_features(data.load(args.dataset, args.data_dir, args.image_size, args.seed),
                                network)
    plan = runs(args)
    for _, config, _ in plan:  # train.py's check, before anything is written
        models.check_memory(config, copies=6)
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f'cannot write to {args.output_dir}: {e.strerror}') from None
    results, start, worked = [], time.time(), 0  # worked: runs evaluated here (not kept)
    for i, (label, config, sweep_beta) in enumerate(plan):
        done = time.time() - start
        left = f', about {done / worked * (len(plan) - i) / 60:.0f} min left' if worked else ''
        budget = f'{config.epochs} epochs' + (f', at most {config.max_steps} steps'
                                              if config.max_steps else '')
        print(f'[{i + 1}/{len(plan)}] {label}: training {budget} '
              f'({done / 60:.1f} min elapsed{left})', flush=True)
        try:
            trainer.train(config)
            diverged = 'no'
        except checkpoints.Diverged as e:  # a result of the comparison: its last good checkpoint
            print(f'[{i + 1}/{len(plan)}] {label}: {e}', flush=True)
            diverged = f'step {e.step}'
        result = previous_evaluation(config.run_dir, args, evaluation, checkpoints)
        worked += result is None
        if result is None and not checkpoints.CheckpointFolder(
                checkpoints.checkpoint_dir(config.run_dir)).complete:
            # Diverged before its first checkpoint: a result without an evaluation.
            print(f'[{i + 1}/{len(plan)}] {label}: no checkpoint to evaluate', flush=True)
            result = {'run': config.run_dir, 'model': config.model, 'beta': config.beta}
        elif result is None:
            print(f'[{i + 1}/{len(plan)}] {label}: evaluating', flush=True)
            result = evaluation.evaluate_run(config.run_dir, args.evaluation)
        else:
            print(f'[{i + 1}/{len(plan)}] {label}: evaluation.json is of the last checkpoint '
                  f'(step {result["step"]}) with these settings: kept', flush=True)
        first = args.features.split(',')[0]  # the tables' FID columns: the first network's
        result['fid'] = result.get(f'fid_{first}')
        result['fid_gmm'] = result.get(f'fid_{first}_gmm')
        rows = run_folder.read_metrics(config.run_dir)
        result.update(group_summary(result), diverged=diverged,
                      skipped_updates=rows[-1].get('skipped_updates', 0) if rows else None)
        # The run folder as this process reaches it (a kept evaluation.json names it as the
        # process that wrote it did, maybe relative to another working folder).
        results.append({'name': label, 'sweep_beta': sweep_beta, **result, 'run': config.run_dir})
    write_outputs(args, results)
    print(markdown_table(results))
    print(f'compared {len(plan)} runs in {(time.time() - start) / 60:.1f} min; '
          f'results in {args.output_dir}/results.md')
    return results


def group_summary(result):
    """The test KL and active units of each latent group, top first, as 'a / b / c' (None
    for a network with one latent)."""
    groups = sorted(int(k[len('test_kl_group'):]) for k in result if k.startswith('test_kl_group'))
    if not groups:
        return {'kl_per_group': None, 'active_per_group': None}
    return {'kl_per_group': ' / '.join(f"{result[f'test_kl_group{l}']:.1f}" for l in groups),
            'active_per_group': ' / '.join(str(result[f'active_units_group{l}']) for l in groups)}


def previous_evaluation(run_dir, args, evaluation, checkpoints):
    """The run's evaluation.json if it evaluated the newest checkpoint with the settings asked
    for now (so that a comparison resumed after an interruption does not evaluate again), else
    None."""
    try:
        with open(os.path.join(run_dir, run_folder.EVALUATION_FILE)) as f:
            result = json.load(f)
    except (OSError, ValueError):
        return None
    complete = checkpoints.CheckpointFolder(checkpoints.checkpoint_dir(run_dir)).complete
    if not isinstance(result, dict) or \
            result.get('settings') != evaluation.settings_record(args.evaluation, PRIORS) or \
            result.get('step') != (complete[-1] if complete else None):
        return None
    return result


def write_outputs(args, results):
    out = args.output_dir
    files.write_text(os.path.join(out, 'results.json'), json.dumps(results, indent=2) + '\n')
    title = f'{args.dataset}, data range [{args.data_range}]'
    components = ', '.join(sorted({str(r['gmm_components']) for r in results if 'gmm_components' in r})) or '–'
    iw_images = (f'the first {args.iw_images} test images (the other columns: all of them)'
                 if args.iw_images else 'all test images')
    details = (f'{title}; feature networks: {args.features}, N = {args.fid_samples}, samples of '
               f'the N(0, I) prior and of a {components}-component Gaussian mixture fitted to '
               f'the encoder means of the training split (GMM); IW-NLL with K = {args.iw_samples} '
               f'on {iw_images}')
    reference = next((r for r in results if 'fid_samples' in r), None)
    if reference is not None:
        details += (f"; real images for reference: {reference['fid_samples']} training images "
                    f'against the test images, FID ' + ', '.join(
                        f"{reference[f'fid_{net}_train_images']:.2f} ({net})"
                        for net in feature_networks(args)
                        if f'fid_{net}_train_images' in reference))
    networks = feature_networks(args)
    temperatures = args.temperatures != '1'
    text = f'{details}\n\n' + markdown_table(results, COLUMNS + fid_columns(networks))
    text += '\n' + markdown_table(results, COLUMNS[:1] + GROUP_COLUMNS)
    if networks:
        text += ('\nSample quality at t = 1 in each feature space (KID: the unbiased MMD² with '
                 'the cubic kernel; precision and recall: k = 3 nearest neighbours'
                 + ('; best t: the temperature of the lowest FID of ' + args.temperatures
                    if temperatures else '') + '):\n\n'
                 + markdown_table(quality_rows(results, networks),
                                  quality_columns(networks, temperatures)))
        lines = disagreements(results, networks)
        text += '\n' + ('\n'.join(lines) if lines else
                        'The feature networks rank the runs alike by FID under both priors.') + '\n'

    swept = any(r['sweep_beta'] is not None for r in results)
    if swept:
        by_beta = sorted(results, key=lambda r: (r.get('effective_beta') is None,
                                                 r.get('effective_beta') or 0))
        text += ('\nThe beta sweep beside every decoder at its effective beta (the KL weight of '
                 'the sigma = 1 gaussian decoder with the same gradients; a summary only for a '
                 'sigma per image or per value):\n\n'
                 + markdown_table(by_beta, SWEEP_COLUMNS))
    files.write_text(os.path.join(out, 'results.md'), text)
    figure_rows, curves = [], []
    evaluated = [r for r in results if 'step' in r]  # not diverged before a checkpoint
    for r in evaluated:
        run_dir = r['run']
        grid = os.path.join(run_dir, run_folder.IMAGES, run_folder.EVALUATED + '{}_' + f"{r['step']:08d}.png")
        figure_rows.append((r['name'], [grid.format(PRIORS[p]) for p in PRIORS]))
        rows = [row for row in run_folder.read_metrics(run_dir) if 'test_bits_per_dim' in row]
        curves.append((r['name'], [row['step'] for row in rows],
                       [row['test_bits_per_dim'] for row in rows]))
    if not evaluated:
        return
    samples_figure(os.path.join(out, 'samples.png'), figure_rows,
                   ['prior N(0, I)', f'mixture prior ({components} components)'])
    bits_per_dim_plot(os.path.join(out, 'bits_per_dim.png'), curves, title)
    if any(r['sweep_beta'] is not None for r in evaluated):
        sweep_figures(out, evaluated, title)
    if networks:
        precision_recall_figure(os.path.join(out, 'precision_recall.png'), evaluated, networks,
                                title)
    if networks and temperatures:
        temperature_figure(os.path.join(out, 'fid_vs_temperature.png'), evaluated, networks,
                           title)


def precision_recall_figure(path, results, networks, title):
    """Precision against recall in each feature space: a run's points, one per prior, joined."""
    fig, axes, colors = _per_network(networks)
    for ax, net in zip(axes, networks):
        for i, r in enumerate(results):
            points = [(r[f'recall_{net}{s}'], r[f'precision_{net}{s}'], m)
                      for s, m in (('', 'o'), ('_gmm', 's')) if f'recall_{net}{s}' in r]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], '-', color=colors[i % 10],
                        alpha=0.5)
                for x, y, marker in points:
                    ax.plot(x, y, marker, color=colors[i % 10],
                            label=r['name'] if marker == 'o' else None)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel('recall (how much of the data the samples cover)')
        ax.set_ylabel('precision (how much of the samples look real)')
        ax.set_title(f'{net} features: o N(0, I), □ mixture prior')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f'Precision and recall, {title}')
    _save(fig, path)


def temperature_figure(path, results, networks, title):
    """FID against the sampling temperature in each feature space: a line per run and prior."""
    fig, axes, colors = _per_network(networks)
    for ax, net in zip(axes, networks):
        for i, r in enumerate(results):
            for suffix, style in (('', '-'), ('_gmm', '--')):
                points = sorted((t, r[k]) for k in r
                                if (t := temperature_of(k, f'fid_{net}{suffix}')) is not None)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], style, marker='o',
                            color=colors[i % 10], label=r['name'] if suffix == '' else None)
        ax.set_xlabel('temperature t')
        ax.set_ylabel(f'FID ({net} features; solid N(0, I), dashed mixture)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f'FID against the sampling temperature, {title}')
    _save(fig, path)


def _per_network(networks):
    """A figure of one panel per feature network: (figure, panels, a color per run)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(networks), figsize=(5.5 * len(networks), 5), dpi=100,
                             squeeze=False)
    return fig, axes[0], plt.get_cmap('tab10').colors


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    fig.tight_layout()
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format='png'))
    _pyplot().close(fig)


def sweep_figures(out, results, title):
    """rate_distortion.png (KL against test MSE: the sweep as a line, each other run a point)
    and fid_vs_beta.png (FID under both priors against beta: the sweep as lines, each other
    run as horizontal lines and a star at its effective beta)."""
    plt = _pyplot()
    sweep = sorted((r for r in results if r['sweep_beta'] is not None), key=lambda r: r['sweep_beta'])
    others = [r for r in results if r['sweep_beta'] is None]
    colors = plt.get_cmap('tab10').colors

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
    ax.plot([r['test_kl'] for r in sweep], [r['test_mse'] for r in sweep], 'o-', color='0.4',
            label='β-VAE sweep (gaussian, σ = 1)')
    for r in sweep:
        ax.annotate(f"β={beta_text(r['sweep_beta'])}", (r['test_kl'], r['test_mse']), fontsize=8,
                    xytext=(4, 4), textcoords='offset points')
    for i, r in enumerate(others):
        ax.plot(r['test_kl'], r['test_mse'], marker='*', markersize=12, linestyle='none',
                color=colors[i % 10], label=r['name'])
    ax.set_yscale('log')
    _finish(fig, ax, 'rate: KL(q(z|x) || p(z)) on the test split (nats per image)',
            'distortion: test MSE per value (z = μ)', f'Rate and distortion, {title}',
            os.path.join(out, 'rate_distortion.png'))

    if any(r.get('fid') is None for r in results):  # no features, or no such prior
        return
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
    betas = [r['sweep_beta'] for r in sweep]
    ax.plot(betas, [r['fid'] for r in sweep], 'o-', color='0.2', label='β-VAE, N(0, I) prior')
    if all(r.get('fid_gmm') is not None for r in sweep):
        ax.plot(betas, [r['fid_gmm'] for r in sweep], 's--', color='0.5', label='β-VAE, GMM prior')
    for i, r in enumerate(others):
        color = colors[i % 10]
        for key, style in (('fid', '-'), ('fid_gmm', '--')):
            if r.get(key) is not None:
                ax.axhline(r[key], color=color, linestyle=style, linewidth=0.8)
        if r.get('effective_beta') is not None:
            ax.plot(r['effective_beta'], r['fid'], marker='*', markersize=12, color=color,
                    linestyle='none', label=f"{r['name']} at β_eff = {r['effective_beta']:.3g}")
            if r.get('fid_gmm') is not None:
                ax.plot(r['effective_beta'], r['fid_gmm'], marker='*', markersize=9, color=color,
                        markerfacecolor='none', linestyle='none')
        else:
            ax.plot([], [], color=color, label=f"{r['name']} (no effective β)")
    _finish(fig, ax, 'β (KL weight of the σ = 1 decoder); stars: each decoder at its effective β',
            'FID (lines: N(0, I) solid, GMM dashed)', f'FID against β, {title}',
            os.path.join(out, 'fid_vs_beta.png'))


def _finish(fig, ax, xlabel, ylabel, title, path):
    """Log-scale x axis, labels, grid and legend; saves the figure."""
    ax.set_xscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
    _save(fig, path)


def main(argv=None):
    return utils.run_command('compare.py', parse_args, compare, argv)


if __name__ == '__main__':
    sys.exit(main())

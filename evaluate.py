"""Evaluates a trained run on its test split: python evaluate.py --run output/sigma

Reports the -ELBO, an importance-weighted estimate of -log p(x) with K samples,
bits/dim (of the density and of the 8-bit values), the test MSE, the active latent
units, the effective beta of the decoder, and the FID between N prior samples and N test images,
with features from a small classifier trained on the data set's own labels
(offline; trained once and cached) or Keras' InceptionV3, under two priors:
N(0, I) and the ex-post Gaussian mixture fitted to the encoder means of the
training split (prior_gmm.npz, fitted here when missing or stale; generate.py
samples it too). Writes <run>/evaluation.json and, with --export, the N samples
as samples.npz and PNGs. The measuring is evaluation.py's.
"""
import utils  # first: from here on a Ctrl-C ends the command in one line

import sys

import config as settings
import files
import run_folder

PRIORS = settings.registry('priors', 'PRIORS')


def make_parser():
    p = utils.ArgumentParser(prog='evaluate.py', description=__doc__.splitlines()[0])
    p.add_argument('--run', required=True, help='the run folder, e.g. output/sigma')
    settings.add_flags(p, settings.Evaluation)
    p.add_argument('--export', action='store_true',
                   help='write the N samples as samples.npz and samples_png/ in the run folder '
                        '(the mixture prior\'s as samples_gmm.npz and samples_gmm_png/)')
    p.add_argument('--prior', default=','.join(PRIORS),
                   help='comma-separated priors whose samples get an FID: normal (N(0, I)), gmm '
                        '(the Gaussian mixture of prior_gmm.npz, fitted first if missing or stale)')
    return p


def parse_args(argv=None):
    """The flags, and the paths they name checked: before TensorFlow is imported, so that a
    wrong one is said at once (UsageError: one line, exit status 2)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    args.prior = parse_priors(args.prior, parser)
    if not args.run.strip():
        parser.error('--run must name a run folder, got an empty string')
    check_paths(args, 'evaluate.py')
    return args


def check_paths(args, program):
    """--run is a run folder it can write its results into; --inception_weights an HDF5 file."""
    files.check_input(args.run, '--run', 'folder')
    run_folder.read_config(args.run)
    run_folder.check_writable(args.run, program)
    if args.inception_weights is not None:
        files.check_hdf5(args.inception_weights, '--inception_weights')


def parse_priors(text, parser):
    """'normal,gmm' -> ['normal', 'gmm'], or parser.error for a name not in PRIORS."""
    priors = [p for p in text.split(',') if p]
    if not priors or any(p not in PRIORS for p in priors):
        parser.error(f"--prior must list priors of {', '.join(PRIORS)}, got '{text}'")
    return list(dict.fromkeys(priors))


def evaluate(args):
    import evaluation  # the work: TensorFlow is imported by now (utils.run_command)
    result = evaluation.evaluate_run(args.run, settings.from_flags(settings.Evaluation, args),
                                     args.export, prior_names=args.prior)
    for key, value in result.items():
        print(f'{key:28s} {value:.6g}' if isinstance(value, float) else f'{key:28s} {value}')


def main(argv=None):
    return utils.run_command('evaluate.py', parse_args, evaluate, argv)


if __name__ == '__main__':
    sys.exit(main())

"""Trains a sigma-VAE: python train.py --experiment_name sigma --model sigma

Writes the run folder <output_dir>/<experiment_name>/ (see run_folder.py): config.json,
checkpoints/, logs/ (TensorBoard), images/ (prior samples and reconstructions, named by step)
and metrics.jsonl (one row of test-split metrics per epoch). Running the same command again
resumes from the newest checkpoint that restores. The flags are config.py's Config; the
training, trainer.py's.
"""
import utils  # first: from here on a Ctrl-C ends the command in one line

import sys

import config as settings


def make_parser():
    parser = utils.ArgumentParser(
        prog='train.py', description='Train a VAE with a learned, optimal or fixed decoder '
                                     'variance (sigma-VAE).')
    settings.add_flags(parser, settings.Config)
    return parser


def parse_args(argv=None):
    """Command-line arguments -> a checked Config; bad values exit with status 2."""
    parser = make_parser()
    config = settings.from_flags(settings.Config, parser.parse_args(argv))
    try:
        config.check()
    except utils.UsageError as e:
        parser.error(str(e))
    return config


def main(argv=None):
    return utils.run_command('train.py', parse_args, 'trainer:train', argv)


if __name__ == '__main__':
    sys.exit(main())

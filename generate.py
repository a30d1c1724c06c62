"""Uses a trained run: python generate.py COMMAND --run output/sigma ...

  sample       N images from the prior: N(0, I) or the ex-post Gaussian mixture (--prior gmm)
  reconstruct  images (a folder, or the run's test split) beside their reconstructions
  interpolate  linear and spherical interpolation between the encodings of two images
  traverse     one latent dimension at a time around a seed z
  encode       mu and log sigma^2 of the encoder for each image
  fit_prior    fits the Gaussian mixture prior to the encoder means of the training split
  export       a TensorFlow SavedModel with the signatures decode, encode and sample

Images are written as --out FILE.png (a grid), FILE.npz (uint8 arrays) or a folder (one
PNG each). Everything is computed in batches from the run's newest checkpoint and is the
same for the same --seed. The work is generation.py's.
"""
import utils  # first: from here on a Ctrl-C ends the command in one line

import argparse
import os
import sys

import config as settings
import files
import run_folder
from utils import UsageError

IMAGE_OUTPUTS = ('.png', '.npz', 'folder')
OUTPUTS = {'sample': IMAGE_OUTPUTS, 'reconstruct': IMAGE_OUTPUTS, 'interpolate': IMAGE_OUTPUTS,
           'traverse': IMAGE_OUTPUTS, 'encode': ('.npz',), 'export': ('folder',)}

POSITIVE = utils.positive()
AT_LEAST_TWO = utils.positive(minimum=2)


def float_list(text):
    """'0.8' or '1,0.8,0.6' -> [0.8] or [1.0, 0.8, 0.6]: positive numbers, at least one."""
    try:
        values = [utils.positive(float)(v) for v in text.split(',') if v.strip()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected positive numbers, comma-separated, got '{text}'")
    return values


def int_list(text):
    """'3,17' -> [3, 17]: comma-separated integers, at least one."""
    try:
        values = [int(d) for d in text.split(',') if d.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'")
    return values


# A seed of prior samples, as train.py's --seed (TensorFlow's stateless ops would take larger
# ones modulo 2**64, silently).
seed = utils.number(int, 0, settings.MAX_SEED)


def make_parser():
    parser = utils.ArgumentParser(prog='generate.py', description=__doc__.splitlines()[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog=__doc__.split('\n\n')[-1])
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def command(name, description):
        c = commands.add_parser(name, help=description, description=description,
                                formatter_class=utils.HelpFormatter)
        c.add_argument('--run', required=True, help='the run folder, e.g. output/sigma')
        return c

    def out(c, what='FILE.png (a grid), FILE.npz or a folder (one PNG per image)'):
        c.add_argument('--out', required=True, help=what)

    def temperature(c):
        c.add_argument('--temperature', type=float_list, default=None, metavar='T or T1,T2,...',
                       help='sampling temperature (each latent group\'s draw around its mean scaled '
                            'by T): one number for every group, or one per group, top first '
                            '(default: 1)')

    def images(c):
        c.add_argument('--images', default=None,
                       help="a folder of PNG/JPEG files (or one file), or 'test': the run's test split")
        c.add_argument('--test_images', type=int_list, default=None, metavar='I,J,...',
                       help="instead of --images: images of the run's test split, by index")

    seed_help = 'seed of the prior samples; the same seed gives the same images'
    c = command('sample', 'N images from the prior')
    c.add_argument('--n', type=POSITIVE, default=100, help='number of images')
    out(c, "FILE.png (a grid), FILE.npz (uint8 N x H x W x C, key 'images') or a folder")
    c.add_argument('--prior', choices=list(settings.registry('priors', 'PRIORS')), default='normal',
                   help='normal: N(0, I); gmm: the Gaussian mixture fitted to the encoder means of '
                        'the training split (prior_gmm.npz, fitted first if missing or stale)')
    settings.add_flags(c, settings.Evaluation, ['components'])
    c.add_argument('--seed', type=seed, default=0, help=seed_help)
    temperature(c)

    c = command('reconstruct', 'images beside their reconstructions (z = mu)')
    images(c)
    c.add_argument('--n', type=POSITIVE, default=50, help='at most this many images')
    c.add_argument('--plain', action='store_true',
                   help='the reconstructions alone, not each beside its input')
    out(c)

    c = command('interpolate',
                'linear and spherical interpolation between the encodings (mu) of two images')
    c.add_argument('--a', help='the first image file')
    c.add_argument('--b', help='the second image file')
    c.add_argument('--test_images', type=int_list, default=None, metavar='I,J',
                   help="instead of --a and --b: two images of the run's test split, by index")
    c.add_argument('--steps', type=AT_LEAST_TWO, default=10,
                   help='K decoded points from a to b, both ends included')
    out(c, 'FILE.png: two strips (linear, spherical), each a, K steps, b; or FILE.npz or a folder')

    c = command('traverse', 'one latent dimension at a time around a seed z')
    c.add_argument('--dims', type=int_list, default=None,
                   help='comma-separated latent dimensions, one row each (default: those of the '
                        'top group, all of z but for --arch hierarchical)')
    c.add_argument('--range', type=utils.positive(float), default=3.0,
                   help='each dimension takes --steps values from -range to +range')
    c.add_argument('--steps', type=AT_LEAST_TWO, default=9, help='values per dimension')
    c.add_argument('--image', default=None,
                   help="the seed z is this image's encoding (mu) (default: z ~ N(0, I) by --seed)")
    temperature(c)
    c.add_argument('--seed', type=seed, default=0, help=seed_help)
    out(c)

    c = command('encode', 'mu and log sigma^2 of the encoder for each image')
    images(c)
    c.add_argument('--n', type=POSITIVE, default=None, help='at most this many images (default: all)')
    out(c, "FILE.npz: mu and log_var (N x Z, float32) and the images' names")

    c = command('fit_prior', 'fit the Gaussian mixture prior to the encoder means of the '
                             'training split (saved as <run>/prior_gmm.npz)')
    c.add_argument('--components', type=POSITIVE, default=settings.GMM_COMPONENTS,
                   help='mixture components (full covariances)')

    c = command('export', 'a TensorFlow SavedModel with the signatures decode, encode, sample')
    c.add_argument('--out', required=True, help='the SavedModel folder, e.g. output/sigma/saved_model')
    return parser


def parse_args(argv=None):
    """The flags, and what they name checked before TensorFlow is imported (one line, exit
    status 2): the run folder, the image files and folders to read, --out's kind and place."""
    args = make_parser().parse_args(argv)
    files.check_input(args.run, '--run', 'folder')
    run_folder.read_config(args.run)
    count = {'reconstruct': None, 'encode': None, 'interpolate': 2}
    if args.command in count:
        check_image_flags(args, count[args.command])
    for flag, kind in (('images', 'any'), ('a', 'file'), ('b', 'file'), ('image', 'file')):
        path = getattr(args, flag, None)
        if path is not None and not (flag == 'images' and path == 'test'):
            files.check_input(path, '--' + flag, kind)
    if args.command in OUTPUTS:
        args.kind = output_kind(args.out, OUTPUTS[args.command])
    return args


def check_image_flags(args, count=None):
    """UsageError, before the run is loaded, unless the images to read are given: --test_images
    (`count` of them, if given) or --images (--a and --b for interpolate)."""
    if args.test_images is not None:
        if count and len(args.test_images) != count:
            raise UsageError(f'--test_images must give {count} indices, got {len(args.test_images)}')
    elif count == 2 and (args.a is None or args.b is None):
        raise UsageError('give two images: --a FILE --b FILE, or --test_images I,J')
    elif count is None and args.images is None:
        raise UsageError('give --images (a folder, a file or test) or --test_images (indices)')


def output_kind(path, allowed):
    """'.png', '.npz' or 'folder' (no extension, or an existing folder) for --out, checked to
    be writable before anything is computed; UsageError otherwise."""
    ext = os.path.splitext(os.path.normpath(path))[1].lower()
    kind = 'folder' if os.path.isdir(path) or not ext else ext
    if kind not in allowed:
        names = {'.png': 'a .png file', '.npz': 'an .npz file', 'folder': 'a folder'}
        raise UsageError(f"--out must be {' or '.join(names[k] for k in allowed)}, got '{path}'")
    if kind != 'folder' and os.path.isdir(path):
        raise UsageError(f"--out '{path}' is a folder, not a {kind} file")
    if kind == 'folder' and os.path.isfile(os.path.join(path, run_folder.CONFIG_FILE)):
        raise UsageError(f"--out '{path}' is a run folder: its PNGs would lie among the run's "
                         f"files; give a folder of their own, e.g. {os.path.join(path, 'samples')}")
    files.check_output(path, '--out', 'folder' if kind == 'folder' else 'file')
    if kind == 'folder' and '.png' in allowed:  # a folder of images: the tool's own, refilled whole
        files.check_replaceable(path, '--out', files.is_png_output)
    return kind


def run(args):
    import generation  # the work: TensorFlow is imported by now (utils.run_command)
    getattr(generation, args.command)(args)


def main(argv=None):
    return utils.run_command('generate.py', parse_args, run, argv)


if __name__ == '__main__':
    sys.exit(main())

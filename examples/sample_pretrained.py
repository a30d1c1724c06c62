"""Samples from a shipped SavedModel (results/pretrained/) without training and without this
project's code: only TensorFlow, NumPy and Pillow.

python examples/sample_pretrained.py results/pretrained/optimal_fmnist --temperature 0.8

Writes a grid of --n samples (z ~ N(0, I) drawn from --seed, each latent group's scaled by
--temperature) to --out.
"""
import argparse
import math
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('model', help='a SavedModel folder written by generate.py export')
    p.add_argument('--n', type=int, default=64, help='samples (a square grid when it is one)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--temperature', type=float, default=1.0,
                   help='scale of the prior draw (below 1: sharper, less varied)')
    p.add_argument('--out', default='output/pretrained_samples.png')
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, 'saved_model.pb')):
        p.error(f"{args.model} is not a SavedModel folder (no saved_model.pb)")
    if not 1 <= args.n <= 10000 or not 0 < args.temperature < 100:
        p.error('--n must be 1 to 10000 and --temperature above 0')
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's start-up lines
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    model = tf.saved_model.load(args.model)
    groups = model.signatures['sample_at'].structured_input_signature[1]['temperature'].shape[0]
    images = model.sample_at(n=tf.constant(args.n), seed=tf.constant(args.seed, tf.int64),
                             temperature=tf.fill([groups], args.temperature))['images'].numpy()
    cols = math.ceil(math.sqrt(args.n))
    rows = math.ceil(args.n / cols)
    n, h, w, c = images.shape
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, image in enumerate(images):
        grid[i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = image
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(args.out)
    print(f'{args.out}: {n} samples of {args.model} at temperature {args.temperature}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""What generate.py does with a trained run: sample, reconstruct, interpolate, traverse, encode,
fit_prior and export, each a function of generate.py's parsed flags; images are computed in
batches from the run's newest checkpoint and written as --out FILE.png (a grid), FILE.npz
(uint8 arrays) or a folder (one PNG each).
"""
import os
import re

import keras
import numpy as np
import tensorflow as tf

import checkpoints
import data
import files
import image_folders
import models
import priors
import utils
from utils import UsageError

GRID_COLUMNS = 10  # images per row of a .png grid (5 input-reconstruction pairs)
MAX_RANGE = 1e6  # traverse --range: |z| of N(0, I) is a few units; far beyond, float32 overflows


# ---- where the images come from and where they go -------------------------------

def read_images(args, config, state, n=None):
    """uint8 (N, S, S, C) images at the run's size and channels, and their names: those of
    --test_images (indices of the run's test split), or of --images: the files of a folder (or
    one file), or the run's test split for 'test'; the first n."""
    if args.test_images is not None:
        return test_images(args.test_images, config, state)
    if args.images != 'test':
        images, names = image_folders.read_images(args.images, config.image_size, config.channels)
        return images[:n], names[:n]
    count = min(n, state.splits.num_test) if n else state.splits.num_test
    return test_images(range(count), config, state)


def test_images(indices, config, state):
    """The test split's images at these indices (uint8, through the run's resize) and their
    names test:<index>."""
    indices = list(indices)
    bad = [i for i in indices if not 0 <= i < state.splits.num_test]
    if bad:
        raise UsageError(f'--test_images must be between 0 and {state.splits.num_test - 1} (the '
                         f'test split has {state.splits.num_test} images), got {bad[0]}')
    images = data.as_uint8(state.splits.test, config.image_size, max(indices) + 1)
    return images[indices], [f'test:{i}' for i in indices]


def read_image(path, config, flag):
    """One image file -> uint8 (S, S, C) at the run's size and channels."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} must be an image file, '{path}' is a folder")
    return image_folders.read_images(path, config.image_size, config.channels)[0][0]


def write_output(path, kind, tiles, columns, **arrays):
    """tiles (N, h, w, C) uint8 as a grid of `columns` (.png) or one PNG each (folder);
    `arrays` as an .npz."""
    try:
        if kind == '.npz':
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            files.save_npz(path, **arrays)
        elif kind == '.png':
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            columns = min(columns, len(tiles))
            files.save_png(path, utils.image_grid(tiles, -(-len(tiles) // columns), columns))
        else:
            files.save_pngs(path, tiles, '--out')
    except OSError as e:
        raise UsageError(f"cannot write --out '{path}': {e.strerror}") from None
    print(f'wrote {path}')


def check_count(run, count, flag, config=None):
    """UsageError, before the run is loaded, if `count` images at the run's size (and their z)
    would take more than half of this machine's memory: they are held whole until written,
    and such a request would end in an out-of-memory traceback or kill after minutes."""
    config = config or checkpoints.read_run(run)
    size = config.image_size ** 2 * config.channels
    z_dim = sum(models.latent_groups(config))
    needed = count * (2 * size + 3 * 8 * z_dim)  # uint8 images and a grid; float64 z
    utils.check_memory(needed, flag, f'{count:,} images of {config.image_size}x'
                                     f'{config.image_size}x{config.channels}', share=0.5)


def _decode(vae, z, config):
    return models.decode_images(vae, z, config.data_range)


def _encode(vae, images, config):
    return models.encode_images(vae, images, len(images), config)


# ---- the sub-commands -----------------------------------------------------------

def sample(args):
    check_count(args.run, args.n, f'--n {args.n}')
    temperature = temperature_of(args, models.latent_groups(checkpoints.read_run(args.run)))
    config, vae, state = checkpoints.load_model(args.run)
    kind = args.kind
    gmm = (priors.load_prior(args.run, config, vae, state, args.components)
           if args.prior == 'gmm' else None)
    images = priors.prior_samples(vae, config, args.n, args.seed, gmm, temperature)
    write_output(args.out, kind, images, GRID_COLUMNS, images=images, prior=np.array(args.prior))


def temperature_of(args, groups):
    """--temperature as the latent groups' temperatures (priors.temperatures); UsageError for
    another number of them than groups."""
    try:
        return priors.temperatures(args.temperature, groups)
    except ValueError:
        raise UsageError(f'--temperature takes one number, or one per latent group '
                         f'({len(groups)}, top first), got {len(args.temperature)}') from None


def reconstruct(args):
    config, vae, state = checkpoints.load_model(args.run)
    inputs, names = read_images(args, config, state, args.n)
    kind = args.kind
    reconstructions = _decode(vae, _encode(vae, inputs, config)[0], config)
    if args.plain:
        tiles, columns = reconstructions, GRID_COLUMNS
    else:  # each input left of its own reconstruction
        tiles, columns = np.concatenate([inputs, reconstructions], axis=2), GRID_COLUMNS // 2
    write_output(args.out, kind, tiles, columns, inputs=inputs,
                 reconstructions=reconstructions, names=np.array(names))


def slerp(a, b, t):
    """Spherical interpolation (Shoemake 1985; White 2016 for latent codes) between vectors a
    and b at fractions t (K,) -> (K, Z); linear where a and b are (anti)parallel."""
    cos = np.dot(a, b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return (1 - t)[:, None] * a + t[:, None] * b
    return (np.sin((1 - t) * omega)[:, None] * a + np.sin(t * omega)[:, None] * b) / np.sin(omega)


def interpolate(args):
    check_count(args.run, 2 * (args.steps + 2), f'--steps {args.steps}')
    config, vae, state = checkpoints.load_model(args.run)
    if args.test_images is not None:
        images = test_images(args.test_images, config, state)[0]
    else:
        images = np.stack([read_image(args.a, config, '--a'), read_image(args.b, config, '--b')])
    kind = args.kind
    a, b = _encode(vae, images, config)[0].astype(np.float64)
    t = np.linspace(0.0, 1.0, args.steps)
    paths = {'linear': (1 - t)[:, None] * a + t[:, None] * b, 'spherical': slerp(a, b, t)}
    decoded = {k: _decode(vae, z, config) for k, z in paths.items()}
    # Each strip: image a, the K decoded steps from a's encoding to b's, image b.
    strips = [np.concatenate([images[:1], decoded[k], images[1:]]) for k in paths]
    write_output(args.out, kind, np.concatenate(strips), args.steps + 2, t=t, inputs=images,
                 **decoded, **{'z_' + k: z for k, z in paths.items()})


def traverse(args):
    config = checkpoints.read_run(args.run)
    groups = models.latent_groups(config)
    z_dim = sum(groups)
    dims = list(range(groups[0])) if args.dims is None else args.dims
    bad = [d for d in dims if not 0 <= d < z_dim]
    if bad:
        raise UsageError(f'--dims must be between 0 and {z_dim - 1} (z has {z_dim} numbers), '
                         f'got {bad[0]}')
    if args.range > MAX_RANGE:
        raise UsageError(f'--range must be at most {MAX_RANGE:g} (z of the prior lies within a '
                         f'few units of 0; far beyond, float32 overflows), got {args.range:g}')
    check_count(args.run, len(dims) * args.steps, f'--steps {args.steps}', config)
    scale = np.repeat(temperature_of(args, groups), groups)  # of the seed z ~ N(0, I)
    config, vae, _ = checkpoints.load_model(args.run)
    image = read_image(args.image, config, '--image') if args.image else None
    kind = args.kind
    if image is None:
        z0 = priors.prior_z(1, z_dim, args.seed)[0] * scale
    else:
        z0 = _encode(vae, image[None], config)[0][0]
    values = np.linspace(-args.range, args.range, args.steps)
    z = np.tile(z0, (len(dims), args.steps, 1))
    for row, d in enumerate(dims):
        z[row, :, d] = values
    images = _decode(vae, z.reshape(-1, z_dim), config)
    write_output(args.out, kind, images, args.steps, images=images.reshape(z.shape[:2] + images.shape[1:]),
                 dims=np.array(dims), values=values, z=z)


def encode(args):
    config, vae, state = checkpoints.load_model(args.run)
    images, names = read_images(args, config, state, args.n)
    mu, log_var = _encode(vae, images, config)
    write_output(args.out, '.npz', None, 0, mu=mu, log_var=log_var, names=np.array(names))


def fit_prior(args):
    config, vae, state = checkpoints.load_model(args.run)
    priors.fit_prior(args.run, config, vae, state, args.components)


def saved_model(vae, config):
    """A keras.export.ExportArchive of the VAE with three endpoints, each also a signature:
    decode(z float32 (B, Z)) -> images uint8; encode(images uint8 (B, S, S, C)) -> mu,
    log_var float32 (B, Z); sample(n int32, seed int64) -> images uint8 of n z ~ N(0, I),
    the z of generate.py sample --prior normal --seed seed (Z: every latent group's). z that
    are not finite and n < 0 are refused (InvalidArgumentError); B and n may be 0."""
    z_dim, data_range = vae.z_dim, config.data_range
    size, channels = config.image_size, config.channels
    archive = keras.export.ExportArchive()
    # Not archive.track(vae): the endpoints track the variables they use; tracking the Keras
    # variables too would save every weight twice (the Keras variable and its tf.Variable).

    def decode_z(z):
        # The decoder gives images for NaN and inf too (NaN's like 0's): silently wrong ones.
        z = tf.debugging.check_numerics(z, 'z must be finite')
        return {'images': data.to_uint8_tensor(vae.decode(z), data_range)}

    def encode_images(images):
        def encoder():
            _, mu, log_var = vae(data.to_range(images, data_range))
            return {'mu': mu, 'log_var': log_var}
        # TensorFlow's strided convolutions give an empty batch a wrong shape, and the encoder
        # then fails: it answers an empty batch without them (the decoder takes one as it is).
        empty = tf.zeros((0, z_dim))
        return tf.cond(tf.shape(images)[0] > 0, encoder, lambda: {'mu': empty, 'log_var': empty})

    def sample_prior(n, seed):
        # Checked before the draw, whose own error for n < 0 does not say that it is n.
        with tf.control_dependencies([tf.debugging.assert_non_negative(n, 'n must be >= 0')]):
            z = tf.random.stateless_normal(tf.stack([n, z_dim]), seed=tf.stack([seed, 2]))
        return decode_z(z)

    def sample_at(n, seed, temperature):
        # temperature (G,): each latent group's, top first, as generate.py sample --temperature.
        with tf.control_dependencies([
                tf.debugging.assert_non_negative(n, 'n must be >= 0'),
                tf.debugging.assert_positive(temperature, 'temperatures must be above 0')]):
            z = tf.random.stateless_normal(tf.stack([n, z_dim]), seed=tf.stack([seed, 2]))
        return decode_z(z * tf.repeat(temperature, vae.groups))

    # Traced for their signatures but saved without an input signature: the loaded Python
    # attributes (model.encode) then refuse an array of another dtype, where one with an input
    # signature casts it silently (float32 0.7 to uint8 0, int32 300 to uint8 44).
    for name, function, signature in [
            ('decode', decode_z, tf.TensorSpec((None, z_dim), tf.float32, name='z')),
            ('encode', encode_images,
             tf.TensorSpec((None, size, size, channels), tf.uint8, name='images'))]:
        endpoint = tf.function(function, autograph=False)
        endpoint.get_concrete_function(signature)
        archive.add_endpoint(name, endpoint)
    # sample keeps its input signature: without one, the loading process would trace it anew
    # for each new Python n or seed (40 ms and 1 MB each, kept). The price: a NumPy scalar of
    # another type is still cast (n = np.float64(2.7) to 2).
    archive.add_endpoint('sample', sample_prior, [tf.TensorSpec((), tf.int32, name='n'),
                                                  tf.TensorSpec((), tf.int64, name='seed')])
    archive.add_endpoint('sample_at', sample_at, [
        tf.TensorSpec((), tf.int32, name='n'), tf.TensorSpec((), tf.int64, name='seed'),
        tf.TensorSpec((len(vae.groups),), tf.float32, name='temperature')])
    return archive


# What a SavedModel export writes into its folder: an --out that holds only these is an earlier
# export, which a new one replaces whole.
SAVED_MODEL_FILES = ('saved_model.pb', 'saved_model.pbtxt', 'fingerprint.pb', 'keras_metadata.pb')
SAVED_MODEL_FOLDERS = {'variables': re.compile(r'variables\.(index|data-\d{5}-of-\d{5})'),
                       'assets': None}  # assets/: empty, this VAE has none


def exported(path):
    """Whether `path`, an entry of an --out folder, is what an export writes (an earlier export
    without the tool's marker is replaced; anything else in it is refused, not deleted)."""
    folder, name = os.path.split(path)
    if os.path.islink(path):
        return False
    if name in SAVED_MODEL_FOLDERS and os.path.isdir(path):
        pattern = SAVED_MODEL_FOLDERS[name]
        return all(pattern is not None and pattern.fullmatch(inner)
                   and os.path.isfile(os.path.join(path, inner))
                   and not os.path.islink(os.path.join(path, inner)) for inner in os.listdir(path))
    return name in SAVED_MODEL_FILES and os.path.isfile(path)


def export(args):
    out = os.path.normpath(args.out)
    files.check_replaceable(out, '--out', exported, legacy=True)  # an earlier version's export
    config, vae, _ = checkpoints.load_model(args.run)

    def write(tmp):
        saved_model(vae, config).write_out(tmp, verbose=False)
        files.give_umask_permissions(tmp)  # TensorFlow writes 755 folders whatever the umask

    try:  # written beside --out and renamed into place: a reader never sees half a SavedModel
        files.replace_folder(out, write, '--out', exported, legacy=True, what='a SavedModel')
    except (OSError, tf.errors.OpError) as e:
        reason = e.strerror if isinstance(e, OSError) else e.message
        raise UsageError(f"cannot write --out '{args.out}': {reason}") from None
    print(f'wrote {out} (signatures decode, encode, sample, sample_at)')



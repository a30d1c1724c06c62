"""Evaluates a trained run on its test split: python evaluate.py --run output/sigma

Reports the -ELBO, an importance-weighted estimate of -log p(x) with K samples,
bits/dim (of the density and of the 8-bit values), the test MSE, the active latent
units, the effective beta of the decoder, and the FID between N prior samples and N test images,
with features from a small classifier trained on the data set's own labels
(offline; trained once and cached) or Keras' InceptionV3, under two priors:
N(0, I) and the ex-post Gaussian mixture fitted to the encoder means of the
training split (prior_gmm.npz, fitted here when missing or stale; generate.py
samples it too). Writes <run>/evaluation.json and, with --export, the N samples
as samples.npz and PNGs.
"""
import utils  # first: from here on a Ctrl-C ends the command in one line
utils.start()  # TensorFlow, quietly

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import run_folder  # noqa: E402
from run_folder import PRIORS  # noqa: E402
from utils import UsageError  # noqa: E402

FEATURE_EXTRACTORS = ('domain', 'inception', 'none')
CLASSIFIER_EPOCHS = 3
INCEPTION_SIZE = 299
EVALUATED = 'evaluated_samples'  # images/<this><prior suffix>_<step>.png: a grid of each prior's samples


# ---- the Frechet distance ---------------------------------------------------

def feature_statistics(features):
    """(N, F) -> mean (F,) and covariance (F, F), in float64."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrt_psd(matrix):
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2):
    """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2).

    C1^1/2 C2 C1^1/2 is symmetric PSD and has the eigenvalues of C1 C2, so the trace of
    the square root comes from two symmetric eigendecompositions (no SciPy).
    """
    root1 = _sqrt_psd(cov1)
    middle = root1 @ cov2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


# ---- feature extractors: uint8 images (N, S, S, C) -> features (N, F) ---------

def _classifier(image_size, channels, num_classes):
    inputs = keras.Input((image_size, image_size, channels))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for filters in (32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding='same', activation='relu')(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation='relu', name='features')(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def _labelled_arrays(images, labels, image_size):
    pixels = data.make_pipeline(images, image_size, 1024, drop_remainder=False, data_range='0,1')
    x = np.concatenate([data.to_uint8(b, '0,1') for b in pixels])
    y = np.concatenate([b.numpy() for b in labels.batch(4096)])
    return x, y


def check_features(splits, features):
    """UsageError if the data cannot give these FID features (compare.py asks before training)."""
    if features == 'domain' and splits.train_labels is None:
        raise UsageError(f'{splits.source} has no class labels, which the domain features need '
                         f'(for an image folder: one subfolder per class); use --features '
                         f'inception or none')


def classifier_identity(splits, config):
    """What a cached domain classifier was trained on: the data set (an image folder by its
    real path and fingerprint, a tensorflow-datasets set by its name), the image size, the
    channels and classes, the epochs. Stored beside the classifier and checked on loading."""
    folder = os.sep in config.dataset or os.path.isdir(config.dataset)  # as data.load decides
    return {'dataset': os.path.realpath(config.dataset) if folder else config.dataset,
            'data_fingerprint': splits.fingerprint, 'image_size': config.image_size,
            'channels': splits.channels, 'num_classes': splits.num_classes,
            'epochs': CLASSIFIER_EPOCHS}


def classifier_path(identity, cache_dir):
    """The cached classifier's file: a readable name of the data set, and a hash of all of
    `identity`, so that two data sets never share one (the readable part alone would:
    /data/ds_a/b and /data/ds/a_b flatten alike)."""
    readable = ''.join(c if c.isalnum() else '_' for c in identity['dataset'].strip(os.sep))[-60:]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{readable}_{identity['image_size']}px_"
                                   f"{identity['channels']}c_{digest}.keras")


def _cached_classifier(path, identity):
    """The classifier cached at path if its JSON says it was trained on `identity`, else None
    (with the reason on one line when there is a file that does not serve)."""
    record = os.path.splitext(path)[0] + '.json'
    if not os.path.exists(path):
        return None
    try:
        with open(record, encoding='utf-8') as f:
            stored = json.load(f)
    except (OSError, ValueError):
        stored = None
    if stored != identity:
        print(f'{path} is not known to be a classifier of this data ({record} is missing or '
              f'names other data): training it again', file=sys.stderr)
        return None
    try:
        return keras.models.load_model(path)
    except Exception as e:  # a damaged file fails with one of many errors
        print(f'{path} cannot be loaded ({utils.error_reason(e)}): training it again',
              file=sys.stderr)
        return None


def chance_warning(accuracy, num_classes):
    """The warning for a classifier whose test accuracy is at chance (within half of it), or
    None: its features separate nothing, and an FID on them says little."""
    if accuracy > 1.5 / num_classes:
        return None
    return (f'warning: the domain feature classifier is right on {accuracy:.1%} of the test '
            f'split, near chance ({1 / num_classes:.1%} for {num_classes} classes): its FID '
            f'means little; use --features inception, or more labelled images')


def domain_features(splits, config, cache_dir):
    """A feature function from the penultimate layer of a classifier of the data set's labels.

    The classifier is trained once per data set (and image folder content), size and channel
    count and cached in cache_dir, with a JSON of what it was trained on beside it; returns
    (function, info dict with its test accuracy).
    """
    check_features(splits, 'domain')
    identity = classifier_identity(splits, config)
    path = classifier_path(identity, cache_dir)
    test_x, test_y = _labelled_arrays(splits.test, splits.test_labels, config.image_size)
    model = _cached_classifier(path, identity)
    if model is None:
        train_x, train_y = _labelled_arrays(splits.train, splits.train_labels, config.image_size)
        keras.utils.set_random_seed(0)
        model = _classifier(config.image_size, splits.channels, splits.num_classes)
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        print(f'training the domain feature classifier ({CLASSIFIER_EPOCHS} epochs), cached as {path}')
        epoch_line = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: print(
            f"classifier epoch {epoch + 1}/{CLASSIFIER_EPOCHS}: loss {logs['loss']:.4f}", flush=True))
        model.fit(train_x, train_y, batch_size=128, epochs=CLASSIFIER_EPOCHS, verbose=0,
                  callbacks=[epoch_line])
        os.makedirs(cache_dir, exist_ok=True)
        utils.atomic_write(path, model.save)
        # After the model: a JSON beside a model is the sign that the model is whole.
        utils.write_text(os.path.splitext(path)[0] + '.json', json.dumps(identity, indent=2) + '\n')
    accuracy = float(np.mean(np.argmax(model.predict(test_x, 1024, verbose=0), -1) == test_y))
    warning = chance_warning(accuracy, splits.num_classes)
    if warning:
        print(warning, file=sys.stderr)
    features = keras.Model(model.inputs, model.get_layer('features').output)
    return (lambda x: features.predict(x, batch_size=512, verbose=0)), {
        'classifier': path, 'classifier_test_accuracy': accuracy}


def inception_features(weights):
    """InceptionV3 pool features (ImageNet weights; not the pytorch-fid weights)."""
    try:
        model = keras.applications.InceptionV3(include_top=False, pooling='avg',
                                               weights=weights or 'imagenet')
    except Exception as e:  # an offline download fails with one of many errors
        raise UsageError('cannot load the InceptionV3 ImageNet weights '
                         f'({type(e).__name__}); offline, download '
                         'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 elsewhere '
                         'and pass it as --inception_weights') from None

    def extract(x):
        out = []
        for i in range(0, len(x), 64):
            batch = tf.cast(x[i:i + 64], tf.float32)
            if batch.shape[-1] == 1:
                batch = tf.image.grayscale_to_rgb(batch)
            batch = tf.image.resize(batch, (INCEPTION_SIZE, INCEPTION_SIZE))
            out.append(model(keras.applications.inception_v3.preprocess_input(batch)).numpy())
        return np.concatenate(out)

    return extract, {'inception_weights': weights or 'imagenet (Keras)'}


# ---- the model's numbers ------------------------------------------------------

def importance_weighted_nll(vae, test_ds, num_samples, max_images=None, seed=0):
    """-log p(x) and -log P(8-bit x) per image (nats), each estimated with num_samples
    importance samples of q(z|x) under the VAE's own likelihood; and the number of images."""
    @tf.function(reduce_retracing=True)
    def log_weights(x, seed):
        """(2, K, B) log w of a batch x (B, ...), K = num_samples: the density, the 8-bit values."""
        b = tf.shape(x)[0]
        eps = tf.random.stateless_normal((num_samples, b, vae.z_dim), seed=seed)
        params, mu, log_var = vae(x, eps)  # the K B pairs, sample k of image b at k B + b
        z = models.reparameterize(mu, log_var, tf.reshape(eps, (-1, vae.z_dim)))
        repeat = lambda t: tf.reshape(tf.tile(t[None], [num_samples] + [1] * len(t.shape)),
                                      (-1,) + tuple(t.shape[1:]))
        nll, discrete, _ = vae.likelihood.test_terms(repeat(x), params)
        return tf.reshape(tf.stack([losses.log_importance_weights(n, z, mu, log_var)
                                    for n in (nll, discrete)]), (2, num_samples, b))

    total, seen = np.zeros(2), 0
    # Batches small enough that K decoder passes per image fit in memory.
    per_batch = max(1, 4096 // num_samples)
    images = test_ds.unbatch()
    if max_images:
        images = images.take(max_images)
    for i, x in enumerate(utils.progress(images.batch(per_batch), desc=f'IW-NLL, K={num_samples}',
                                         unit='batch', leave=False)):
        log_w = log_weights(x, tf.constant([seed, i], tf.int64))
        nll = -(tf.reduce_logsumexp(log_w, axis=1) - math.log(num_samples))
        total += tf.reduce_sum(nll, axis=1).numpy()
        seen += int(x.shape[0])
    nll, discrete = total / seen
    return nll, discrete, seen


def active_units(means, threshold=0.01):
    """The number of active latent units (Burda et al. 2016): dimensions whose encoder mean
    varies across the images, Var_x(mu_d(x)) > threshold; means (N, Z). A collapsed posterior
    leaves its inactive dimensions at the prior whatever the image."""
    return int(np.sum(np.var(np.asarray(means, np.float64), axis=0) > threshold))


def export_samples(folder, samples, data_range, name='samples'):
    """<name>.npz (uint8 'images', with their range) and one PNG per sample in <name>_png/."""
    npz = os.path.join(folder, name + '.npz')
    utils.save_npz(npz, images=samples, pixel_range=np.array('uint8 0-255'),
                   model_data_range=np.array(data_range))
    png_dir = os.path.join(folder, name + '_png')
    utils.save_pngs(png_dir, samples)
    return npz, png_dir


def evaluate_run(run_dir, iw_samples=1000, iw_images=None, fid_samples=10000, features='domain',
                 inception_weights=None, export=False, feature_cache=None, priors=tuple(PRIORS),
                 components=None):
    """All the numbers of one run; also written to <run_dir>/evaluation.json.

    priors: those of PRIORS whose samples get an FID (and are exported); the mixture is the
    run's prior_gmm.npz, fitted first if it is missing, stale or has another number of
    components than `components` (see load_prior).
    """
    run_folder.read_config(run_dir)  # a run folder, before any other complaint
    run_folder.check_writable(run_dir, 'evaluate.py')
    with contextlib.ExitStack() as stack:
        stack.enter_context(utils.private_tempdir())
        if export and os.path.isdir(run_dir):  # it writes into the run folder: one writer
            stack.enter_context(run_folder.FolderLock(run_dir, 'evaluate.py --export'))
        return _evaluate_run(run_dir, iw_samples, iw_images, fid_samples, features,
                             inception_weights, export, feature_cache, priors, components)


def evaluation_settings(iw_samples, iw_images, fid_samples, features, priors, components):
    """What an evaluation was asked for, as recorded in evaluation.json (compare.py reuses an
    evaluation of the same step with the same settings)."""
    return {'iw_samples': iw_samples, 'iw_images': iw_images, 'fid_samples': fid_samples,
            'features': features, 'priors': sorted(priors), 'components': components}


def _evaluate_run(run_dir, iw_samples, iw_images, fid_samples, features, inception_weights,
                  export, feature_cache, priors, components):
    start = time.time()
    config, vae, state = run_folder.load_model(run_dir)
    splits = state.splits
    if 'gmm' in priors and components and components > splits.num_train:
        # Said before the first prior's samples and grid are written, not at the fit.
        raise UsageError(f'--components must be between 1 and the number of training images '
                         f'({splits.num_train}), got {components}')
    test_ds = data.make_pipeline(splits.test, config.image_size, config.batch_size,
                                 drop_remainder=False, data_range=config.data_range)
    result = {'run': run_dir, 'model': config.model, 'beta': config.beta,
              'data_range': config.data_range, 'step': int(state.step.numpy()),
              'train_seconds': round(float(state.train_seconds.numpy()), 1),
              'settings': evaluation_settings(iw_samples, iw_images, fid_samples, features,
                                              priors, components)}
    evaluator = models.Evaluator(vae, config.beta, config.seed)
    result.update(evaluator(test_ds))
    nll, discrete, seen = importance_weighted_nll(vae, test_ds, iw_samples, iw_images, config.seed)
    result.update({
        'iw_nll': nll, 'iw_bits_per_dim': losses.bits_per_dim(nll, evaluator.num_values,
                                                              evaluator.log_scale),
        'iw_nll_discrete': discrete,
        'iw_bits_per_dim_discrete': losses.bits_per_dim(discrete, evaluator.num_values, 0.0),
        'iw_samples': iw_samples, 'iw_images': seen})
    means, _ = run_folder.encode_images(vae, splits.test, splits.num_test, config)
    result['active_units'] = active_units(means)
    if len(vae.groups) > 1:  # and of each latent group, top first
        for l, group in enumerate(np.split(means, np.cumsum(vae.groups)[:-1], axis=1)):
            result[f'active_units_group{l}'] = active_units(group)
    result['effective_beta'] = vae.likelihood.effective_beta(
        config.beta, result['test_log_sigma'], evaluator.num_values, vae.z_dim)

    n = min(fid_samples, splits.num_test)
    if n < fid_samples:
        print(f'the test split has {splits.num_test} images: the FID uses {n} of each',
              file=sys.stderr)
    samples = {}
    for prior in priors:
        gmm = (run_folder.load_prior(run_dir, config, vae, state, components) if prior == 'gmm'
               else None)
        samples[prior] = run_folder.prior_samples(vae, config, n, gmm=gmm)
        if gmm is not None:
            result['gmm_components'] = int(gmm['components'])
        # A 10x10 grid of what the FID sees (the grids training writes use its moving batch norm
        # statistics); compare.py shows them.
        utils.save_png(os.path.join(run_dir, run_folder.IMAGES,
                                    f"{EVALUATED}{PRIORS[prior]}_{result['step']:08d}.png"),
                       utils.image_grid(samples[prior][:run_folder.NUM_SAMPLES], 10, 10))
        if export:
            result['export' + PRIORS[prior]] = export_samples(
                run_dir, samples[prior], config.data_range, 'samples' + PRIORS[prior])
    if features != 'none' and samples:
        result.update(fid(splits, config, samples, features, inception_weights,
                          feature_cache))
    result['eval_seconds'] = round(time.time() - start, 1)
    utils.write_text(os.path.join(run_dir, run_folder.EVALUATION_FILE), json.dumps(result, indent=2) + '\n')
    return result


def fid(splits, config, samples, features, inception_weights=None, feature_cache=None):
    """The FID between each prior's samples ({prior: uint8 (N, S, S, C)}) and N test images,
    as fid_<features> for N(0, I) and fid_<features>_gmm for the mixture; the FID of the first
    N training images, fid_<features>_train_images: what real images score, a reference for
    how close to 0 a model can be expected to come; and what the features were."""
    n = len(next(iter(samples.values())))
    if n < 2:
        raise UsageError('the FID needs at least 2 test images')
    if features == 'domain':
        extract, info = domain_features(
            splits, config, feature_cache or os.path.join(config.output_dir, 'feature_extractors'))
    else:
        extract, info = inception_features(inception_weights)

    def first(images):  # the first n of a split, as uint8
        return np.concatenate([data.to_uint8(b, config.data_range) for b in data.make_pipeline(
            images.take(n), config.image_size, 1000, drop_remainder=False,
            data_range=config.data_range)])

    real_statistics = feature_statistics(extract(first(splits.test)))
    if splits.num_train >= 2:
        samples = {**samples, 'train_images': first(splits.train)}
    return {**{f'fid_{features}{PRIORS.get(name, "_" + name)}': frechet_distance(
        *feature_statistics(extract(images)), *real_statistics) for name, images in samples.items()},
        'fid_samples': n, **info}


def add_evaluation_flags(p, components=None):
    """The flags of an evaluation (evaluate.py's, and compare.py's for each run)."""
    p.add_argument('--iw_samples', type=utils.positive(), default=1000,
                   help='K, importance samples per image')
    p.add_argument('--iw_images', type=utils.positive(), default=None,
                   help='test images for the IW estimate (None: the whole test split)')
    p.add_argument('--fid_samples', type=utils.positive(minimum=2), default=10000,
                   help='N, prior samples and test images for the FID (at least 2: a covariance '
                        'needs two samples)')
    p.add_argument('--features', choices=FEATURE_EXTRACTORS, default='domain',
                   help="FID features: a classifier of the data set's labels, or InceptionV3")
    p.add_argument('--components', type=utils.positive(), default=components,
                   help='components of the mixture prior; refit if the stored one has another '
                        f'number (None: the stored one, or {run_folder.GMM_COMPONENTS} for a new fit)')


def make_parser():
    p = utils.ArgumentParser(prog='evaluate.py', description=__doc__.splitlines()[0],
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--run', required=True, help='the run folder, e.g. output/sigma')
    add_evaluation_flags(p)
    p.add_argument('--inception_weights', default=None,
                   help='InceptionV3 no-top weights file (.h5); default: Keras downloads them')
    p.add_argument('--export', action='store_true',
                   help='write the N samples as samples.npz and samples_png/ in the run folder '
                        '(the mixture prior\'s as samples_gmm.npz and samples_gmm_png/)')
    p.add_argument('--prior', default=','.join(PRIORS),
                   help='comma-separated priors whose samples get an FID: normal (N(0, I)), gmm '
                        '(the Gaussian mixture of prior_gmm.npz, fitted first if missing or stale)')
    return p


def parse_args(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    args.prior = parse_priors(args.prior, parser)
    if not args.run.strip():
        parser.error('--run must name a run folder, got an empty string')
    return args


def parse_priors(text, parser):
    """'normal,gmm' -> ['normal', 'gmm'], or parser.error for a name not in PRIORS."""
    priors = [p for p in text.split(',') if p]
    if not priors or any(p not in PRIORS for p in priors):
        parser.error(f"--prior must list priors of {', '.join(PRIORS)}, got '{text}'")
    return list(dict.fromkeys(priors))


def print_table(result):
    for key, value in result.items():
        print(f'{key:28s} {value:.6g}' if isinstance(value, float) else f'{key:28s} {value}')


def evaluate_command(args):
    print_table(evaluate_run(args.run, args.iw_samples, args.iw_images, args.fid_samples,
                             args.features, args.inception_weights, args.export,
                             priors=args.prior, components=args.components))


def main(argv=None):
    return utils.run_command('evaluate.py', parse_args, evaluate_command, argv)


if __name__ == '__main__':
    sys.exit(main())

"""What an evaluation of a trained run measures (evaluate.py, compare.py): the test metrics,
the importance-weighted bound on -log p(x), the active units, the effective beta, and the
sample quality of each prior's samples in each feature space (features.py); written into
<run>/evaluation.json.
"""
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import tensorflow as tf

import checkpoints
import config as settings
import data
import features
import files
import losses
import models
import priors
import run_folder
import utils
from priors import PRIORS
from utils import UsageError




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
    files.save_npz(npz, images=samples, pixel_range=np.array('uint8 0-255'),
                   model_data_range=np.array(data_range))
    png_dir = os.path.join(folder, name + '_png')
    # The run's own folder: refilled whole (PNGs of an earlier version's export are replaced).
    files.save_pngs(png_dir, samples, '--export', legacy=True)
    return npz, png_dir


def evaluate_run(run_dir, evaluation=None, export=False, feature_cache=None,
                 prior_names=tuple(PRIORS)):
    """All the numbers of one run, measured as `evaluation` (a config.Evaluation) says; also
    written to <run_dir>/evaluation.json.

    prior_names: those of PRIORS whose samples get an FID (and are exported); the mixture is the
    run's prior_gmm.npz, fitted first if it is missing, stale or has another number of
    components than evaluation.components (see priors.load_prior).
    """
    evaluation = evaluation or settings.Evaluation()
    run_folder.read_config(run_dir)  # a run folder, before any other complaint
    run_folder.check_writable(run_dir, 'evaluate.py')
    if 'inception' in evaluation.features.split(','):  # before the long work: a download, a file
        features.check_inception_weights(evaluation.inception_weights)
    with contextlib.ExitStack() as stack:
        stack.enter_context(files.private_tempdir())
        if export and os.path.isdir(run_dir):  # it writes into the run folder: one writer
            stack.enter_context(run_folder.FolderLock(run_dir, 'evaluate.py --export'))
        return _evaluate_run(run_dir, evaluation, export, feature_cache, prior_names)


def settings_record(evaluation, priors):
    """What an evaluation was asked for, as evaluation.json records it (compare.py keeps an
    evaluation of the same checkpoint with the same settings)."""
    return {**settings.dataclasses.asdict(evaluation), 'priors': sorted(priors)}


def _evaluate_run(run_dir, evaluation, export, feature_cache, prior_names):
    start = time.time()
    config, vae, state = checkpoints.load_model(run_dir)
    splits = state.splits
    components = evaluation.components
    if 'gmm' in prior_names and components and components > splits.num_train:
        # Said before the first prior's samples and grid are written, not at the fit.
        raise UsageError(f'--components must be between 1 and the number of training images '
                         f'({splits.num_train}), got {components}')
    test_ds = data.make_pipeline(splits.test, config.image_size, config.batch_size,
                                 drop_remainder=False, data_range=config.data_range)
    result = {'run': run_dir, 'model': config.model, 'beta': config.beta,
              'data_range': config.data_range, 'step': int(state.step.numpy()),
              'train_seconds': round(float(state.train_seconds.numpy()), 1),
              'settings': settings_record(evaluation, prior_names)}
    result.update(vae.test_metrics(test_ds, config.seed))
    num_values = math.prod(vae.image_shape)
    nll, discrete, seen = importance_weighted_nll(vae, test_ds, evaluation.iw_samples,
                                                  evaluation.iw_images, config.seed)
    result.update({
        'iw_nll': nll,
        'iw_bits_per_dim': losses.bits_per_dim(nll, num_values, vae.likelihood.log_data_scale),
        'iw_nll_discrete': discrete,
        'iw_bits_per_dim_discrete': losses.bits_per_dim(discrete, num_values, 0.0),
        'iw_samples': evaluation.iw_samples, 'iw_images': seen})
    means, _ = models.encode_images(vae, splits.test, splits.num_test, config)
    result['active_units'] = active_units(means)
    if len(vae.groups) > 1:  # and of each latent group, top first
        for l, group in enumerate(np.split(means, np.cumsum(vae.groups)[:-1], axis=1)):
            result[f'active_units_group{l}'] = active_units(group)
    result['effective_beta'] = vae.likelihood.effective_beta(
        config.beta, result['test_log_sigma'], num_values, vae.z_dim)

    n = min(evaluation.fid_samples, splits.num_test)
    if n < evaluation.fid_samples:
        print(f'the test split has {splits.num_test} images: the FID uses {n} of each',
              file=sys.stderr)
    samples = {}  # {the suffix of their keys: uint8 images}
    for prior in prior_names:
        gmm = (priors.load_prior(run_dir, config, vae, state, components) if prior == 'gmm'
               else None)
        if gmm is not None:
            result['gmm_components'] = int(gmm['components'])
        for t in map(float, evaluation.temperatures.split(',')):
            suffix = PRIORS[prior] + ('' if t == 1 else f'_t{t:g}')
            samples[suffix] = priors.prior_samples(vae, config, n, gmm=gmm, temperature=t)
        # A 10x10 grid of what the sample quality sees at t = 1 (the grids training writes use
        # its moving batch norm statistics); compare.py shows them.
        if PRIORS[prior] in samples:
            files.save_png(os.path.join(
                run_dir, run_folder.IMAGES,
                f"{run_folder.EVALUATED}{PRIORS[prior]}_{result['step']:08d}.png"),
                utils.image_grid(samples[PRIORS[prior]][:run_folder.NUM_SAMPLES], 10, 10))
            if export:
                result['export' + PRIORS[prior]] = export_samples(
                    run_dir, samples[PRIORS[prior]], config.data_range, 'samples' + PRIORS[prior])
    networks = [] if evaluation.features == 'none' else evaluation.features.split(',')
    if networks and samples:
        result.update(sample_quality(splits, config, samples, networks,
                                     evaluation.inception_weights, feature_cache))
    result['eval_seconds'] = round(time.time() - start, 1)
    files.write_text(os.path.join(run_dir, run_folder.EVALUATION_FILE),
                     json.dumps(result, indent=2) + '\n')
    return result


def sample_quality(splits, config, samples, networks, inception_weights=None, feature_cache=None):
    """The distances of each set of samples ({suffix: uint8 (N, S, S, C)}: '' for N(0, I),
    '_gmm' for the mixture, '_t0.8' and so on at other temperatures) from N test images in the
    feature space of each network of `networks` (features.sample_quality: fid, kid, kid_std,
    precision, recall), as <distance>_<network><suffix> (fid_domain, fid_domain_gmm_t0.8, ...);
    the same for the first N training images (<distance>_<network>_train_images): what real
    images score, a reference for how close to 0 a model can be expected to come; and what
    the networks are."""
    n = len(next(iter(samples.values())))
    if n <= features.NEIGHBOURS:
        raise UsageError(f'the sample quality needs more than {features.NEIGHBOURS} test images')
    sets = dict(samples)
    if splits.num_train > features.NEIGHBOURS:
        sets['_train_images'] = data.as_uint8(splits.train, config.image_size, n)
    real = data.as_uint8(splits.test, config.image_size, n)
    result = {'fid_samples': n}
    for network in networks:
        extract, info = features.extractor(
            network, splits, config.dataset, config.image_size,
            feature_cache or os.path.join(config.output_dir, 'feature_extractors'),
            inception_weights)
        result.update(info)
        real_features = extract(real)
        for suffix, images in sets.items():
            distances = features.sample_quality(real_features, extract(images), seed=config.seed)
            result.update({f'{k}_{network}{suffix}': v for k, v in distances.items()})
    return result

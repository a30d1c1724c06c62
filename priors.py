"""The priors that samples are drawn from: N(0, I), through the run's fixed z, and the ex-post
Gaussian mixture (Ghosh et al. 2020) fitted to the encoder means of the training split and
stored as <run>/prior_gmm.npz: fit, check, read, sample.
"""
import os
import time
import warnings
import zipfile

import numpy as np
import tensorflow as tf

import config as settings
import files
import models
import run_folder
from utils import UsageError


def prior_z(n, z_dim, seed):
    """The fixed z ~ N(0, I) of a run, (n, z_dim) float32, drawn from (seed, 2): the same
    whatever n, in its first rows. With the run's seed, training's grids show its first
    NUM_SAMPLES, evaluate.py's FID samples its first N, generate.py sample --seed its first n."""
    return tf.random.stateless_normal((n, z_dim), seed=[seed, 2]).numpy()



# N(0, I), or the Gaussian mixture fitted to the encoder means (prior_gmm.npz), and the
# suffix of their FID keys and exported files.
PRIORS = {'normal': '', 'gmm': '_gmm'}


def temperatures(temperature, groups):
    """A sampling temperature (NVAE, VDVAE: the prior's standard deviation scaled by t): one
    number for every latent group, or one per group, top first -> (len(groups),) float64.
    ValueError for another number of them, or one not above 0."""
    t = np.atleast_1d(np.asarray(1.0 if temperature is None else temperature, np.float64))
    if len(t) == 1:
        t = np.repeat(t, len(groups))
    if len(t) != len(groups) or not np.all(np.isfinite(t)) or not np.all(t > 0):
        raise ValueError(f'a temperature is one positive number, or one per latent group '
                         f'({len(groups)}, top first), got {temperature!r}')
    return t


def prior_samples(vae, config, n, seed=None, gmm=None, temperature=None):
    """n decoded samples as uint8 of the prior: the run's fixed z (prior_z, from `seed`, the
    run's by default), or the mixture `gmm` (a dict of fit_gmm's arrays) for the top latent
    group, the others (networks.Hierarchical's) those of the fixed z; at a `temperature`
    (temperatures(): each group's draw around its mean scaled by its t)."""
    seed = config.seed if seed is None else seed
    scale = temperatures(temperature, vae.groups)
    if gmm is not None:
        with np.errstate(over='ignore', invalid='ignore'):
            top = sample_gmm(gmm, n, seed, scale[0]).astype(np.float32)
        if not np.all(np.isfinite(top)):  # a mixture read_prior passed, yet too wide for float32
            raise UsageError(f'the mixture prior of {config.run_dir} gives z that are not finite '
                             f'in float32: fit it again (generate.py fit_prior)')
    z = prior_z(n, vae.z_dim, seed) * np.repeat(scale, vae.groups).astype(np.float32)
    if gmm is not None:
        z[:, :top.shape[1]] = top
    return models.decode_images(vae, z, config.data_range,
                         'sampling the ' + ('mixture' if gmm is not None else 'normal') + ' prior')


def fit_prior(run_dir, config, vae, state, components=settings.GMM_COMPONENTS, why=None):
    """Fits the ex-post prior (Ghosh et al. 2020): a Gaussian mixture over the encoder means
    of the whole training split, of the top latent group (all of z but for models.Hierarchical,
    whose lower groups come from its conditional prior: prior_samples); saves it as <run_dir>/prior_gmm.npz (plain arrays, with
    the checkpoint step it belongs to), says so on one line (ending with `why`, if given)
    and returns it."""
    path = os.path.join(run_dir, run_folder.PRIOR_FILE)
    start = time.time()
    splits = state.splits
    means, _ = models.encode_images(vae, splits.train, splits.num_train, config, dims=vae.groups[0])
    encoded = time.time()
    try:
        gmm = fit_gmm(means, components, config.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    fitted = time.time()
    gmm.update(step=np.array(int(state.step.numpy())), components=np.array(components),
               seed=np.array(config.seed), num_means=np.array(len(means)),
               fit_seconds=np.array(fitted - encoded))
    try:
        files.save_npz(path, **gmm)
    except OSError as e:
        raise UsageError(f'cannot write {path}: {e.strerror}') from None
    print(f'fitted a {components}-component Gaussian mixture (full covariances) to the '
          f'{len(means)} encoder means of the training split in {fitted - encoded:.1f} s '
          f"({gmm['n_iter']} EM iterations{'' if gmm['converged'] else ', not converged'}; "
          f'encoding took {encoded - start:.1f} s): {path}' + (f', as {why}' if why else ''),
          flush=True)
    return gmm


def read_prior(path):
    """The arrays of a prior_gmm.npz; ValueError if they are not a mixture's that samples
    finite z: a file edited by hand or damaged on the disk (NaN, strings, a covariance that
    is not positive definite or overflows float32) would otherwise crash the sampler or
    decode garbage without a word; load_prior then fits it again, saying why."""
    with np.load(path, allow_pickle=False) as f:
        gmm = {k: f[k] for k in f.files}
    missing = {'weights', 'means', 'covariances', 'step', 'components'} - set(gmm)
    if missing:
        raise ValueError(f"no {', '.join(sorted(missing))}")
    for key in ('step', 'components'):
        if gmm[key].shape != () or gmm[key].dtype.kind not in 'iu':
            raise ValueError(f'{key} is not an integer')
    for key in ('weights', 'means', 'covariances'):
        if gmm[key].dtype.kind not in 'fiu':
            raise ValueError(f'{key} are not numbers')
        with np.errstate(over='ignore'):
            if not np.all(np.isfinite(gmm[key].astype(np.float32))):
                raise ValueError(f'{key} are not finite (in float32)')
    if gmm['means'].ndim != 2:
        raise ValueError('the arrays do not fit together')
    k, z_dim = gmm['means'].shape
    if gmm['weights'].shape != (k,) or gmm['covariances'].shape != (k, z_dim, z_dim) or k < 1:
        raise ValueError('the arrays do not fit together')
    if np.any(gmm['weights'] < 0) or not gmm['weights'].sum() > 0:
        raise ValueError('the weights are not a distribution (negative, or all zero)')
    try:
        np.linalg.cholesky(gmm['covariances'].astype(np.float64))
    except np.linalg.LinAlgError:
        raise ValueError('a covariance is not positive definite') from None
    return gmm


def load_prior(run_dir, config, vae, state, components=None):
    """The run's ex-post prior, fitted now (saying why on one line) if there is none, if it
    belongs to an older checkpoint than the run's newest, or if it has another number of
    components than `components` (None: any; settings.GMM_COMPONENTS when it is fitted now)."""
    try:
        gmm = read_prior(os.path.join(run_dir, run_folder.PRIOR_FILE))
        reason = _why_refit(gmm, int(state.step.numpy()), components, config.z_dim)
    except FileNotFoundError:
        gmm, reason = None, 'the run had none'
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        gmm, reason = None, f'the stored one cannot be read ({e})'
    if reason is None:
        return gmm
    return fit_prior(run_dir, config, vae, state, components or settings.GMM_COMPONENTS, reason)


def _why_refit(gmm, step, components, z_dim):
    """Why a stored mixture cannot serve the checkpoint of `step`, or None."""
    if int(gmm['step']) != step:
        return f"the stored one was fitted at step {int(gmm['step'])} and the checkpoint is at step {step}"
    if components and int(gmm['components']) != components:
        return f"the stored one has {int(gmm['components'])} components, not {components}"
    if gmm['means'].shape[1] != z_dim:
        return f"the stored one is not of this run's z_dim {z_dim}"
    return None


# ---- the mixture: plain arrays, fitted by scikit-learn, sampled with NumPy ---------------

def fit_gmm(means, components, seed=0):
    """A Gaussian mixture with full covariances fitted by EM (scikit-learn) to means (N, Z).

    Returns plain arrays: weights (K,), means (K, Z), covariances (K, Z, Z), and how the
    fit went (converged, n_iter).
    """
    from sklearn.mixture import GaussianMixture  # only the fit needs scikit-learn
    from threadpoolctl import threadpool_limits
    if not 1 <= components <= len(means):
        raise ValueError(f'--components must be between 1 and the number of means '
                         f'({len(means)}), got {components}')
    mixture = GaussianMixture(components, covariance_type='full', random_state=seed)
    # EM's products are (N, Z) x (Z, Z): too thin for BLAS threads, which made the fit of
    # 60,000 20-d means 3-4 times slower on 2 busy cores (16 s against 4 s on one thread).
    with warnings.catch_warnings(), threadpool_limits(1, user_api='blas'):
        warnings.simplefilter('ignore')  # non-convergence is reported in the result instead
        mixture.fit(np.asarray(means, np.float64))
    return {'weights': mixture.weights_, 'means': mixture.means_,
            'covariances': mixture.covariances_, 'converged': np.array(mixture.converged_),
            'n_iter': np.array(mixture.n_iter_)}


def sample_gmm(gmm, n, seed=0, temperature=1.0):
    """n draws (n, Z), float64, from a mixture of `fit_gmm`'s arrays, fixed by seed (NumPy):
    a component k by its weight, then means[k] + t L_k eps with L_k L_k^T = covariances[k]
    and t the temperature."""
    rng = np.random.default_rng(seed)
    weights = np.asarray(gmm['weights'], np.float64)
    k = rng.choice(len(weights), size=n, p=weights / weights.sum())
    eps = rng.standard_normal((n, gmm['means'].shape[1]))
    cholesky = np.linalg.cholesky(gmm['covariances'])
    return gmm['means'][k] + temperature * np.einsum('nij,nj->ni', cholesky[k], eps)

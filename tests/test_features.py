"""features.py: the distances against brute-force NumPy and cases with known answers; the
classifiers' cache identities; the check of InceptionV3 weights; one tiny classifier."""
import json
import os
import types

import h5py
import numpy as np
import pytest

import data
import features
from utils import UsageError

RNG = np.random.default_rng(0)


# ---- brute-force references ---------------------------------------------------

def brute_precision_recall(real, fake, k):
    """Kynkaanniemi et al.'s definition, one point at a time, distances as differences."""
    def distances(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def radii(points):  # the k-th nearest of the others
        d = distances(points, points)
        return np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(d)])

    real_radii, fake_radii = radii(real), radii(fake)
    cross = distances(fake, real)  # (M, N)
    precision = np.mean([any(cross[j, i] <= real_radii[i] for i in range(len(real)))
                         for j in range(len(fake))])
    recall = np.mean([any(cross[j, i] <= fake_radii[j] for j in range(len(fake)))
                      for i in range(len(real))])
    return precision, recall


def brute_mmd2(x, y):
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, pair by pair."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def mode(n, rng, side, dim=4):
    """n points of a unit Gaussian centred at side * 10 on the first axis (side -1 or 1)."""
    return rng.normal(size=(n, dim)) + side * 10.0 * np.eye(dim)[0]


# ---- precision and recall -------------------------------------------------------

@pytest.mark.parametrize('k', [1, 3, 5])
def test_precision_recall_equal_the_brute_force_definition(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(120, 6))
    fake = 1.3 * rng.normal(size=(90, 6)) + 0.4  # wider and shifted: neither 0 nor 1
    got = features.precision_recall(real, fake, k)
    want = brute_precision_recall(real, fake, k)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_precision_recall_in_blocks_equal_one_block():
    # Features as a ReLU layer gives them: positive, sharing a large offset.
    real = np.maximum(RNG.normal(size=(300, 16)), 0) + 5.0
    fake = np.maximum(RNG.normal(0.2, 1.1, size=(250, 16)), 0) + 5.0
    whole = features.precision_recall(real, fake, chunk_bytes=2**40)
    for chunk_bytes in (1, 8 * 300 * 7, 8 * 300 * 64):  # a row, 7 rows, 64 rows at a time
        assert features.precision_recall(real, fake, chunk_bytes=chunk_bytes) == whole
    np.testing.assert_allclose(whole, brute_precision_recall(real, fake, 3), atol=1e-6)


def test_neighbour_radii_in_blocks_equal_the_sorted_distances():
    points = RNG.normal(size=(50, 5))
    d2 = ((points[:, None] - points[None]) ** 2).sum(-1)
    want = np.sort(d2, axis=1)[:, 3]  # position 0 is the point itself
    for chunk_bytes in (1, 8 * 50 * 9, 2**30):
        np.testing.assert_allclose(features.neighbour_radii(points, 3, chunk_bytes), want,
                                   rtol=1e-9)


def test_a_set_against_itself_has_precision_and_recall_one():
    points = RNG.normal(size=(200, 8))
    assert features.precision_recall(points, points) == (1.0, 1.0)


def test_samples_of_one_of_two_modes_are_precise_and_recall_half():
    rng = np.random.default_rng(1)
    real = np.concatenate([mode(300, rng, -1), mode(300, rng, 1)])
    fake = mode(300, rng, -1)
    precision, recall = features.precision_recall(real, fake)
    # With k = 3 in 4-d a few samples in the tails fall outside every ball, as they would
    # for samples of the whole distribution; no real point of the second mode is covered.
    assert precision > 0.9 and precision == pytest.approx(
        features.precision_recall(real, np.concatenate([fake[:150], mode(150, rng, 1)]))[0],
        abs=0.05), precision
    assert 0.4 < recall <= 0.5, recall


def test_samples_far_from_the_data_have_precision_and_recall_zero():
    real = RNG.normal(size=(200, 8))
    fake = RNG.normal(size=(150, 8)) + 100.0
    assert features.precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_need_more_points_than_k():
    with pytest.raises(ValueError, match='more than k = 3'):
        features.precision_recall(RNG.normal(size=(3, 2)), RNG.normal(size=(10, 2)))
    with pytest.raises(ValueError, match=r'\(N, F\) and \(M, F\)'):
        features.precision_recall(RNG.normal(size=(10, 2)), RNG.normal(size=(10, 3)))


# ---- KID ---------------------------------------------------------------------------

def test_polynomial_mmd2_equals_the_pairwise_sum():
    x, y = RNG.normal(size=(17, 5)), RNG.normal(0.3, 1.2, size=(23, 5))
    assert features.polynomial_mmd2(x, y) == pytest.approx(brute_mmd2(x, y), rel=1e-10)


def test_kid_of_one_subset_of_everything_is_the_mmd2_of_the_sets():
    # A subset of all the points is a permutation of them, which the estimate does not see.
    x, y = RNG.normal(size=(30, 4)), RNG.normal(0.5, 1.0, size=(30, 4))
    kid, std = features.kernel_inception_distance(x, y, subsets=3, subset_size=1000)
    assert kid == pytest.approx(brute_mmd2(y, x), rel=1e-10) and std == pytest.approx(0, abs=1e-12)


def test_kid_averages_seeded_subsets():
    real, fake = RNG.normal(size=(60, 4)), RNG.normal(0.5, 1.0, size=(80, 4))
    rng = np.random.default_rng(7)
    each = [brute_mmd2(fake[rng.choice(80, 20, replace=False)],
                       real[rng.choice(60, 20, replace=False)]) for _ in range(4)]
    kid, std = features.kernel_inception_distance(real, fake, subsets=4, subset_size=20, seed=7)
    assert kid == pytest.approx(np.mean(each), rel=1e-10)
    assert std == pytest.approx(np.std(each), rel=1e-8)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(2)
    real, same = rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8))
    shifted = rng.normal(size=(1000, 8)) + 0.5
    kid_same, std_same = features.kernel_inception_distance(real, same, 20, 250)
    kid_shift, std_shift = features.kernel_inception_distance(real, shifted, 20, 250)
    assert abs(kid_same) < std_same and abs(kid_same) < 0.02 * kid_shift, (kid_same, kid_shift)
    assert kid_shift > 5 * std_shift


# ---- the Frechet distance (as tests/test_evaluate.py tests evaluate.py's) ------------

def random_cov(f, rng):
    a = rng.normal(size=(f, 2 * f))
    return a @ a.T / (2 * f)


def test_frechet_distance_of_identical_sets_is_zero():
    stats = features.feature_statistics(RNG.normal(size=(500, 8)))
    assert abs(features.frechet_distance(*stats, *stats)) < 1e-8


def test_frechet_distance_of_a_mean_shift_is_its_squared_norm():
    mu, cov, shift = RNG.normal(size=6), random_cov(6, RNG), RNG.normal(size=6)
    assert features.frechet_distance(mu, cov, mu + shift, cov) == pytest.approx(
        np.sum(shift ** 2), abs=1e-8)


def test_frechet_distance_closed_form_for_commuting_covariances():
    # C = Q diag(a) Q^T and Q diag(b) Q^T: the distance is |dmu|^2 + sum (sqrt a - sqrt b)^2.
    q, _ = np.linalg.qr(RNG.normal(size=(5, 5)))
    a, b = RNG.uniform(0.1, 3, 5), RNG.uniform(0.1, 3, 5)
    mu1, mu2 = RNG.normal(size=5), RNG.normal(size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = features.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_general_against_the_eigenvalues_of_the_product():
    c1, c2 = random_cov(7, RNG), random_cov(7, RNG)
    # tr sqrt(C1 C2) = sum of the square roots of the (real, non-negative) eigenvalues of C1 C2.
    trace_sqrt = np.sum(np.sqrt(np.abs(np.linalg.eigvals(c1 @ c2).real)))
    expected = np.trace(c1) + np.trace(c2) - 2 * trace_sqrt
    assert features.frechet_distance(np.zeros(7), c1, np.zeros(7), c2) == pytest.approx(
        expected, rel=1e-8)


# ---- all of them ----------------------------------------------------------------------

def test_sample_quality_gathers_every_distance():
    real, fake = RNG.normal(size=(150, 6)), RNG.normal(0.3, 1.0, size=(120, 6))
    got = features.sample_quality(real, fake, k=2, kid_subsets=5, kid_subset_size=50, seed=3)
    assert set(got) == {'fid', 'kid', 'kid_std', 'precision', 'recall'}
    assert got['fid'] == features.frechet_distance(*features.feature_statistics(fake),
                                                   *features.feature_statistics(real))
    assert (got['kid'], got['kid_std']) == features.kernel_inception_distance(real, fake, 5, 50, 3)
    assert (got['precision'], got['recall']) == features.precision_recall(real, fake, 2)
    assert all(isinstance(v, float) for v in got.values())


# ---- the classifiers' cache ---------------------------------------------------------------

def labelled_splits():
    return types.SimpleNamespace(fingerprint=None, channels=1, num_classes=10,
                                 train_labels=object(), source='fashion_mnist')


def test_the_domain_classifiers_identity_and_file_are_those_it_was_cached_under():
    # evaluate.py's files keep serving: the same keys, the same name, the same hash.
    identity = features.classifier_identity(labelled_splits(), 'fashion_mnist', 28, 'domain')
    assert identity == {'dataset': 'fashion_mnist', 'data_fingerprint': None, 'image_size': 28,
                        'channels': 1, 'num_classes': 10, 'epochs': 3}
    assert features.classifier_path(identity, 'cache') == os.path.join(
        'cache', 'fashion_mnist_28px_1c_c8dada8f929d.keras')


def test_every_classifier_has_its_own_file():
    paths = {name: features.classifier_path(features.classifier_identity(
        labelled_splits(), 'fashion_mnist', 28, name), 'cache') for name in features.CLASSIFIERS}
    assert len(set(paths.values())) == len(features.CLASSIFIERS)
    assert os.path.basename(paths['vgg']).startswith('fashion_mnist_28px_1c_vgg_')


def test_the_classifiers_refuse_data_without_labels():
    unlabelled = types.SimpleNamespace(train_labels=None, source='folder:/x')
    for name in features.CLASSIFIERS:
        with pytest.raises(UsageError, match=f'no class labels, which the {name} features need'):
            features.check_features(unlabelled, name)
    features.check_features(unlabelled, 'inception')


def test_an_unknown_network_is_refused():
    with pytest.raises(ValueError, match='one of domain, vgg, inception'):
        features.extractor('alexnet', None, 'fashion_mnist', 28, 'cache')


def test_a_tiny_vgg_classifier_is_trained_once_and_cached(image_folder, tmp_path, capsys):
    splits = data.load(image_folder, None, 28, 0)
    cache = str(tmp_path / 'cache')
    extract, info = features.extractor('vgg', splits, image_folder, 28, cache)
    out = capsys.readouterr().out
    assert 'training the vgg feature classifier (2 epochs)' in out
    assert out.count('classifier epoch') == 2 and 'the vgg feature classifier: trained in' in out
    assert set(info) == {'vgg_classifier', 'vgg_architecture', 'vgg_classifier_test_accuracy'}
    assert 0 <= info['vgg_classifier_test_accuracy'] <= 1
    with open(os.path.splitext(info['vgg_classifier'])[0] + '.json') as f:
        assert json.load(f) == features.classifier_identity(splits, image_folder, 28, 'vgg')
    images = np.stack([x.numpy() for x in splits.test])
    got = extract(images)
    assert got.shape == (len(images), 128) and np.isfinite(got).all()

    again, info_again = features.extractor('vgg', splits, image_folder, 28, cache)
    assert 'training' not in capsys.readouterr().out and info_again == info
    np.testing.assert_allclose(again(images), got, rtol=1e-5, atol=1e-6)


# ---- InceptionV3's weights, refused before any long work --------------------------------

def test_inception_weights_that_are_not_a_readable_hdf5_file_are_refused(tmp_path):
    text = tmp_path / 'weights.h5'
    text.write_text('not weights')
    other_name = tmp_path / 'weights.bin'
    with h5py.File(other_name, 'w') as f:
        f.create_dataset('x', data=np.zeros(3))
    for path, reason in ((tmp_path / 'missing.h5', 'no such file'), (tmp_path, 'not a file'),
                         (text, 'not an HDF5 file'), (other_name, 'ending in .h5 or .hdf5')):
        with pytest.raises(UsageError) as e:
            features.check_inception_weights(str(path))
        message = str(e.value)
        assert '\n' not in message and f'--inception_weights {path}' in message, message
        assert reason in message

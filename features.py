"""Feature networks, and the distances between a set of real and a set of generated features.

A sample-quality figure is a distance between two sets of features, real (N, F) and generated
(M, F), made by one network from uint8 images (N, S, S, C). The networks (`extractor(name, ...)`,
`--features NAME`):

    domain     the 128-unit penultimate layer of a small CNN (three strided 3x3 convolutions)
               trained on the data set's own labels, 3 epochs, seed 0 (evaluate.py's first)
    vgg        the 128-unit layer of a VGG-style CNN trained on the same labels independently:
               3x3 convolutions (one, then pairs) with batch norm, max pooling, global average
               pooling; 2 epochs, learning rate decayed to 0, seed 1
    inception  Keras' InceptionV3 pool features, ImageNet weights (not pytorch-fid's)

The two classifiers are trained once per data set, size and channel count, and cached (see
`classifier_features`). The distances (`sample_quality`):

    FID        ||mu_r - mu_g||^2 + tr(C_r) + tr(C_g) - 2 tr((C_r^1/2 C_g C_r^1/2)^1/2), the Frechet
               distance of Gaussians fitted to the two sets (Heusel et al. 2017)
    KID        the unbiased MMD^2 between the sets with the kernel k(x, y) = (x.y / F + 1)^3,
               averaged over random subsets (Binkowski et al. 2018, "Demystifying MMD GANs")
    precision  the share of generated points inside the k-NN ball of at least one real point
    recall     the share of real points inside the k-NN ball of at least one generated point
               (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
               Generative Models"): a ball's radius is the distance from its point to its k-th
               nearest neighbour within its own set, the point itself excluded.

FID and KID mix fidelity and coverage in one number; precision says how much of what the model
makes looks real, recall how much of the real data it makes.
"""
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Callable

import h5py  # a dependency of Keras
import keras
import numpy as np
import tensorflow as tf

import data
import files
import utils
from utils import UsageError

INCEPTION_SIZE = 299
CLASSIFIER_BATCH = 128
NEIGHBOURS = 3  # k of precision and recall, as Kynkaanniemi et al.
KID_SUBSETS = 100  # as torch-fidelity and clean-fid
KID_SUBSET_SIZE = 1000
# Distances are computed for blocks of rows of about this many bytes (float64), one block at a
# time: the extra memory of precision_recall is about this plus both sets in float64.
CHUNK_BYTES = 64 * 2**20


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


# ---- precision and recall -----------------------------------------------------

def _row_blocks(rows, cols, chunk_bytes):
    """Slices of range(rows) whose (block, cols) float64 matrix takes about chunk_bytes."""
    step = max(1, chunk_bytes // (8 * cols))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _squared_distances(a, b, b_squared):
    """||a_i - b_j||^2 as ||a_i||^2 + ||b_j||^2 - 2 a_i.b_j: a (n, F), b (m, F) float64,
    b_squared (m,) -> (n, m) float64, clipped at 0. In place on the product: one (n, m) array."""
    d2 = a @ b.T
    d2 *= -2
    d2 += np.einsum('ij,ij->i', a, a)[:, None]
    d2 += b_squared
    return np.maximum(d2, 0, out=d2)


def _centred(real, fake):
    """Both sets in float64, moved by the mean of the real one: distances do not change, and
    the expansion of _squared_distances loses less to cancellation with smaller norms (ReLU
    features share a large positive offset)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f'expected two sets (N, F) and (M, F), got {real.shape} and {fake.shape}')
    centre = real.mean(axis=0)
    return real - centre, fake - centre


def neighbour_radii(points, k=NEIGHBOURS, chunk_bytes=CHUNK_BYTES):
    """The squared distance of each point to its k-th nearest neighbour among the others:
    (N, F) float64 -> (N,). Needs N > k."""
    n = len(points)
    if n <= k:
        raise ValueError(f'the k-th nearest neighbour needs more than k = {k} points, got {n}')
    squared = np.einsum('ij,ij->i', points, points)
    radii = np.empty(n)
    for rows in utils.progress(_row_blocks(n, n, chunk_bytes), desc='k-NN radii', unit='block',
                               leave=False):
        d2 = _squared_distances(points[rows], points, squared)
        # A point's distance to itself is exactly 0, so sorted it comes first and position k
        # holds the k-th nearest of the others (a duplicate ties with it and counts as one).
        d2[np.arange(len(d2)), np.arange(rows.start, rows.stop)] = 0.0
        d2.partition(k, axis=1)
        radii[rows] = d2[:, k]
        del d2  # before the next block's is made: one block alive at a time
    return radii


def precision_recall(real, fake, k=NEIGHBOURS, chunk_bytes=CHUNK_BYTES):
    """Improved precision and recall (Kynkaanniemi et al. 2019) of fake (M, F) against real (N, F).

    With B(x, S) the ball around x whose radius is the distance from x to its k-th nearest
    neighbour in S \\ {x},

        precision = 1/M sum_j 1[fake_j in the union over i of B(real_i, real)]
        recall    = 1/N sum_i 1[real_i in the union over j of B(fake_j, fake)]

    a point on a ball's boundary being inside. Squared distances in float64, a block of rows
    of about chunk_bytes at a time: extra memory ~chunk_bytes (and the features in float64)
    whatever N and M.
    Returns (precision, recall) as floats.
    """
    real, fake = _centred(real, fake)
    real_radii = neighbour_radii(real, k, chunk_bytes)
    fake_radii = neighbour_radii(fake, k, chunk_bytes)
    real_squared = np.einsum('ij,ij->i', real, real)
    fake_inside = np.zeros(len(fake), bool)  # in some real ball
    real_covered = np.zeros(len(real), bool)  # in some fake ball
    for rows in utils.progress(_row_blocks(len(fake), len(real), chunk_bytes),
                               desc='precision, recall', unit='block', leave=False):
        d2 = _squared_distances(fake[rows], real, real_squared)  # (block of fakes, N)
        inside = d2 <= real_radii
        fake_inside[rows] = inside.any(axis=1)
        np.less_equal(d2, fake_radii[rows, None], out=inside)
        real_covered |= inside.any(axis=0)
        del d2, inside  # before the next block's are made
    return float(fake_inside.mean()), float(real_covered.mean())


# ---- the kernel inception distance ----------------------------------------------

def polynomial_mmd2(x, y):
    """The unbiased estimate of MMD^2 between x (m, F) and y (n, F) with the cubic kernel
    k(a, b) = (a.b / F + 1)^3 (Binkowski et al. 2018):

        1/(m(m-1)) sum_{i != i'} k(x_i, x_i') + 1/(n(n-1)) sum_{j != j'} k(y_j, y_j')
        - 2/(mn) sum_{i, j} k(x_i, y_j)

    in float64. Needs m, n >= 2.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n, f = len(x), len(y), x.shape[1]
    kernel = lambda a, b: (a @ b.T / f + 1) ** 3
    kxx, kyy = kernel(x, x), kernel(y, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
                 + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kernel(x, y).sum() / (m * n))


def kernel_inception_distance(real, fake, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE, seed=0):
    """KID: polynomial_mmd2 of `subsets` pairs of random subsets, each of min(subset_size, N, M)
    points of fake (M, F) and of real (N, F) drawn without replacement (NumPy's generator seeded
    with `seed`). Returns (mean, standard deviation over the subsets (ddof 0, as torch-fidelity)).
    """
    real, fake = np.asarray(real), np.asarray(fake)
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f'KID needs at least 2 points in each set, got {len(real)} and '
                         f'{len(fake)}')
    rng = np.random.default_rng(seed)
    mmd2 = np.array([polynomial_mmd2(fake[rng.choice(len(fake), size, replace=False)],
                                     real[rng.choice(len(real), size, replace=False)])
                     for _ in utils.progress(range(subsets), desc='KID', unit='subset',
                                             leave=False)])
    return float(mmd2.mean()), float(mmd2.std())


def sample_quality(real_features, fake_features, k=NEIGHBOURS, kid_subsets=KID_SUBSETS,
                   kid_subset_size=KID_SUBSET_SIZE, chunk_bytes=CHUNK_BYTES, seed=0):
    """Every distance of fake (M, F) from real (N, F) features:
    {'fid', 'kid', 'kid_std', 'precision', 'recall'} (floats; lower FID and KID, higher
    precision and recall are better). Needs M, N > k (and >= 2)."""
    real = np.asarray(real_features, np.float64)
    fake = np.asarray(fake_features, np.float64)
    kid, kid_std = kernel_inception_distance(real, fake, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real, fake, k, chunk_bytes)
    return {'fid': frechet_distance(*feature_statistics(fake), *feature_statistics(real)),
            'kid': kid, 'kid_std': kid_std, 'precision': precision, 'recall': recall}


# ---- feature networks: uint8 images (N, S, S, C) -> features (N, F) -------------

def _classifier(image_size, channels, num_classes):
    inputs = keras.Input((image_size, image_size, channels))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for filters in (32, 64, 128):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding='same', activation='relu')(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation='relu', name='features')(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


def _vgg(image_size, channels, num_classes):
    """VGG-style: 3x3 convolutions with batch norm, one of 16 filters at full size, then a pair
    of 32 and a pair of 64, max pooling before each pair; global average pooling, Dense(128)
    features. Nothing strided, nothing flattened: no layer in common with _classifier but the
    last. (A pair at full size too would make an epoch ~1.5 times as long: ~70 s on 2 cores.)"""
    inputs = keras.Input((image_size, image_size, channels))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    for block, (filters, convs) in enumerate(((16, 1), (32, 2), (64, 2))):
        if block:
            x = keras.layers.MaxPooling2D(padding='same')(x)
        for _ in range(convs):
            x = keras.layers.Conv2D(filters, 3, padding='same', use_bias=False)(x)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(128, activation='relu', name='features')(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A feature network trained on the data set's labels: `--features <its name>`."""
    build: Callable  # (image_size, channels, num_classes) -> keras.Model with a 'features' layer
    architecture: str  # what its features are, for the evaluation's record
    epochs: int
    seed: int
    learning_rate: Callable  # the number of training steps -> Adam's learning rate (or schedule)
    # Whether its cache identity and file name carry its name and seed. Not 'domain''s: its
    # files were cached before there was a second network, and keep serving.
    named_in_cache: bool = True


CLASSIFIERS = {
    'domain': Classifier(_classifier, 'Dense(128) after 3 strided 3x3 convs (32, 64, 128)',
                         epochs=3, seed=0, learning_rate=lambda steps: 1e-3,
                         named_in_cache=False),
    # Batch norm makes the last steps at a constant rate move the test accuracy by several
    # points from one epoch to the next (82% after two at 1e-3); decayed to 0 it ends at ~90%.
    'vgg': Classifier(
        _vgg, 'Dense(128) after global average pooling of 3x3 convs with batch norm '
              '(16, max pooling, 32, 32, max pooling, 64, 64)', epochs=2, seed=1,
        learning_rate=lambda steps: keras.optimizers.schedules.CosineDecay(2e-3, steps)),
}
NETWORKS = tuple(CLASSIFIERS) + ('inception',)  # the names extractor() takes


def _labelled_arrays(images, labels, image_size):
    x = data.as_uint8(images, image_size)
    y = np.concatenate([b.numpy() for b in labels.batch(4096)])
    return x, y


def check_features(splits, features):
    """UsageError if the data cannot give these features (compare.py asks before training)."""
    if features in CLASSIFIERS and splits.train_labels is None:
        raise UsageError(f'{splits.source} has no class labels, which the {features} features '
                         f'need (for an image folder: one subfolder per class); use --features '
                         f'inception or none')


def classifier_identity(splits, dataset, image_size, name='domain'):
    """What a cached classifier was trained on: the data set (`dataset` as --dataset gives it;
    an image folder by its real path and fingerprint, a tensorflow-datasets set by its name),
    the image size, the channels and classes, the epochs; and, but for 'domain', the network's
    name and seed. Stored beside the classifier and checked on loading."""
    folder = os.sep in dataset or os.path.isdir(dataset)  # as data.load decides
    classifier = CLASSIFIERS[name]
    identity = {'dataset': os.path.realpath(dataset) if folder else dataset,
                'data_fingerprint': splits.fingerprint, 'image_size': image_size,
                'channels': splits.channels, 'num_classes': splits.num_classes,
                'epochs': classifier.epochs}
    if classifier.named_in_cache:
        identity.update(network=name, seed=classifier.seed)
    return identity


def classifier_path(identity, cache_dir):
    """The cached classifier's file: a readable name of the data set (and of the network), and
    a hash of all of `identity`, so that two data sets never share one (the readable part alone
    would: /data/ds_a/b and /data/ds/a_b flatten alike)."""
    readable = ''.join(c if c.isalnum() else '_' for c in identity['dataset'].strip(os.sep))[-60:]
    network = f"{identity['network']}_" if 'network' in identity else ''
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{readable}_{identity['image_size']}px_"
                                   f"{identity['channels']}c_{network}{digest}.keras")


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


def chance_warning(accuracy, num_classes, name='domain'):
    """The warning for a classifier whose test accuracy is at chance (within half of it), or
    None: its features separate nothing, and distances on them say little."""
    if accuracy > 1.5 / num_classes:
        return None
    return (f'warning: the {name} feature classifier is right on {accuracy:.1%} of the test '
            f'split, near chance ({1 / num_classes:.1%} for {num_classes} classes): its FID '
            f'means little; use --features inception, or more labelled images')


def _train_classifier(name, splits, image_size, path):
    """Trains CLASSIFIERS[name] on the training split (one line per epoch) and returns it."""
    classifier = CLASSIFIERS[name]
    train_x, train_y = _labelled_arrays(splits.train, splits.train_labels, image_size)
    keras.utils.set_random_seed(classifier.seed)
    model = classifier.build(image_size, splits.channels, splits.num_classes)
    steps = classifier.epochs * -(-len(train_x) // CLASSIFIER_BATCH)
    model.compile(keras.optimizers.Adam(classifier.learning_rate(steps)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    print(f'training the {name} feature classifier ({classifier.epochs} epochs), cached as {path}')
    started = time.time()

    def epoch_line(epoch, logs):
        nonlocal started
        print(f"classifier epoch {epoch + 1}/{classifier.epochs}: loss {logs['loss']:.4f} "
              f"({time.time() - started:.0f} s)", flush=True)
        started = time.time()

    model.fit(train_x, train_y, batch_size=CLASSIFIER_BATCH, epochs=classifier.epochs, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=epoch_line)])
    return model


def classifier_features(name, splits, dataset, image_size, cache_dir):
    """A feature function from the 'features' layer of CLASSIFIERS[name], a classifier of the
    data set's labels.

    The classifier is trained once per data set (and image folder content), size and channel
    count and cached in cache_dir, with a JSON of what it was trained on beside it (written
    after the model: a JSON beside a model is the sign that the model is whole); returns
    (function uint8 (N, S, S, C) -> float32 (N, 128), info): info's keys are
    <name>_classifier (the file), <name>_architecture and <name>_classifier_test_accuracy.
    """
    check_features(splits, name)
    identity = classifier_identity(splits, dataset, image_size, name)
    path = classifier_path(identity, cache_dir)
    test_x, test_y = _labelled_arrays(splits.test, splits.test_labels, image_size)
    model = _cached_classifier(path, identity)
    trained = model is None
    if trained:
        started = time.time()
        model = _train_classifier(name, splits, image_size, path)
        seconds = time.time() - started
        os.makedirs(cache_dir, exist_ok=True)
        files.atomic_write(path, model.save)
        files.write_text(os.path.splitext(path)[0] + '.json', json.dumps(identity, indent=2) + '\n')
    accuracy = float(np.mean(np.argmax(model.predict(test_x, 1024, verbose=0), -1) == test_y))
    if trained:
        print(f'the {name} feature classifier: trained in {seconds:.0f} s, right on '
              f'{accuracy:.1%} of the test split')
    warning = chance_warning(accuracy, splits.num_classes, name)
    if warning:
        print(warning, file=sys.stderr)
    features = keras.Model(model.inputs, model.get_layer('features').output)
    return (lambda x: features.predict(x, batch_size=512, verbose=0)), {
        f'{name}_classifier': path, f'{name}_architecture': CLASSIFIERS[name].architecture,
        f'{name}_classifier_test_accuracy': accuracy}


def domain_features(splits, dataset, image_size, cache_dir):
    """classifier_features of the 'domain' network (evaluate.py's first features)."""
    return classifier_features('domain', splits, dataset, image_size, cache_dir)


def _weights_file_problem(path):
    """Why `path` cannot be InceptionV3 weights, found without reading them, or None."""
    if not os.path.exists(path):
        return 'no such file'
    if not os.path.isfile(path):
        return 'not a file'
    try:
        with open(path, 'rb') as f:
            f.read(8)
    except OSError as e:
        return f'cannot be read ({e.strerror or e})'
    if not h5py.is_hdf5(path):
        return 'not an HDF5 file'
    if not path.endswith(('.h5', '.hdf5')):
        return 'Keras reads legacy weights only from a name ending in .h5 or .hdf5'
    return None


def _inception(weights):
    """InceptionV3 without its top, average-pooled, with `weights` (a file, or None: Keras'
    download); UsageError naming --inception_weights when they cannot be had."""
    where = f'--inception_weights {weights}' if weights else 'Keras\' download'
    problem = _weights_file_problem(weights) if weights else None
    if problem is None:
        try:
            return keras.applications.InceptionV3(include_top=False, pooling='avg',
                                                  weights=weights or 'imagenet')
        except Exception as e:  # an offline download or a wrong file fail with one of many errors
            problem = utils.error_reason(e)
    advice = ('' if weights else '; offline, download inception_v3_weights_tf_dim_ordering_tf_'
                                 'kernels_notop.h5 elsewhere and pass it as --inception_weights')
    raise UsageError(f'cannot load the InceptionV3 no-top ImageNet weights from {where}: '
                     f'{problem}{advice}')


def check_inception_weights(path):
    """UsageError (one line naming --inception_weights and the path) unless `path` is a readable
    HDF5 file of InceptionV3 no-top weights: to be called before any long work. Builds
    InceptionV3 with them once (a few seconds), since only that proves they fit it."""
    _inception(path)


def inception_features(weights):
    """InceptionV3 pool features (ImageNet weights; not the pytorch-fid weights): weights a
    no-top .h5 file, or None for Keras' download. Returns (function uint8 (N, S, S, C) ->
    float32 (N, 2048), info)."""
    model = _inception(weights)

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


def extractor(name, splits, dataset, image_size, cache_dir, inception_weights=None):
    """The feature network `name` (one of NETWORKS): (extract, info), extract mapping uint8
    images (N, S, S, C) to float features (N, F), info what the network is (and a classifier's
    test accuracy), every key starting with `name`. splits, dataset, image_size and cache_dir
    serve the classifiers; inception_weights InceptionV3."""
    if name in CLASSIFIERS:
        return classifier_features(name, splits, dataset, image_size, cache_dir)
    if name == 'inception':
        return inception_features(inception_weights)
    raise ValueError(f'unknown feature network {name!r}; one of {", ".join(NETWORKS)}')

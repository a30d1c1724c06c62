"""The settings, each declared once: its default (the original code's), help, check, choices
and what a resume may do with it. train.py's flags, compare.py's and evaluate.py's, the checks
of config.json and the resume policy are all made from these declarations.

    Config       a training run's settings, written as <run>/config.json
    Evaluation   what an evaluation measures (evaluate.py, compare.py), recorded in evaluation.json

Imports no TensorFlow, so that --help and a bad flag answer at once: the choices that come from
the registries (losses.DECODERS, networks.NETWORKS, ...) are read from their modules' source
until those are imported (`registry`).
"""
import argparse
import ast
import dataclasses
import functools
import json
import os
import sys
import types
import typing
from typing import Optional

import files
import utils
from utils import UsageError

MAX_SEED = 2 ** 31 - 1
PRECISIONS = ('float16', 'bfloat16')
STRATEGIES = ('default', 'mirrored', 'multi_worker')

# What a resume may do with a setting of Config:
MODEL = 'model'  # refused: another model, other data, another test split or meaning of a step
OBJECTIVE = 'objective'  # taken from then on, and said (config.json records it)
FREE = 'free'  # anything: where to write, how long, how often, on which devices
DERIVED = 'derived'  # not a flag: train.py reads it off the data; checked on resume as MODEL


# ---- the registries, without importing them ------------------------------------------

def registry(module, name):
    """The registry `name` of `module` (e.g. 'networks', 'NETWORKS'): the module's own dict once it
    is imported (with what was registered at run time), else the dict as its source writes it,
    read without importing the module (and TensorFlow): literal values as they are, a class as
    a namespace of its literal class attributes (inherited ones included)."""
    if module in sys.modules:
        return getattr(sys.modules[module], name)
    return _source_registry(module, name)


@functools.cache
def _source_registry(module, name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), module + '.py')
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

    def attributes(class_name):
        node, found = classes.get(class_name), {}
        for base in node.bases if node else ():
            found.update(attributes(base.id) if isinstance(base, ast.Name) else {})
        for statement in node.body if node else ():
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
                target, value = statement.targets[0], statement.value
                pairs = (zip(target.elts, value.elts) if isinstance(target, ast.Tuple)
                         and isinstance(value, ast.Tuple) else [(target, value)])
                for t, v in pairs:
                    if isinstance(t, ast.Name):
                        try:
                            found[t.id] = ast.literal_eval(v)
                        except ValueError:  # not a literal
                            pass
        return found

    def value(node):  # a literal, a class's attributes, or an empty namespace
        if isinstance(node, ast.Name):
            return types.SimpleNamespace(**attributes(node.id))
        try:
            return ast.literal_eval(node)
        except ValueError:
            return types.SimpleNamespace()

    for statement in tree.body:
        if isinstance(statement, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in statement.targets):
            return {ast.literal_eval(k): value(v)
                    for k, v in zip(statement.value.keys, statement.value.values)}
    raise LookupError(f'{module}.py has no {name}')


def network_defaults():
    """'original (width 64), resnet (width 32, depth 2), ...': every network and its defaults."""
    return ', '.join(f'{name} (width {n.width}' + (f', depth {n.depth})' if n.depth else ')')
                     for name, n in registry('networks', 'NETWORKS').items())


# ---- the declaration of a setting ----------------------------------------------------

def setting(default, help, check=None, choices=None, resume=FREE, flags=None, required=False,
            group=None, **argparse_kwargs):
    """A field of a settings dataclass and its flag.

    check: text or value -> value, raising argparse.ArgumentTypeError (utils.number, ...): the
      flag's type, and the check of a value set in Python or read from config.json;
    choices: a function -> the allowed values (made at each call: a registry may grow);
    resume: MODEL, OBJECTIVE, FREE or DERIVED (Config only);
    flags: the option strings (default: --<name>); None-valued DERIVED fields have none;
    required: config.json files of every version hold it (a file without it is not one);
    group: a name for settings that go together (HEURISTICS: compare.py's --heuristics runs).
    """
    return dataclasses.field(default=default, metadata=dict(
        help=help, check=check, choices=choices, resume=resume, flags=flags, required=required,
        group=group, argparse=argparse_kwargs))


HEURISTICS = 'heuristics'  # the heuristics of deep VAEs, off by default


def names(cls, group):
    """The names of the fields of `cls` in `group`, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata['group'] == group)


POSITIVE, POSITIVE_FLOAT = utils.positive(int), utils.positive(float)


def _number_or_none(text):
    """--log_sigma_min's check: a finite number, or 'none' (None)."""
    if text is None or (isinstance(text, str) and text.lower() in ('none', 'off')):
        return None
    try:
        return utils.number(float)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a finite number or 'none', got '{text}'") from None


@dataclasses.dataclass
class Config:
    """Every setting of a training run; the defaults are the original code's."""
    model: str = setting(
        'sigma', 'the decoder likelihood, from losses.DECODERS (see losses.py)',
        choices=lambda: list(registry('losses', 'DECODERS')), resume=MODEL, required=True)
    experiment_name: Optional[str] = setting(
        None, 'name of the run folder under --output_dir (default: the model name)')
    output_dir: str = setting('output', 'folder that holds the run folders')
    epochs: int = setting(10, 'passes over the training split', POSITIVE,
                          flags=('--epochs', '--epoch'))
    batch_size: int = setting(64, 'images per training step', POSITIVE, resume=MODEL,
                              required=True)
    lr: float = setting(1e-3, 'Adam learning rate', POSITIVE_FLOAT, resume=OBJECTIVE)
    z_dim: int = setting(20, 'latent dimensions (the top group of --arch hierarchical)',
                         POSITIVE, resume=MODEL, required=True)
    arch: str = setting(
        'original', lambda: 'encoder and decoder, from networks.NETWORKS: ' + network_defaults(),
        choices=lambda: list(registry('networks', 'NETWORKS')), resume=MODEL)
    width: Optional[int] = setting(
        None, "the network's base channels (default: the network's, see --arch)", POSITIVE,
        resume=MODEL)
    depth: Optional[int] = setting(
        None, "residual blocks per level (default: the network's, see --arch; original has none)",
        POSITIVE, resume=MODEL)
    posterior: Optional[str] = setting(
        None, "hierarchical: the posterior of each lower group, 'z' (of z itself, VDVAE's; the "
        "default) or 'residual' (relative to the prior, NVAE's; runs before it existed: a group "
        "can close for free, docs/networks.md)", choices=lambda: ['z', 'residual'], resume=MODEL)
    dataset: str = setting(
        'svhn_cropped', 'tensorflow-datasets name (svhn_cropped, mnist, fashion_mnist, cifar10, '
        'celeb_a) or the path of a folder of PNG/JPEG images', resume=MODEL, required=True)
    data_dir: Optional[str] = setting(
        None, 'tensorflow-datasets data folder (or one holding the Fashion-MNIST IDX files)')
    image_size: int = setting(
        28, 'images are resized to this square size', int,
        choices=lambda: sorted(registry('networks', 'ARCHITECTURES')), resume=MODEL, required=True)
    data_range: str = setting(
        '-1,1', "pixel scale and decoder output: '-1,1' with tanh (the TF original) or '0,1' "
        "with sigmoid (the PyTorch sibling)", choices=lambda: list(registry('data', 'DATA_RANGES')),
        resume=MODEL, required=True, metavar='RANGE')
    seed: int = setting(
        0, "seed of weights, noise, shuffling, the fixed prior z and an image folder's test split",
        utils.number(int, 0, MAX_SEED), resume=MODEL, required=True)
    sample_every: int = setting(
        1000, 'steps between sample and reconstruction grids (also written each epoch)', POSITIVE)
    max_steps: Optional[int] = setting(
        None, 'stop after this many steps in all, even mid-epoch (demos, tests)', POSITIVE)
    checkpoint_every: Optional[int] = setting(
        None, "steps between checkpoints besides each epoch's end (at most this much work is "
        "lost to a kill)", POSITIVE)
    beta: float = setting(1.0, 'weight of the KL term (beta-VAE)', utils.number(float, 0.0),
                          resume=OBJECTIVE)
    kl_warmup: Optional[int] = setting(
        None, 'ramp the KL weight linearly from 0 to --beta over the first STEPS steps',
        POSITIVE, resume=OBJECTIVE, group=HEURISTICS, metavar='STEPS')
    free_bits: Optional[float] = setting(
        None, 'count the KL of each latent group as max(NATS, its batch mean): no gradient on a '
        'group below NATS', POSITIVE_FLOAT, resume=OBJECTIVE, group=HEURISTICS, metavar='NATS')
    skip_threshold: Optional[float] = setting(
        None, 'skip the update of a step whose global gradient norm is above NORM (counted as '
        'skipped_updates in the metrics rows; docs/networks.md gives typical norms)',
        POSITIVE_FLOAT, resume=OBJECTIVE, group=HEURISTICS, metavar='NORM')
    ema: Optional[float] = setting(
        None, 'keep an exponential moving average of the weights with this decay per step '
        '(e.g. 0.999; VDVAE: 0.9999); the test metrics, grids, evaluate.py, generate.py and the '
        'export use it. It warms up as TensorFlow\'s: the n-th step uses min(DECAY, '
        '(1 + n)/(10 + n))', utils.number(float, 0.0, 0.999999999), resume=MODEL,
        metavar='DECAY')
    log_sigma_min: Optional[float] = setting(
        -6.0, "soft lower bound of every learned or optimal log sigma (and the logistic's log "
        "scale); 'none' turns it off", _number_or_none, resume=OBJECTIVE)
    xla: bool = setting(False, 'compile the training step with XLA (jit_compile)',
                        action=argparse.BooleanOptionalAction)
    strategy: str = setting(
        'default', 'tf.distribute: one device, mirrored over local GPUs, or multi_worker '
        '(TF_CONFIG)', choices=lambda: list(STRATEGIES))
    mixed_precision: Optional[str] = setting(
        None, 'compute in float16 with loss scaling (GPUs; the bare flag) or bfloat16 (CPUs with '
        'AMX, TPUs); losses, log sigma and the encoder heads stay float32',
        choices=lambda: list(PRECISIONS), resume=MODEL, nargs='?', const='float16')
    restart: bool = setting(
        False, 'when no checkpoint of the run folder restores, start over from step 0 (the damaged '
        'checkpoints are kept in checkpoints/damaged/) instead of stopping', action='store_true')
    channels: Optional[int] = setting(None, "the data's, read off them", POSITIVE,
                                      resume=DERIVED)
    data_fingerprint: Optional[str] = setting(None, "an image folder's (data.Splits)",
                                              resume=DERIVED)

    @property
    def run_dir(self):
        return os.path.join(self.output_dir, self.experiment_name)

    def check(self):
        """Raises UsageError for a setting that cannot work; fills in experiment_name."""
        check_values(self)
        if not self.dataset.strip():
            raise UsageError('--dataset must name a data set or a folder, got an empty string')
        if not self.output_dir.strip():
            raise UsageError('--output_dir must name a folder, got an empty string')
        if self.experiment_name is None:
            self.experiment_name = self.model
        utils.check_name(self.experiment_name, '--experiment_name')
        self.check_paths()
        self.check_outside_data()

    def check_paths(self):
        """UsageError, naming the flag and the path, for a folder the run cannot read or write:
        an image folder (--dataset with a '/'), --data_dir, --output_dir."""
        if os.sep in self.dataset:  # a folder of images, as data.load decides
            files.check_input(self.dataset, '--dataset', 'folder')
        if self.data_dir is not None:
            if os.path.exists(self.data_dir):
                files.check_input(self.data_dir, '--data_dir', 'folder')
            else:  # tensorflow-datasets prepares data there
                files.check_output(self.data_dir, '--data_dir', 'folder')
        files.check_output(self.output_dir, '--output_dir', 'folder')

    def check_outside_data(self):
        """Raises UsageError if the run folder is inside the image folder of --dataset (real
        paths: a symbolic link is followed): the images and checkpoints it writes would change
        the data set, whose fingerprint then refuses every resume of the run."""
        if not os.path.isdir(self.dataset):  # a tfds name, or a folder data.load will not find
            return
        images, run = os.path.realpath(self.dataset), os.path.realpath(self.run_dir)
        if os.path.commonpath([images, run]) == images:
            raise UsageError(f'--output_dir {self.output_dir}: the run folder {run} would be inside '
                             f'the image folder of --dataset ({images}), and what the run writes '
                             f'would change its data; put the run folder elsewhere')

    def network(self):
        """{width, depth, posterior} of the run's network, None resolved to its defaults."""
        network = registry('networks', 'NETWORKS')[self.arch]
        return {k: getattr(network, k) if getattr(self, k) is None else getattr(self, k)
                for k in NETWORK_SETTINGS}


NETWORK_SETTINGS = ('width', 'depth', 'posterior')  # None: the network's own default


# ---- what an evaluation measures -----------------------------------------------------

def _number_list(text):
    """'1,0.8' -> '1,0.8': comma-separated positive numbers, each once, as their shortest text."""
    try:
        values = [utils.positive(float)(v) for v in str(text).split(',') if v.strip()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"must list positive numbers, got '{text}'")
    return ','.join(dict.fromkeys(f'{v:g}' for v in values))


def _feature_list(text):
    """--features: comma-separated feature networks (features.CLASSIFIERS, inception), or none."""
    names = [n for n in str(text).split(',') if n]
    known = [*registry('features', 'CLASSIFIERS'), 'inception']
    if names == ['none']:
        return 'none'
    if not names or any(n not in known for n in names):
        raise argparse.ArgumentTypeError(
            f"must list feature networks of {', '.join(known)} (or be none), got '{text}'")
    return ','.join(dict.fromkeys(names))


GMM_COMPONENTS = 10  # the mixture prior's components when nothing else is asked for


@dataclasses.dataclass
class Evaluation:
    """What evaluate.py (and compare.py, for each run) measures; evaluation.json records it, and
    compare.py keeps an evaluation of the same checkpoint with the same settings."""
    iw_samples: int = setting(1000, 'K, importance samples per image', POSITIVE)
    iw_images: Optional[int] = setting(
        None, 'test images for the IW estimate (default: the whole test split)', POSITIVE)
    fid_samples: int = setting(
        10000, 'N, prior samples and test images for the FID (at least 2: a covariance needs two)',
        utils.positive(int, 2))
    features: str = setting(
        'domain,vgg', "the feature spaces of the sample quality (FID, KID, precision, recall): "
        "classifiers of the data set's labels (domain, vgg: two networks trained independently), "
        "InceptionV3 (inception), or none", _feature_list)
    temperatures: str = setting(
        '1', "sampling temperatures, comma-separated: the sample quality of each under each "
        "prior (each group's draw around its mean scaled by t; keys end in _t<t> but for 1)",
        _number_list)
    inception_weights: Optional[str] = setting(
        None, "InceptionV3 no-top ImageNet weights (an .h5 file) for --features inception; "
        "default: Keras downloads them (which needs internet)")
    components: Optional[int] = setting(
        None, 'components of the mixture prior; refit if the stored one has another number '
        f'(default: the stored one, or {GMM_COMPONENTS} for a new fit)', POSITIVE)


# ---- flags, checks, config.json ------------------------------------------------------

def _fields(cls, names=None):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return [fields[n] for n in names] if names else [
        f for f in fields.values() if f.metadata['resume'] != DERIVED]


def add_flags(parser, cls, names=None, defaults=None):
    """Adds the flags of these fields of `cls` (None: all but the DERIVED) to a parser, with the
    declared defaults (or `defaults`, a dict, for some of them)."""
    for field in _fields(cls, names):
        m = field.metadata
        default = (defaults or {}).get(field.name, field.default)
        help = m['help']() if callable(m['help']) else m['help']
        kwargs = dict(m['argparse'])
        if m['check'] is not None:
            kwargs['type'] = m['check']
        if m['choices'] is not None:
            kwargs['choices'] = m['choices']()
        parser.add_argument(*(m['flags'] or ['--' + field.name]), dest=field.name,
                            default=default, help=help, **kwargs)


def from_flags(cls, args):
    """The `cls` settings among argparse's parsed `args`."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if hasattr(args, f.name)})


def check_values(settings, name=lambda key: f'--{key}'):
    """Raises UsageError for a value that is not of its setting's kind or not among its choices,
    named by name(key): the flag for a command, the key of config.json (a value edited there
    would otherwise end in a traceback deep in Keras, or in an out-of-memory kill)."""
    for field in dataclasses.fields(settings):
        value, m = getattr(settings, field.name), field.metadata
        if value is None:
            continue
        if m['choices'] is not None and value not in m['choices']():
            listed = ', '.join(['none'] * (field.default is None) + [str(c) for c in m['choices']()])
            raise UsageError(f'{name(field.name)} must be one of {listed}, got {value!r}')
        if m['check'] is not None and m['check'] is not int:
            try:
                m['check'](value)
            except argparse.ArgumentTypeError as e:
                raise UsageError(f'{name(field.name)} {e}') from None
    if isinstance(settings, Config):
        network = registry('networks', 'NETWORKS')[settings.arch]
        for key, why in (('depth', 'its levels are fixed'), ('posterior', 'one latent group')):
            if getattr(settings, key) is not None and getattr(network, key) is None:
                raise UsageError(f'--arch {settings.arch} has no {name(key)} ({why})')


def _has_type(value, annotation):
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    return isinstance(value, tuple(t for t in allowed if t is not type(None)))


def config_from_dict(saved, path):
    """A Config from config.json's object `saved`, checked: keys of Config, each of its field's
    type, the keys every version wrote, values its checks accept. UsageError naming the file
    (and the key) otherwise."""
    fix = 'repair it or delete the run folder'
    if not isinstance(saved, dict):
        raise UsageError(f'{path} does not hold a JSON object of settings: {fix}')
    required = [f.name for f in dataclasses.fields(Config) if f.metadata['required']]
    if 'channels' not in saved and all(k in saved for k in required):
        raise UsageError(f'{path} was written by a version of train.py before the decoder registry '
                         f'(commit b09f93c or older); this version does not read its runs: train it '
                         f'again in a new folder, or use that version')
    if 'posterior' not in saved and saved.get('arch') == 'hierarchical':
        saved = {**saved, 'posterior': 'residual'}  # the one design before --posterior existed
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    for key, value in saved.items():
        if key not in fields:
            raise UsageError(f'{path} holds an unknown key {key!r}: it was not written by this '
                             f'train.py; {fix}')
        if not _has_type(value, fields[key]):
            expected = ' or '.join(getattr(t, '__name__', str(t)).replace('NoneType', 'null')
                                   for t in typing.get_args(fields[key]) or (fields[key],))
            raise UsageError(f'{path}: key {key!r} holds {json.dumps(value)} ({type(value).__name__}), '
                             f'not a value of type {expected}; {fix}')
    missing = [k for k in required if k not in saved]
    if missing:
        raise UsageError(f'{path} was not written by train.py (it has no key {missing[0]!r}); '
                         f'{fix}')
    config = Config(**saved)
    try:
        check_values(config, lambda key: f'key {key!r}')
    except UsageError as e:
        raise UsageError(f'{path}: {e}; {fix}') from None
    return config


def resume_changes(saved, config):
    """The resume policy: UsageError if `config` differs from the run's `saved` Config in a MODEL
    or DERIVED setting (the network's settings compared as resolved: --width 64 resumes a run of
    --arch original without --width); else the OBJECTIVE changes, as '--beta 1.0 -> 0.5'."""
    for field in dataclasses.fields(Config):
        key = field.name
        if field.metadata['resume'] not in (MODEL, DERIVED):
            continue
        before, now = getattr(saved, key), getattr(config, key)
        if key in NETWORK_SETTINGS and saved.arch == config.arch:
            before, now = saved.network()[key], config.network()[key]
        if key == 'data_fingerprint' and before != now:
            raise UsageError(data_changed(config.run_dir, config.dataset, before, now))
        if before != now:
            raise UsageError(
                f"{config.run_dir} holds a run with --{key} {before}, not {now}: resume it with "
                f"the same value, or start fresh with another --experiment_name (or delete the "
                f"folder)")
    return [f'--{f.name} {getattr(saved, f.name)} -> {getattr(config, f.name)}'
            for f in dataclasses.fields(Config) if f.metadata['resume'] == OBJECTIVE
            and getattr(saved, f.name) != getattr(config, f.name)]


def data_changed(run_dir, dataset, before, now):
    """The error of an image folder that no longer holds the images a run started with."""
    return (f'{dataset} holds other images than when {run_dir} started (then: {before}; now: '
            f'{now}): its test split would change; use the folder as it was, or start a new run '
            f'(another --experiment_name)')

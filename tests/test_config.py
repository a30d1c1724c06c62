"""The settings declared once (config.py): flags, checks, the resume policy, and --help without
TensorFlow."""
import dataclasses
import os
import subprocess
import sys

import pytest

import config as settings
from utils import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ('train.py', 'evaluate.py', 'generate.py', 'compare.py')


def test_the_registries_read_from_source_are_the_imported_ones():
    # config.py reads them from the modules' source until those are imported (no TensorFlow);
    # run in a fresh process, so that nothing here has imported them yet.
    script = ('import sys; sys.path.insert(0, sys.argv[1]); import config as c\n'
              'read = {k: c.registry(*k.split(".")) for k in sys.argv[2:]}\n'
              'assert "tensorflow" not in sys.modules\n'
              'print(repr({k: {n: (v if isinstance(v, (tuple, str)) else (getattr(v, "width", None), '
              'getattr(v, "depth", None))) for n, v in r.items()} for k, r in read.items()}))')
    names = ['networks.NETWORKS', 'networks.ARCHITECTURES', 'losses.DECODERS', 'data.DATA_RANGES',
             'priors.PRIORS']
    out = subprocess.run([sys.executable, '-c', script, REPO, *names], capture_output=True,
                         text=True, check=True).stdout
    import data
    import losses
    import networks
    import priors
    live = {'networks.NETWORKS': {n: (v.width, v.depth) for n, v in networks.NETWORKS.items()},
            'networks.ARCHITECTURES': networks.ARCHITECTURES,
            'losses.DECODERS': {n: (None, None) for n in losses.DECODERS},
            'data.DATA_RANGES': data.DATA_RANGES, 'priors.PRIORS': priors.PRIORS}
    assert eval(out) == live


@pytest.mark.parametrize('command', COMMANDS)
def test_help_answers_without_tensorflow(command):
    script = ('import sys, runpy; sys.path.insert(0, sys.argv[1]); sys.argv = sys.argv[2:]\n'
              'try:\n    runpy.run_path(sys.argv[0], run_name="__main__")\n'
              'except SystemExit as e:\n    assert e.code == 0, e.code\n'
              'print("TENSORFLOW" if "tensorflow" in sys.modules else "WITHOUT")')
    argv = [os.path.join(REPO, command)] + (['sample'] if command == 'generate.py' else []) + ['--help']
    out = subprocess.run([sys.executable, '-c', script, REPO, *argv], capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines()[-1] == 'WITHOUT'
    assert '(default: None)' not in out
    if command == 'train.py':  # every network and its defaults, from the registry
        flat = ' '.join(out.split())
        assert 'original (width 64), resnet (width 32, depth 2), hierarchical (width 32, depth 1)' in flat


def test_every_setting_is_a_flag_once_and_the_resume_policy_is_declared():
    import train
    parser = train.make_parser()
    flags = {a.dest for a in parser._actions if a.dest != 'help'}
    fields = {f.name: f.metadata for f in dataclasses.fields(settings.Config)}
    assert flags == {n for n, m in fields.items() if m['resume'] != settings.DERIVED}
    assert all(m['resume'] in (settings.MODEL, settings.OBJECTIVE, settings.FREE, settings.DERIVED)
               for m in fields.values())
    import compare
    assert set(compare.SHARED_FLAGS) | set(compare.HEURISTIC_FLAGS) <= flags


@pytest.mark.parametrize('key, value, words', [
    ('z_dim', 0, "key 'z_dim' must be a positive integer"),
    ('seed', -1, "key 'seed' must be an integer from 0 to 2147483647"),
    ('beta', -0.5, "key 'beta' must be a number of at least 0.0"),
    ('kl_warmup', 2 ** 70, "key 'kl_warmup' must be a positive integer of at most 9223372036854775807"),
    ('model', 'vq', "key 'model' must be one of mse, gaussian"),
    ('log_sigma_min', float('nan'), "key 'log_sigma_min' must be a finite number or 'none'"),
])
def test_config_json_values_are_checked_by_the_declared_checks(key, value, words):
    saved = {**dataclasses.asdict(settings.Config(channels=1)), key: value}
    with pytest.raises(UsageError, match=words.replace('(', r'\(')):
        settings.config_from_dict(saved, 'config.json')


def test_resume_refuses_model_settings_and_says_objective_ones():
    saved = settings.Config(channels=1, experiment_name='r')
    assert settings.resume_changes(saved, dataclasses.replace(saved, epochs=99)) == []
    assert settings.resume_changes(saved, dataclasses.replace(saved, beta=0.5)) == [
        '--beta 1.0 -> 0.5']
    for key, value in (('z_dim', 8), ('arch', 'resnet'), ('seed', 3), ('channels', 3)):
        with pytest.raises(UsageError, match=f'--{key}'):
            settings.resume_changes(saved, dataclasses.replace(saved, **{key: value}))


def test_readme_layout_names_every_module():
    readme = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
    table = readme[readme.index('## Layout'):readme.index('## More')]
    modules = sorted(f for f in os.listdir(REPO) if f.endswith('.py'))
    assert [m for m in modules if f'| `{m}` |' not in table] == []

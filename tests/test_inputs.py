"""Every input checked before the work starts: each command's path-like flags, given a missing,
an unreadable and a wrong-kind path, are refused in one line naming the flag and the path, with
exit status 2, before TensorFlow is imported (so before any model, data or batch): a fresh
process runs every case of a command and says whether TensorFlow was ever imported."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, trained_run

# Each case: argv, the flag the refusal names, the path it names. {run}: a trained run folder,
# {file}: a regular file, {dir}: a folder, {locked}: a file nobody may read, {missing}: nothing.
CASES = {
    'train.py': [
        (['--dataset', '{missing}'], '--dataset'),
        (['--dataset', '{file}'], '--dataset'),
        (['--dataset', '{locked_dir}'], '--dataset'),
        (['--data_dir', '{file}'], '--data_dir'),
        (['--output_dir', '{file}'], '--output_dir'),
        (['--output_dir', '{file}/below'], '--output_dir'),
    ],
    'evaluate.py': [
        (['--run', '{missing}'], '--run'),
        (['--run', '{file}'], '--run'),
        (['--run', '{locked_dir}'], '--run'),
        (['--run', '{run}', '--inception_weights', '{missing}'], '--inception_weights'),
        (['--run', '{run}', '--inception_weights', '{dir}'], '--inception_weights'),
        (['--run', '{run}', '--inception_weights', '{locked}'], '--inception_weights'),
        (['--run', '{run}', '--inception_weights', '{file}'], '--inception_weights'),
    ],
    'generate.py': [
        (['sample', '--run', '{missing}', '--out', '{dir}/x.png'], '--run'),
        (['sample', '--run', '{file}', '--out', '{dir}/x.png'], '--run'),
        (['sample', '--run', '{run}', '--out', '{file}/x.png'], '--out'),
        (['sample', '--run', '{run}', '--out', '{locked_dir}/x.png'], '--out'),
        (['encode', '--run', '{run}', '--images', '{missing}', '--out', '{dir}/x.npz'], '--images'),
        (['encode', '--run', '{run}', '--images', '{locked}', '--out', '{dir}/x.npz'], '--images'),
        (['interpolate', '--run', '{run}', '--a', '{missing}', '--b', '{file}', '--out',
          '{dir}/x.png'], '--a'),
        (['interpolate', '--run', '{run}', '--a', '{file}', '--b', '{dir}', '--out',
          '{dir}/x.png'], '--b'),
        (['traverse', '--run', '{run}', '--image', '{locked}', '--out', '{dir}/x.png'], '--image'),
        (['export', '--run', '{run}', '--out', '{file}'], '--out'),
    ],
    'compare.py': [
        (['--dataset', '{missing}'], '--dataset'),
        (['--dataset', '{file}'], '--dataset'),
        (['--output_dir', '{file}'], '--output_dir'),
        (['--inception_weights', '{missing}', '--features', 'inception'], '--inception_weights'),
        (['--inception_weights', '{file}', '--features', 'inception'], '--inception_weights'),
    ],
}

SCRIPT = r'''
import contextlib, io, json, os, runpy, sys
sys.path.insert(0, sys.argv[1])
# What a file or folder without rights answers (chmod does not stop root, who may run the tests).
access = os.access
os.access = lambda path, mode, **kw: False if 'locked' in os.fspath(path) and mode & (
    os.R_OK | os.W_OK) else access(path, mode, **kw)
command = sys.argv[2]
module = runpy.run_path(f'{sys.argv[1]}/{command}', run_name='not_main')
out = []
for argv in json.loads(sys.argv[3]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = module['main'](argv)
        except SystemExit as e:
            status = e.code
    out.append([status, err.getvalue()])
print(json.dumps({'cases': out, 'tensorflow': 'tensorflow' in sys.modules}))
'''


@pytest.fixture(scope='module')
def places(image_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp('inputs')
    run_dir = trained_run(root, image_folder, 'r', '--max_steps', '1')
    (root / 'a_file.h5').write_text('not HDF5, not an image, not a folder')
    (root / 'a_dir').mkdir()
    (root / 'locked.png').write_text('x')  # its name makes it unreadable in SCRIPT
    (root / 'locked_dir').mkdir()
    return {'run': str(run_dir), 'file': str(root / 'a_file.h5'), 'dir': str(root / 'a_dir'),
            'locked': str(root / 'locked.png'), 'locked_dir': str(root / 'locked_dir'),
            'missing': str(root / 'nothing')}


@pytest.mark.parametrize('command', list(CASES))
def test_paths_are_refused_in_one_line_before_tensorflow(command, places):
    cases = CASES[command]
    argvs = [[a.format(**places) for a in argv] for argv, _ in cases]
    proc = subprocess.run([sys.executable, '-c', SCRIPT, REPO, command, json.dumps(argvs)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    for (argv, flag), (status, err) in zip(cases, result['cases']):
        lines = err.strip().splitlines()
        path = argv[argv.index(flag) + 1].format(**places)
        assert status == 2 and len(lines) == 1, (argv, status, err)
        assert lines[0].startswith(f'{command}: error: ') and flag in lines[0], (argv, lines)
        assert path in lines[0] or os.path.dirname(path) in lines[0], (argv, lines)
    assert not result['tensorflow']  # refused before TensorFlow, the model or the data

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402



def pytest_configure(config):
    # Keras' own saving code converts tensors with np.array(x, copy=False), which NumPy 2
    # deprecates; not ours to fix.
    config.addinivalue_line(
        'filterwarnings', 'ignore:__array__ implementation:DeprecationWarning:keras.src.backend.tensorflow.core')


TINY = ['--batch_size', '8', '--z_dim', '4', '--sample_every', '2', '--seed', '1']
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained_run(out, image_folder, name, *argv):
    """out/name: a run of train.py on the shared image folder with the TINY settings and argv."""
    assert run(['--dataset', image_folder, '--output_dir', str(out), '--experiment_name', name,
                *argv] + TINY) == 0
    return out / name


# The start of a script that sees two logical CPUs: they must be set before TensorFlow starts,
# so such a script runs in a fresh process (on_two_cpus). ONE is the default strategy, MIRRORED
# one over both CPUs (one for all: collectives of several MirroredStrategy objects collide).
TWO_CPUS = r'''
import json, os, sys
sys.path.insert(0, sys.argv[1])
import tensorflow as tf
cpu = tf.config.list_physical_devices('CPU')[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
ONE, MIRRORED = tf.distribute.get_strategy(), tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
'''


def on_two_cpus(script, out, *argv):
    """Runs TWO_CPUS + script in a fresh Python with sys.argv[1:] = [the project, out, *argv];
    returns the JSON the script writes to out/result.json."""
    proc = subprocess.run([sys.executable, '-c', TWO_CPUS + script, REPO, str(out), *argv],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, 'result.json')) as f:
        return json.load(f)


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    """44 grayscale 28x28 PNGs: bright rectangles on black, in nested folders."""
    folder = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    for i in range(44):
        image = np.zeros((28, 28), np.uint8)
        r, c = rng.integers(0, 14, 2)
        image[r:r + 14, c:c + 10] = rng.integers(100, 256)
        sub = folder / f'class{i % 2}'
        sub.mkdir(exist_ok=True)
        Image.fromarray(image).save(sub / f'{i:03d}.png')
    return str(folder)


def run(argv):
    """train.main in-process; returns its exit status. The signal handlers are restored
    (an interrupted main ignores SIGINT and SIGTERM on its way out)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train.main(argv)
    except SystemExit as e:
        return e.code
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def tiny_trainer(tmp_path, name, **kwargs):
    """A Trainer of a small optimal run (batch 8, z_dim 4) in tmp_path/name, without data."""
    import config as settings
    import trainer
    config = settings.Config(model='optimal', batch_size=8, z_dim=4, seed=3, channels=1,
                             output_dir=str(tmp_path), experiment_name=name, **kwargs)
    config.check()
    return trainer.Trainer(config)


def random_batch(seed, n=8, size=28, channels=1):
    """n images of uniform noise in [-1, 1], as a float32 tensor."""
    import tensorflow as tf
    return tf.constant(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, channels)),
                       tf.float32)

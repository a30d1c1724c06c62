import os
import signal
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

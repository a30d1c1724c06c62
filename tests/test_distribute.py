"""tf.distribute and mixed precision on CPU: the same model on one device and on several."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import losses
from conftest import TINY, on_two_cpus, run
import config as settings
import trainer as training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs on two logical CPUs (conftest.on_two_cpus).
MIRRORED_CHECK = r'''
import config as settings
import trainer as training

x = np.random.default_rng(0).uniform(-1, 1, (8, 28, 28, 1)).astype('float32')
result = {}
mirrored = MIRRORED
for model in sys.argv[3].split(','):
    runs = []
    for strategy in (tf.distribute.get_strategy(), mirrored):
        config = settings.Config(model=model, batch_size=8, z_dim=4, output_dir=sys.argv[2],
                              experiment_name=model, channels=1)
        trainer = training.Trainer(config, strategy)
        # Plain SGD: the update is the summed gradient itself (Adam's g / rms(g) would turn
        # the rounding of near-zero gradients into whole steps of lr).
        with strategy.scope():
            trainer.optimizer = keras.optimizers.SGD(1e-5)
            trainer.optimizer.build(trainer.vae.trainable_variables)
        before = [np.asarray(v) for v in trainer.vae.weights]
        batches = strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices(x).batch(8))
        for _ in range(2):  # two steps: the second one starts from updated weights
            for batch in batches:
                stats = trainer.train_step(batch)
        runs.append({'replicas': strategy.num_replicas_in_sync,
                     'stats': {k: float(v) for k, v in stats.items()},
                     'before': [w.tolist() for w in before],
                     'change': [(np.asarray(v) - w).tolist()
                                for v, w in zip(trainer.vae.weights, before)]})
    result[model] = runs
json.dump(result, open(os.path.join(sys.argv[2], 'result.json'), 'w'))
'''


@pytest.fixture(scope='module')
def mirrored_vs_one_device(tmp_path_factory):
    out = tmp_path_factory.mktemp('mirrored')
    return on_two_cpus(MIRRORED_CHECK, out, ','.join(losses.DECODERS))


@pytest.mark.parametrize('model', list(losses.DECODERS))
def test_mirrored_step_equals_one_device(mirrored_vs_one_device, model):
    one, two = mirrored_vs_one_device[model]
    assert (one['replicas'], two['replicas']) == (1, 2)
    for key in ('loss', 'rec', 'kl', 'log_sigma'):
        assert two['stats'][key] == pytest.approx(one['stats'][key], rel=1e-4, abs=1e-5), key
    assert len(one['change']) == len(two['change'])
    for a, b in zip(one['before'], two['before']):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))  # the same initial weights
    for w, a, b in zip(one['before'], one['change'], two['change']):
        w, a, b = (np.asarray(t, np.float32) for t in (w, a, b))
        # A change is read off float32 weights: it carries their rounding, a few ulp of w.
        tolerance = 1e-3 * np.abs(a) + 1e-3 * np.abs(a).max() + 4 * np.spacing(np.abs(w) + np.abs(a))
        assert np.all(np.abs(b - a) <= tolerance), np.max(np.abs(b - a) - tolerance)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_workers_on_localhost_train_and_write_one_checkpoint(image_folder, tmp_path):
    workers = [f'127.0.0.1:{free_port()}', f'127.0.0.1:{free_port()}']
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': index}}))
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, 'train.py'), '--strategy', 'multi_worker',
             '--dataset', image_folder, '--output_dir', str(tmp_path), '--experiment_name', 'mw',
             '--max_steps', '3'] + TINY, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    try:
        outputs = [p.communicate(timeout=1800) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    run_dir = tmp_path / 'mw'
    assert 'ckpt-3.index' in os.listdir(run_dir / 'checkpoints')
    assert not [f for f in os.listdir(run_dir) if f.startswith('.tmp-worker')]
    assert [json.loads(line)['step'] for line in open(run_dir / 'metrics.jsonl')] == [3]
    assert '2 replica(s)' in outputs[0][0]


@pytest.mark.parametrize('precision, compute, scaled', [('float16', 'float16', True),
                                                       ('bfloat16', 'bfloat16', False)])
def test_mixed_precision_keeps_the_loss_terms_float32_and_finite(image_folder, tmp_path, precision,
                                                                 compute, scaled):
    import keras
    config = settings.Config(model='sigma_pixel', batch_size=8, z_dim=4, mixed_precision=precision,
                          channels=1, output_dir=str(tmp_path), experiment_name='mp')
    keras.mixed_precision.set_dtype_policy(training.POLICIES[precision])
    try:
        trainer = training.Trainer(config)
        assert trainer.vae.encoder.layers[1].compute_dtype == compute
        assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer) == scaled
        x = tf.random.uniform((8, 28, 28, 1), -1, 1)
        params, mu, log_var = trainer.vae(x, tf.zeros((8, 4)), training=True)
        assert (params.dtype, mu.dtype, log_var.dtype) == (tf.float32,) * 3
        stats = trainer.train_step(x)
        for name, value in stats.items():
            assert value.dtype == tf.float32 and np.isfinite(float(value)), name
        assert all(v.dtype == 'float32' for v in trainer.vae.weights)
    finally:
        keras.mixed_precision.set_dtype_policy('float32')
    args = ['--dataset', image_folder, '--output_dir', str(tmp_path), '--max_steps', '2'] + TINY
    flag = ['--mixed_precision'] if precision == 'float16' else ['--mixed_precision', precision]
    assert run(args + flag) == 0
    assert json.load(open(tmp_path / 'sigma' / 'config.json'))['mixed_precision'] == precision
    assert run(args + ['--max_steps', '3']) == 2  # resuming in another precision is refused

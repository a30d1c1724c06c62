"""Stress test of "nothing lost": kill a real training run at random moments, resume it each
time, then check what README's "What is guaranteed" promises.

python benchmarks/stress_kill.py --kills 25 --epochs 10 --output_dir /tmp/stress

delivers --kills SIGKILLs and --kills SIGTERMs, in a seeded random order, each a seeded
random time (uniform in [0, --max_delay] s) after train.py says it starts training, to a
run of train.py with --checkpoint_every 1 (a checkpoint every step, so that many kills land
inside a save); after each kill the same command resumes the run. After the last kill the
run goes to its end undisturbed, and a reference run resumed from a copy of the same
checkpoint goes to the same end. Checks:

  - every kill planned was delivered before the run reached its end (else raise --epochs);
  - every SIGKILL ends the process (status -9), every SIGTERM saves and exits with 143;
  - every resume continues from the newest complete checkpoint on disk (never from step 0);
  - metrics.jsonl holds exactly one row per epoch, with increasing steps;
  - no temporary is left (TensorFlow's ckpt-N_temp/, checkpoint.tmp*, *.tempstate*, ours
    .tmp-*), no checkpoint was set aside as damaged, and nothing is left in $TMPDIR;
  - the final weights, optimizer state and counters equal the reference run's, tensor for
    tensor (train_seconds and TensorFlow's save_counter aside, which count wall time and
    saves).

Prints a summary and writes it to <output_dir>/stress_summary.json; exit status 0 if every
check holds, 1 otherwise.
"""
import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'stress'
TEMPORARY = re.compile(r'ckpt-\d+_temp|checkpoint\.tmp.*|.*\.tempstate.*|\.tmp-.*')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--kills', type=int, default=25, help='SIGKILLs, and as many SIGTERMs')
    p.add_argument('--seed', type=int, default=0, help='order and moments of the kills')
    p.add_argument('--output_dir', required=True, help='a new folder for the runs and logs')
    p.add_argument('--dataset', default='fashion_mnist', help='as for train.py')
    p.add_argument('--epochs', type=int, default=10,
                   help='as for train.py; enough for every kill to land before the end')
    p.add_argument('--batch_size', type=int, default=256, help='as for train.py')
    p.add_argument('--model', default='sigma', help='as for train.py')
    p.add_argument('--max_delay', type=float, default=12.0,
                   help='seconds after the start of training within which each kill lands')
    args = p.parse_args(argv)
    if args.kills < 0 or args.epochs < 1 or args.max_delay <= 0:
        p.error('--kills must be >= 0, --epochs >= 1, --max_delay > 0')
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
        p.error(f'--output_dir {args.output_dir} is not empty')
    return args


def train_command(args, output_dir):
    return [sys.executable, os.path.join(REPO, 'train.py'), '--dataset', args.dataset,
            '--model', args.model, '--output_dir', output_dir, '--experiment_name', NAME,
            '--epochs', str(args.epochs), '--batch_size', str(args.batch_size),
            '--checkpoint_every', '1', '--seed', str(args.seed)]


class Attempt:
    """One process of train.py: started, optionally signalled, its output parsed."""

    def __init__(self, command, log_prefix, env):
        self.out_path, self.err_path = log_prefix + '.out', log_prefix + '.err'
        with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
        self.started = time.time()

    def wait_for_training(self, timeout=600):
        """Waits until train.py has printed its start line; False if it ended before."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if 'run folder' in self.stdout():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.05)
        raise TimeoutError(f'train.py did not start within {timeout} s; see {self.err_path}')

    def stdout(self):
        with open(self.out_path) as f:
            return f.read()

    def stderr(self):
        with open(self.err_path, errors='replace') as f:
            return f.read()

    def resumed_step(self):
        match = re.search(r'resumed from \S+ at step (\d+)', self.stdout())
        return int(match[1]) if match else None


def newest_complete_checkpoint(run_dir):
    folder = os.path.join(run_dir, 'checkpoints')
    numbers = [int(m[1]) for n in (os.listdir(folder) if os.path.isdir(folder) else [])
               for m in [re.fullmatch(r'ckpt-(\d+)\.index', n)] if m]
    return max(numbers) if numbers else None


def temporaries(folder):
    return sorted(os.path.relpath(os.path.join(root, n), folder)
                  for root, dirs, files in os.walk(folder) for n in dirs + files
                  if TEMPORARY.fullmatch(n))


def checkpoint_tensors(path):
    sys.path.insert(0, REPO)
    import utils
    utils.quiet_tensorflow()
    import tensorflow as tf
    reader = tf.train.load_checkpoint(path)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if not k.startswith(('_CHECKPOINTABLE_OBJECT_GRAPH', 'save_counter', 'train_seconds'))}


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    out = os.path.abspath(args.output_dir)
    runs, reference, logs, tmp = (os.path.join(out, d) for d in ('runs', 'reference', 'logs', 'tmp'))
    for folder in (runs, reference, logs, tmp):
        os.makedirs(folder, exist_ok=True)
    run_dir = os.path.join(runs, NAME)
    env = dict(os.environ, TMPDIR=tmp, TF_CPP_MIN_LOG_LEVEL='2', PYTHONUNBUFFERED='1')
    rng = random.Random(args.seed)
    plan = ['SIGKILL'] * args.kills + ['SIGTERM'] * args.kills
    rng.shuffle(plan)
    failures, records = [], []
    expected_resume = None  # the newest complete checkpoint after the previous kill

    def check(ok, message):
        if not ok:
            failures.append(message)
            print('FAILED: ' + message, flush=True)

    print(f'{len(plan)} kills over: {" ".join(train_command(args, runs))}', flush=True)
    for i, name in enumerate(plan):
        attempt = Attempt(train_command(args, runs), os.path.join(logs, f'{i:03d}'), env)
        if not attempt.wait_for_training():
            check(False, f'kill {i}: train.py ended before training (status '
                         f'{attempt.proc.returncode}); see {attempt.err_path}')
            break
        resumed = attempt.resumed_step()
        check(resumed == expected_resume,
              f'kill {i}: resumed from step {resumed}, expected {expected_resume}')
        delay = rng.uniform(0, args.max_delay)
        time.sleep(delay)
        if attempt.proc.poll() is not None:
            check(False, f'the run ended before kill {i + 1} of {len(plan)}: raise --epochs')
            expected_resume = newest_complete_checkpoint(run_dir)
            break
        attempt.proc.send_signal(getattr(signal, name))
        status = attempt.proc.wait(timeout=300)
        err = attempt.stderr()
        saved = re.search(r'interrupted at step (\d+); saved \S+ckpt-(\d+)', err)
        left = temporaries(run_dir)
        expected_resume = newest_complete_checkpoint(run_dir)
        record = {'kill': i, 'signal': name, 'delay': round(delay, 2), 'status': status,
                  'expected_resume': records[-1]['newest_checkpoint_after'] if records else None,
                  'resumed_from': resumed, 'newest_checkpoint_after': expected_resume,
                  'temporaries_after': len(left),
                  'skipped_checkpoints': attempt.stderr().count('skipped checkpoint')}
        records.append(record)
        check('Traceback' not in err, f'kill {i}: a traceback; see {attempt.err_path}')
        check(record['skipped_checkpoints'] == 0,
              f'kill {i}: a checkpoint was skipped as damaged; see {attempt.err_path}')
        if name == 'SIGKILL':
            check(status == -signal.SIGKILL, f'kill {i}: SIGKILL gave status {status}')
        else:
            check(status == 143 and saved is not None and int(saved[1]) == int(saved[2])
                  and int(saved[2]) == expected_resume,
                  f'kill {i}: SIGTERM gave status {status}, saved {saved and saved[0]}')
        print(f'kill {i + 1:3d}/{len(plan)}: {name} after {delay:5.2f} s, status {status:4d}, '
              f'resumed from {resumed}, newest checkpoint now {expected_resume}'
              + (f', {len(left)} temporaries left by the kill' if left else ''), flush=True)

    # The last resume goes to the end; a copy of the folder now is the reference's start.
    shutil.copytree(run_dir, os.path.join(reference, NAME))
    final = Attempt(train_command(args, runs), os.path.join(logs, 'final'), env)
    final_status = final.proc.wait()
    check(final_status == 0, f'the final resume exited with {final_status}; see {final.err_path}')
    check(final.resumed_step() == expected_resume,
          f'the final resume started at {final.resumed_step()}, expected {expected_resume}')
    kill_seconds = time.time() - start
    ref = Attempt(train_command(args, reference), os.path.join(logs, 'reference'), env)
    check(ref.proc.wait() == 0, f'the reference run failed; see {ref.err_path}')
    check(ref.resumed_step() == expected_resume, 'the reference started from another checkpoint')

    steps_per_epoch = int(re.search(r'(\d+) steps per epoch', final.stdout())[1])
    total = steps_per_epoch * args.epochs
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]  # fails on a torn or damaged line
    steps = [r['step'] for r in rows]
    check(steps == [steps_per_epoch * (e + 1) for e in range(args.epochs)],
          f'metrics rows at steps {steps}, not one per epoch')
    with open(os.path.join(reference, NAME, 'metrics.jsonl')) as f:
        ref_rows = {r['step']: r for r in map(json.loads, f)}
    test_differences = [abs(r[k] - ref_rows[r['step']][k]) for r in rows if r['step'] > expected_resume
                        for k in r if k.startswith('test_')]
    left = temporaries(out)
    check(not left, f'temporaries left: {left[:5]}')
    damaged = [p for p in (os.path.join(run_dir, 'checkpoints', 'damaged'),
                           os.path.join(run_dir, 'metrics.jsonl.damaged')) if os.path.exists(p)]
    check(not damaged, f'damaged files: {damaged}')
    check(os.listdir(tmp) == [], f'left in TMPDIR: {os.listdir(tmp)}')
    mine = checkpoint_tensors(os.path.join(run_dir, 'checkpoints', f'ckpt-{total}'))
    theirs = checkpoint_tensors(os.path.join(reference, NAME, 'checkpoints', f'ckpt-{total}'))
    import numpy as np
    differences = {k: float(np.max(np.abs(np.asarray(mine[k], np.float64) - np.asarray(theirs[k], np.float64))))
                   for k in mine if k in theirs and np.asarray(mine[k]).dtype.kind in 'fiu'}
    identical = mine.keys() == theirs.keys() and all(
        np.array_equal(mine[k], theirs[k]) for k in mine)
    check(identical, f'final checkpoint differs from the reference: max |difference| '
                     f'{max(differences.values())}')

    kills = [r for r in records if r['signal'] == 'SIGKILL']
    # (resumed from, newest complete checkpoint before) of every start after a kill
    resumes = [(r['resumed_from'], r['expected_resume']) for r in records[1:]] + [
        (final.resumed_step(), expected_resume)]
    summary = {
        'command': ' '.join(['python', 'benchmarks/stress_kill.py'] + (argv or sys.argv[1:])),
        'train_command': ' '.join(train_command(args, runs)[1:]),
        'kills_delivered': len(records),
        'sigkill': len(kills), 'sigterm': len(records) - len(kills),
        'resumes': len(resumes),
        'resumes_from_the_newest_checkpoint': sum(1 for got, want in resumes if got == want),
        'resumes_from_step_0': sum(1 for got, want in resumes if got is None),
        'kills_that_left_temporaries': sum(1 for r in records if r['temporaries_after']),
        'steps_per_epoch': steps_per_epoch, 'epochs': args.epochs, 'total_steps': total,
        'metrics_rows': steps,
        'final_resume_from': final.resumed_step(),
        'tensors_compared': len(mine), 'tensors_identical': identical,
        'max_abs_difference': max(differences.values()) if differences else None,
        'max_test_metric_difference': max(test_differences) if test_differences else None,
        'seconds_with_kills': round(kill_seconds), 'seconds_in_all': round(time.time() - start),
        'failures': failures, 'records': records,
    }
    with open(os.path.join(out, 'stress_summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(f"""
| check | result |
|---|---|
| kills delivered | {len(records)} ({summary['sigkill']} SIGKILL, {summary['sigterm']} SIGTERM) of {len(plan)} planned |
| exit statuses | SIGKILL -9, SIGTERM 143 with its checkpoint saved: {'all' if not any('gave status' in f for f in failures) else 'NOT all'} |
| resumes from the newest complete checkpoint | {summary['resumes_from_the_newest_checkpoint']} of {len(resumes)} (from step 0: {summary['resumes_from_step_0']}); the last one from step {final.resumed_step()} |
| kills that left TensorFlow temporaries (inside a save) | {summary['kills_that_left_temporaries']}, all removed by the next resume |
| metrics rows | {len(steps)} at steps {steps}: {'one per epoch' if steps == [steps_per_epoch * (e + 1) for e in range(args.epochs)] else 'WRONG'} |
| temporaries, damaged files, $TMPDIR entries left | {len(left)}, {len(damaged)}, {len(os.listdir(tmp))} |
| final checkpoint vs a reference resumed from ckpt-{expected_resume} | {len(mine)} tensors, {'identical' if identical else 'DIFFERENT'} (max abs difference {summary['max_abs_difference']}) |
| wall time | {kill_seconds / 60:.1f} min with kills, {(time.time() - start) / 60:.1f} min in all |
""")
    print('all checks hold' if not failures else f'{len(failures)} check(s) failed', flush=True)
    return 0 if not failures else 1


if __name__ == '__main__':
    sys.exit(main())

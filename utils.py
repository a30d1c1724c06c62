"""Small helpers: the commands' start and CLI skeleton (quiet TensorFlow, one-line errors,
Ctrl-C), progress, flag types, the memory check, image grids, and interrupts held off while a
checkpoint is written. What the tool writes on disk, and where: files.py."""
import os
import sys
# The C half of `signal`: importing `signal` itself imports enum and collections, half a second
# on a busy machine, during which a Ctrl-C would end the command in a traceback.
import _signal

_STDERR = 2  # standard error's file descriptor, or its copy while quiet_tensorflow silences it
MARKS = os.environ.get('SIGMA_VAE_MARKS', '') not in ('', '0')  # tests: see mark()


def _prog():
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'python'


def mark(name):
    """With SIGMA_VAE_MARKS=1, writes '<prog>: mark <name>' to standard error: the moments a test
    waits for (the start-up's Ctrl-C handler in place, TensorFlow imported) instead of guessing
    how long a busy machine takes to reach them."""
    if MARKS:
        os.write(_STDERR, f'{_prog()}: mark {name}\n'.encode())


def _exit_now(signum, frame):
    """Ctrl-C while a command starts: nothing is written yet, so leave at once, whatever is
    being imported (an exception raised inside NumPy's or TensorFlow's import can surface as
    another error, or be swallowed)."""
    os.write(_STDERR, f'{_prog()}: interrupted\n'.encode())
    os._exit(128 + signum)


def _is_command():
    """Whether the program is one of this project's commands (train.py, evaluate.py, ...)."""
    path = getattr(sys.modules.get('__main__'), '__file__', None)
    return bool(path) and os.path.dirname(os.path.abspath(path)) == os.path.dirname(
        os.path.abspath(__file__))


# Before any other import: each command imports this module first, so from its first line on a
# Ctrl-C ends it with one line and status 130 (run_command takes over once main() starts).
if _is_command() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _exit_now)
    mark('handler')

# The rest, once a Ctrl-C is handled.
import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import unicodedata  # noqa: E402

import numpy as np  # noqa: E402

VERBOSE = os.environ.get('SIGMA_VAE_VERBOSE', '') not in ('', '0')


class UsageError(Exception):
    """Bad input from the user: the CLI prints its message on one line, exit code 2."""


class RunFailed(UsageError):
    """The command stopped on a failure of the machine or of training, not of the input (exit
    status 1): a loss that went non-finite, a checkpoint that could not be written."""


_signalled = []  # the signals _interrupted has raised on


def _interrupted(signum, frame):
    os.write(_STDERR, f'{_prog()}: interrupted\n'.encode())
    _signalled.append(signum)
    raise SystemExit(128 + signum)


def _unraisable(hook):
    """sys.unraisablehook without the traceback of an interrupt raised inside a destructor (a
    TensorFlow function's __del__), which Python swallows; run_command still exits 130."""
    def unraisable(info):
        if not (isinstance(info.exc_value, SystemExit) and _signalled):
            hook(info)
    return unraisable


def run_command(prog, parse_args, work, argv=None):
    """The skeleton of every command's main(): parse the flags, without TensorFlow (a bad one:
    one line, status 2; --help answers at once), then import TensorFlow quietly and `work`
    ('module:function', the library function that does the command's work, or a function), call
    it with the parsed flags, and end any error in one line `<prog>: error: ...` with its status:
    UsageError 2, RunFailed 1, OSError 1 (a full disk, say). Until the work starts (flags,
    imports: nothing written yet) a Ctrl-C ends the process at once with one line and 130; from
    then on it raises SystemExit(130), so that a command's own cleanup runs (training saves its
    checkpoint: see Interrupts); an interrupted command ignores further signals on its way out.

    Once work(args) has returned, its work is done and said ('wrote ...'), and its status is
    decided: a Ctrl-C while Python and TensorFlow shut down (a second or more) is ignored.
    A handler cannot serve there: Python resets its handlers to the default late in its
    shutdown, and the signal would kill the process (status -2, no line), or raise inside a
    destructor (a traceback, status 0)."""
    command = _is_command() and threading.current_thread() is threading.main_thread()
    try:
        # Until the work starts, nothing is written: a Ctrl-C leaves at once (_exit_now). An
        # exception raised inside an import can surface as another error, or be swallowed.
        args = parse_args(argv)
        quiet_tensorflow()
        mark('tensorflow')
        if isinstance(work, str):
            module, name = work.split(':')
            work = getattr(importlib.import_module(module), name)
        if command:
            signal.signal(signal.SIGINT, _interrupted)
            sys.unraisablehook = _unraisable(sys.unraisablehook)
            mark('work')
        work(args)
        if command and _signalled:  # the interrupt was raised in a destructor, and swallowed
            return 128 + _signalled[0]
    except UsageError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        return 1 if isinstance(e, RunFailed) else 2
    except OSError as e:
        where = e.filename if e.filename else 'a file could not be read or written'
        print(f'{prog}: error: {where}: {e.strerror or e}', file=sys.stderr)
        return 1
    except Exception:
        if command and _signalled:  # the interrupt surfaced as another error (a lazy import's)
            return 128 + _signalled[0]
        raise
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        return 130
    except SystemExit:  # interrupted (130, 143): whatever had to be saved is saved
        ignore_interrupts()
        raise
    finally:
        if command:  # not in a test's process, which calls main() and goes on
            ignore_interrupts()
    return 0


def ignore_interrupts():
    """On the way out after an interrupt: a further Ctrl-C or SIGTERM (while TensorFlow shuts
    down) must not turn the exit into a traceback and status -2."""
    if threading.current_thread() is threading.main_thread():
        for s in Interrupts.SIGNALS:
            signal.signal(s, signal.SIG_IGN)


def quiet_tensorflow():
    """Imports TensorFlow without its start-up noise, unless SIGMA_VAE_VERBOSE=1.

    Its C++ libraries print banners (oneDNN, CUDA stubs, CPU features) while they load, before
    their log level applies, so standard error is pointed at /dev/null for the import; later
    C++ messages below FATAL are dropped (TF_CPP_MIN_LOG_LEVEL=3: e.g. "failed call to cuInit"
    on a machine without a GPU), and TensorFlow's Python logger shows errors only (its
    warnings, e.g. of a function traced again in each evaluation of a comparison); Python's
    own errors and warnings are untouched. Call it before anything imports TensorFlow;
    afterwards it does nothing.
    """
    if VERBOSE or 'tensorflow' in sys.modules:
        return
    global _STDERR
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    _STDERR = saved
    try:
        import tensorflow
        tensorflow.get_logger().setLevel(logging.ERROR)
    finally:
        _STDERR = 2
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class quiet_logger:
    """Within the block, a Python logger (e.g. 'absl') shows only errors, unless SIGMA_VAE_VERBOSE=1."""

    def __init__(self, name):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        if not VERBOSE:
            self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def progress(iterable=None, show=True, **kwargs):
    """A tqdm progress bar on a terminal; where standard error is a file or a pipe (which would
    get every redraw of a bar), a line at least every PROGRESS_SECONDS or tenth of the work
    (Lines); nothing when `show` is false."""
    from tqdm import tqdm
    if show and not sys.stderr.isatty():
        return Lines(iterable, **kwargs)
    return tqdm(iterable, disable=not show, **kwargs)


PROGRESS_SECONDS = 30  # the longest a command is silent on a log file (Lines)


class Lines:
    """tqdm's interface (iterate, update, set_postfix, write, close) for a log file: a line
    '<desc>: <n>/<total> <unit>s (<p>%), <elapsed> so far, about <left> left' whenever another
    tenth of the total is done or PROGRESS_SECONDS have passed since the last line."""

    def __init__(self, iterable=None, total=None, initial=0, desc='', unit='it', **_):
        self.iterable, self.n, self.desc, self.unit = iterable, initial, desc or 'working', unit
        if total is None:
            try:
                total = len(iterable)
            except TypeError:  # no length (a tf.data set of unknown size, a generator)
                pass
        self.total = total
        self.start = self.last = time.time()
        self.start_n, self.tenth, self.postfix = initial, self._tenth(), ''

    def _tenth(self):
        return int(10 * self.n / self.total) if self.total else 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self.n += n
        now = time.time()
        if now - self.last >= PROGRESS_SECONDS or self._tenth() > self.tenth:
            self.last, self.tenth = now, self._tenth()
            done = self.n - self.start_n
            plural = self.unit + ('es' if self.unit.endswith(('s', 'sh', 'ch', 'x')) else 's')
            line = f'{self.desc}: {self.n}' + (f'/{self.total}' if self.total else '') + \
                f' {plural}'
            if self.total:
                line += f' ({100 * self.n / self.total:.0f}%)'
            line += f', {_duration(now - self.start)} so far'
            if self.total and done:
                line += f', about {_duration((now - self.start) / done * (self.total - self.n))} left'
            print(line + self.postfix, file=sys.stderr, flush=True)

    def set_postfix(self, values):
        self.postfix = '; ' + ', '.join(f'{k} {v}' for k, v in values.items())

    def write(self, text, file=None):
        print(text, file=file or sys.stdout, flush=True)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _duration(seconds):
    return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.0f} min'


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' only where there is a default: not for required flags, switches off by
    default, or settings whose default is None (their help says what None means)."""

    def _get_help_string(self, action):
        if action.required or any(action.default is d for d in (None, False, argparse.SUPPRESS)) \
                or action.default == '' or '(default' in (action.help or ''):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, 'prog: error: message (see prog --help)', exit
    status 2, instead of the usage block and the error, and whose help shows the defaults that
    there are (HelpFormatter). Every CLI of the project uses it."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        message = ' '.join(str(message).splitlines())
        self.exit(2, f'{self.prog}: error: {message} (see {self.prog} --help)\n')

    def parse_known_args(self, args=None, namespace=None):
        # A value that starts with '-' (--data_range -1,1) reads to argparse as an option;
        # for an option whose choices start with '-', the next word is its value.
        args = list(sys.argv[1:] if args is None else args)
        dashed = {flag for action in self._actions if action.choices
                  and any(str(c).startswith('-') for c in action.choices)
                  for flag in action.option_strings}
        for i in range(len(args) - 1):
            if args[i] in dashed:
                args[i:i + 2] = [f'{args[i]}={args[i + 1]}', None]
        return super().parse_known_args([a for a in args if a is not None], namespace)


def check_name(name, flag):
    """Raises UsageError unless `name` is a plain name of a file or folder: not empty, not a
    path ('/', '..'), not starting with '-', without whitespace or control characters."""
    if (not name or name in ('.', '..') or '/' in name or os.sep in name or '..' in name
            or name.startswith('-')
            or any(c.isspace() or unicodedata.category(c).startswith('C') for c in name)):
        raise UsageError(f'{flag} must be a plain name (not a path, not starting with "-", '
                         f'without spaces or control characters), got {name!r}')


MAX_INT = 2 ** 63 - 1  # int64: TensorFlow's step counters and seeds take no larger integer


def number(cast=int, minimum=None, maximum=None):
    """The argparse type of a finite number from `minimum` to `maximum` (inclusive; None: any, an
    integer up to MAX_INT): one check for every such flag of every command. It also takes a
    number, so that Config's checks apply it to settings made in Python and to config.json."""
    kind = 'an integer' if cast is int else 'a number'
    if cast is int and maximum is None:
        maximum = MAX_INT
    if minimum is not None and maximum not in (None, MAX_INT):
        expected = f'{kind} from {minimum} to {maximum}'
    elif minimum is not None:
        expected = f'{kind} of at least {minimum}'
    else:
        expected = f'{kind} of at most {maximum}' if maximum is not None else 'a finite number'

    def parse(text):
        try:
            value = cast(text)
            ok = (math.isfinite(value) and (minimum is None or value >= minimum)
                  and (maximum is None or value <= maximum))
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok or isinstance(text, bool) or (
                cast is int and isinstance(text, float) and text != int(text)):
            raise argparse.ArgumentTypeError(f"must be {expected}, got '{text}'")
        return value
    return parse


def positive(cast=int, minimum=None):
    """number() above 0 (or at least `minimum`): positive()(text) -> int; positive(float) ->
    float."""
    check = number(cast, minimum)
    kind = 'integer' if cast is int else 'number'
    expected = f'{"an" if cast is int else "a"} {kind} of at least {minimum}' if minimum else \
        f'a positive {kind}'

    def parse(text):
        try:
            value = check(text)
        except argparse.ArgumentTypeError:
            too_large = cast is int and isinstance(text, (int, str)) and \
                str(text).strip().lstrip('+').isdigit() and int(text) > MAX_INT
            raise argparse.ArgumentTypeError(
                f"must be {expected}" + (f' of at most {MAX_INT}' if too_large else '') +
                f", got '{text}'") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be {expected}, got '{text}'")
        return value
    return parse


def check_memory(needed, what, needs, share=1.0):
    """UsageError '<what> is too large: <needs> would need about X GiB, more than ...' if
    `needed` bytes (an integer of any size) are more than `share` of this machine's memory: said
    before the work, not as an out-of-memory kill minutes later."""
    memory = physical_memory()
    if memory and needed > memory * share:
        gib = needed / 2 ** 30 if needed < 2 ** 1000 else math.inf
        amount = f'about {gib:,.0f} GiB' if math.isfinite(gib) else 'more memory than any machine has'
        raise UsageError(f'{what} is too large: {needs} would need {amount}, more than '
                         f"{'half of ' if share == 0.5 else ''}the {memory / 2 ** 30:,.0f} GiB of "
                         f'memory here')


def physical_memory():
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return None


def error_reason(error):
    """The first line of an exception's message, without TensorFlow's node prefix."""
    text = re.sub(r'\{\{[^}]*\}\}\s*', '', str(error)).strip()
    text = text.splitlines()[0] if text else ''
    return f'{type(error).__name__}: {text[:200]}' if text else type(error).__name__


def image_grid(images, rows, cols):
    """(N, H, W, C) uint8 with N <= rows * cols -> one (rows*H, cols*W, C) image.

    Images fill the grid row by row; missing cells stay black.
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    if n > rows * cols:
        raise ValueError(f'{n} images do not fit a {rows}x{cols} grid')
    grid = np.zeros((rows * h, cols * w, c), images.dtype)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    return grid


def side_by_side(inputs, reconstructions):
    """Interleaves two (N, H, W, C) arrays: input 0, reconstruction 0, input 1, ..."""
    pairs = np.stack([inputs, reconstructions], axis=1)
    return pairs.reshape((-1,) + pairs.shape[2:])


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM; `status` is the exit status, 128 + the signal: 130, 143.

    A BaseException, as KeyboardInterrupt, so that no `except Exception` (Keras wraps the
    exceptions of layer calls) swallows or rewrites it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum, self.status = signum, 128 + signum

    def __str__(self):
        return signal.Signals(self.signum).name


class Interrupts:
    """While active (a context manager), SIGINT and SIGTERM raise Interrupted in the main thread,
    except inside `held()` blocks (a checkpoint being written), where the signal is only noted
    and raised when the block ends. Once Interrupted has been raised, further signals are
    ignored, so that the interrupt's own checkpoint is written whole."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None  # the first signal received
        self.holding = 0
        self.raised = False
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        if self.previous:
            for s, handler in self.previous.items():
                signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if not self.holding and not self.raised:
            self._raise()

    def _raise(self):
        self.raised = True
        raise Interrupted(self.signum)

    @contextlib.contextmanager
    def held(self):
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
        if not self.holding and self.signum is not None and not self.raised:
            self._raise()

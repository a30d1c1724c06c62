"""What the tool reads and writes on disk, and where it may: paths named by flags checked
before any work, writes that survive kills (atomic, temporaries cleaned in the tool's own
folders only), its marker in every folder it made, output folders replaced whole, no write
through a symbolic link, and a private temporary folder per process."""
from utils import UsageError  # first: utils.py's start comes before every other import

import contextlib
import os
import re
import shutil
import socket
import tempfile
import uuid

import numpy as np
from PIL import Image

# ---- paths named by flags: checked before any work --------------------------------------

def check_input(path, flag, kind='file'):
    """UsageError naming the flag and the path unless `path` exists, is of `kind` ('file',
    'folder' or 'any': either) and can be read."""
    if not os.path.exists(path):
        raise UsageError(f"{flag} '{path}' does not exist")
    is_folder = os.path.isdir(path)
    if kind == 'file' and (is_folder or not os.path.isfile(path)):
        raise UsageError(f"{flag} '{path}' is {'a folder' if is_folder else 'not a regular file'}, "
                         f"not a file")
    if kind == 'folder' and not is_folder:
        raise UsageError(f"{flag} '{path}' is a file, not a folder")
    if not os.access(path, os.R_OK | (os.X_OK if is_folder else 0)):
        raise UsageError(f"{flag} '{path}' cannot be read (permission denied)")


def check_output(path, flag, kind='file'):
    """UsageError naming the flag and the path unless the tool could write `path`, a file or a
    folder (`kind`): not a link, not a folder where a file goes (or the reverse), and the
    nearest folder that exists on its way is writable (the missing ones are made)."""
    refuse_link(path, flag)
    if kind == 'file' and os.path.isdir(path):
        raise UsageError(f"{flag} '{path}' is a folder, not a file")
    if kind == 'folder' and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} '{path}' is a file, not a folder")
    existing = os.path.abspath(path if kind == 'folder' else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} '{path}': '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} '{path}': '{existing}' cannot be written (permission denied)")


HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'  # at 0, or 512, 1024, 2048, ... after a user block


def check_hdf5(path, flag):
    """check_input, and the file is HDF5 (its signature; Keras' .h5 weights are HDF5)."""
    check_input(path, flag)
    with open(path, 'rb') as f:
        offsets = [0] + [512 * 2 ** k for k in range(12)]
        found = False
        for offset in offsets:
            f.seek(offset)
            if f.read(8) == HDF5_SIGNATURE:
                found = True
                break
    if not found:
        raise UsageError(f"{flag} '{path}' is not an HDF5 file (.h5 weights)")


TEMPORARY_PREFIX = '.tmp-'


def atomic_write(path, write):
    """Calls write(tmp_path) and renames the file into place, so no reader sees half a file.

    The temporary file is created with the permissions the umask gives (as open() would),
    not mkstemp's 0600, so that the file can be read by whom the umask allows.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'{TEMPORARY_PREFIX}{uuid.uuid4().hex[:12]}{os.path.splitext(path)[1]}')
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(path, image):
    """Writes a (H, W, 1 or 3) uint8 array as a PNG, atomically."""
    image = np.asarray(image)
    if image.shape[-1] == 1:
        image = image[..., 0]
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format='PNG'))


def save_pngs(folder, images, flag='the folder', legacy=False):
    """One PNG per image of (N, H, W, C) uint8, named 000000.png, 000001.png, ..., as the whole
    of `folder` (replace_folder: exactly these, in a folder of the tool's own; `legacy`: one of
    an earlier version's, without the marker, is the tool's too)."""
    def write(tmp):
        for i, image in enumerate(images):
            save_png(os.path.join(tmp, f'{i:06d}.png'), image)
    replace_folder(folder, write, flag, is_png_output, legacy, 'images')


def save_npz(path, **arrays):
    """Writes arrays into a compressed .npz file, atomically (readable without pickle)."""
    def write(tmp):
        with open(tmp, 'wb') as f:
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)


def write_text(path, text):
    """Writes a text file atomically."""
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def append_lines(path, lines):
    """Appends lines to a text file and flushes them to the disk; a symbolic link in its place is
    refused (OSError), not written through."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    with open(fd, 'a', encoding='utf-8', errors='surrogateescape') as f:
        f.write(''.join(line + '\n' for line in lines))
        f.flush()
        os.fsync(f.fileno())


def give_umask_permissions(folder):
    """Gives a folder written by another library, and everything in it, the permissions the
    umask gives a new folder or file (as open() and os.makedirs would), so that a shared output
    folder's group can read it as it reads the rest."""
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


_ATOMIC_TEMPORARY = re.compile(re.escape(TEMPORARY_PREFIX) + r'[0-9a-f]{12}(\.\w+)?')


def remove_temporary_files(*folders):
    """Deletes what atomic_write leaves behind in these folders (not below them) when a process
    is killed mid-write: its own temporaries' names only, regular files only."""
    for folder in folders:
        names = os.listdir(folder) if os.path.isdir(folder) else []
        for name in names:
            path = os.path.join(folder, name)
            if _ATOMIC_TEMPORARY.fullmatch(name) and os.path.isfile(path) \
                    and not os.path.islink(path):
                os.remove(path)


# ---- folders of the tool's own: the one place that decides where the tool may write -------

MARKER = '.sigma-vae'  # in every folder the tool made, which it may write into and replace


def is_marked(folder):
    """Whether `folder` holds the tool's marker (a regular file, not a link)."""
    path = os.path.join(folder, MARKER)
    return os.path.isfile(path) and not os.path.islink(path)


def mark_folder(folder, what):
    """Puts the marker into `folder` (made by the tool, or recognised as the tool's)."""
    if not is_marked(folder):
        write_text(os.path.join(folder, MARKER), f'{what} of sigma-vae: the tool writes only into '
                                                 f'folders that hold this file\n')


def refuse_link(path, flag):
    """UsageError if `path` is a symbolic link: the tool does not write through links."""
    if os.path.islink(path):
        raise UsageError(f"{flag} '{path}' is a symbolic link: the tool does not write through "
                         f"links; give the file or folder itself")


def check_replaceable(folder, flag, allowed, legacy=False):
    """UsageError unless `folder` may be replaced whole by replace_folder: missing, empty, or
    holding only what the tool writes there (allowed(path) -> True) and its marker; a folder
    of such entries without the marker is the tool's only if `legacy` (what an earlier version
    wrote there: an export's files), else someone's own (their 000000.png). Never a link or a
    file."""
    refuse_link(folder, flag)
    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} '{folder}' is a file, not a folder")
    names = [n for n in sorted(os.listdir(folder)) if n != MARKER]
    foreign = [n for n in names if not allowed(os.path.join(folder, n))]
    if names and not (is_marked(folder) or legacy):
        foreign = names
    foreign = [n + '/' if os.path.isdir(os.path.join(folder, n)) else n for n in foreign]
    if foreign:
        listed = ', '.join(foreign[:3]) + (f' and {len(foreign) - 3} more' if len(foreign) > 3 else '')
        raise UsageError(f"{flag} '{folder}' holds files the tool did not write ({listed}), which "
                         f"replacing it would delete: give a new folder, or move them away")


def is_png_output(path):
    """Whether `path` is one of save_pngs' files: 000000.png, 000001.png, ..."""
    return re.fullmatch(r'\d{6}\.png', os.path.basename(path)) is not None and \
        os.path.isfile(path) and not os.path.islink(path)


def replace_folder(folder, write, flag, allowed, legacy=False, what='output'):
    """Makes `folder` hold exactly what write(tmp) writes into an empty folder: written beside it
    (.tmp-<name>-new-<pid>, with the marker) and renamed into place, the previous folder (checked
    by check_replaceable) renamed away and deleted, so that a reader sees the old or the new
    whole, never a mix, and nothing stale is left among the new. Temporaries of processes of
    this host that no longer run (killed mid-write) are deleted first."""
    check_replaceable(folder, flag, allowed, legacy)
    parent, name = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    stale = re.compile(re.escape(f'{TEMPORARY_PREFIX}{name}-') + r'(new|old)-(\d+)')
    for entry in os.listdir(parent):
        match = stale.fullmatch(entry)
        if match and not _running(int(match[2])):
            path = os.path.join(parent, entry)
            (os.remove if os.path.islink(path) else shutil.rmtree)(path)
    tmp, old = (os.path.join(parent, f'{TEMPORARY_PREFIX}{name}-{kind}-{os.getpid()}')
                for kind in ('new', 'old'))
    try:
        os.makedirs(tmp)
        write(tmp)
        mark_folder(tmp, what)
        if os.path.isdir(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        for path in (tmp, old):
            shutil.rmtree(path, ignore_errors=True)


PRIVATE_TEMPDIR = 'sigma-vae'


def _running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's
    return True


@contextlib.contextmanager
def private_tempdir():
    """Points Python's tempfile at a folder of this process for the block, and deletes it after.

    TensorFlow's autograph writes a source file into $TMPDIR for every function it converts
    (deleted only by an atexit handler, which a SIGKILL skips) and tensorflow-datasets an
    empty tmp...tfds folder each time it looks a data set up (never deleted). The folder is
    named sigma-vae-<host>-<pid>-...; such folders of processes of this host that no longer run
    (killed) are deleted first.
    """
    base, host = tempfile.gettempdir(), socket.gethostname()
    pattern = re.compile(rf'{PRIVATE_TEMPDIR}-{re.escape(host)}-(\d+)-.*')
    for name in os.listdir(base):
        match = pattern.fullmatch(name)
        if match and int(match[1]) != os.getpid() and not _running(int(match[1])):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f'{PRIVATE_TEMPDIR}-{host}-{os.getpid()}-', dir=base)
    previous, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)

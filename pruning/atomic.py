"""Outputs written whole or not at all: a temporary sibling that takes the target's name only once it is complete.

A process stopped part-way (Ctrl-C, SIGTERM, SIGKILL, a full disk) leaves the earlier output as it was, never half
of a new one in its place. The staged files are flushed to the disk (``fsync``) before the rename, and the directory
that holds the new name after it, so that a power cut or a machine crash cannot leave an output whose rename survived
but whose contents did not (an empty or truncated checkpoint under the final name).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

from safetensors import SafetensorError

from .errors import error_line

__all__ = ["WriteError", "Busy", "locked", "fsync_dir", "fsync_file", "save_tensors", "staging_dir", "replace_dir",
           "staged_dir", "tidy", "write_text", "write_bytes", "written_in_place", "scratch_dir", "clear_scratch",
           "temporary_sibling", "clear_siblings", "sibling_name_problem"]

logger = logging.getLogger(__name__)


def _writer() -> str:
    """This process and its machine, ``PID@HOST``, as the names and locks it writes give them."""
    return f"{os.getpid()}@{socket.gethostname()}"


class WriteError(OSError):
    """An output could not be written (a full disk, a directory without write permission); names the output."""


# What flock answers on a file system that keeps no locks (NFS without a lock daemon, some FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


class Busy(OSError):
    """Another process holds the lock of an output (:func:`locked` without ``wait``); names the output and it."""


def _open_lock(path: Path, wait: bool) -> int | None:
    """A descriptor of the lock file ``path`` holding its exclusive lock, or None where another process holds it
    (and ``wait`` is False). A lock file its holder removed on release meanwhile is opened again."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)  # the file of a holder that has since let go and removed it: lock the one in its place


def _holder(path: Path, patience: float = 1.0) -> str:
    """Who holds the lock file ``path``, as it says (``process PID@HOST``).

    A holder writes that just after it takes the lock: a file still empty is read again for up to ``patience``
    seconds, so that a refusal in that moment names the holder too.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError:  # let go of and removed meanwhile
            return "another process"
        if text or time.monotonic() >= deadline:
            return f"process {text}" if text else "another process"
        time.sleep(0.01)


@contextlib.contextmanager
def locked(path: str | Path, what: str, wait: bool = False, waiting: str | None = None) -> Iterator[None]:
    """Hold the exclusive lock of ``what`` (the file ``path``, made beside it and removed on release) while the
    block runs, so that two processes, of this machine or of others sharing the file system, never write it at once.

    The lock is the kernel's (``flock``): a holder killed outright (SIGKILL, the OOM killer) lets go of it, and the
    file it leaves is taken over by the next one.

    Args:
        path: the lock file.
        what: the output it guards, as the refusal names it.
        wait: wait until the holder lets go, instead of refusing.
        waiting: logged (with the holder) when the block waits.

    Raises:
        Busy: (``wait`` False) another process holds it; one line naming ``what`` and the holder (``PID@HOST``).
        WriteError: the lock file cannot be made (a directory without write permission); one line naming ``what``.
    """
    path = Path(path)
    try:
        fd = _open_lock(path, wait=False)
    except OSError as err:
        if err.errno not in _NO_LOCKS:  # no lock file can be made beside it: named by the output, not the lock file
            raise _write_error(Path(what), err) from err
        # A file system without locks (some NFS mounts): the output is written as before locks, unguarded.
        logger.warning("%s: the file system of %s takes no locks (%s); writing it without one", what, path.parent,
                       err.strerror or err)
        with contextlib.suppress(OSError):
            os.unlink(path)
        yield
        return
    if fd is None:
        holder = _holder(path)
        if not wait:
            raise Busy(f"{what}: {holder} is writing it; wait for it to end, or write elsewhere")
        logger.info("%s (%s holds it)", waiting or f"{what}: waiting for the process writing it", holder)
        fd = _open_lock(path, wait=True)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{_writer()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a process that opened it meanwhile opens the next one
        os.close(fd)


# What fsync on a directory answers where the file system or platform cannot flush one: nothing to do there.
_NO_DIR_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR}


def fsync_file(path: str | Path) -> None:
    """Flush the file ``path``'s contents to the disk (an error, such as EIO, is raised: the data may be lost)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush the directory ``path`` (the names in it) to the disk; skipped where a directory cannot be opened or
    flushed (Windows, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_DIR_SYNC:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root``, then each directory from the deepest up to ``root`` itself."""
    dirs = []
    for here, _, files in os.walk(root):
        dirs.append(here)
        for name in files:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                fsync_file(path)
    for here in reversed(dirs):
        fsync_dir(here)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)  # set back at once; only where the umask cannot be read otherwise
    os.umask(old)
    return old


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the mode a plain ``open`` gives (``0o666`` less the umask).

    safetensors writes its files 0600, so weights in a shared run directory could be read by their writer alone
    while the configs and tokenizers beside them could be read by everyone the umask lets in.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    give_open_mode(path)
    fsync_file(path)  # on the disk before a caller renames it into place


def give_open_mode(path: str | Path) -> None:
    """Give the file ``path`` the mode a plain ``open`` gives (``0o666`` less the umask), as a library that writes
    its files 0600 (safetensors) would not."""
    os.chmod(path, 0o666 & ~_umask())


def staging_dir(out_dir: Path) -> Path:
    """A temporary sibling directory that replaces ``out_dir`` only once it is complete.

    It has the mode a plain ``mkdir`` gives (``0o777`` less the umask), not ``mkdtemp``'s 0700, so that the model
    directory it becomes can be read by whoever may read its parent's other directories.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # The writer's process and machine in the name: what a killed one leaves can be told from what one writes now.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{_writer()}.", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Give the complete directory ``tmp`` the name ``out_dir``; an earlier ``out_dir`` is removed.

    ``tmp``'s files are flushed to the disk before the rename and the parent directory after it, so that once this
    returns the new ``out_dir`` survives a power cut whole.
    """
    _fsync_tree(tmp)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        try:
            os.replace(tmp, out_dir)
        except BaseException:  # a Ctrl-C between the two renames: the earlier output goes back in its place
            if not out_dir.exists():
                os.replace(old, out_dir)
            raise
        try:
            fsync_dir(out_dir.parent)
        finally:
            # The new output is in place: the earlier one goes however this ends, a Ctrl-C while it is removed
            # included (it would leave part of it beside the new one).
            try:
                shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                shutil.rmtree(old, ignore_errors=True)
                raise
    else:
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)


def _write_error(target: Path, err: BaseException) -> WriteError:
    """``err`` (an OSError, or safetensors' error for one) as one line naming the output ``target``."""
    code = getattr(err, "errno", None)
    found = re.search(r"\(os error (\d+)\)", str(err))  # how safetensors' error gives the system's
    if code is None and found:
        code = int(found.group(1))
    if code is not None:
        reason = os.strerror(code)
    else:
        reason = error_line(err)
    error = WriteError(f"{target}: cannot write ({reason})")
    error.errno = code
    return error


def _writer_ended(staging: Path, name: str) -> bool:
    """Whether ``staging`` is a staging directory of output ``name`` whose writer, a process of this machine, has
    ended (a directory whose writer may still run, here or elsewhere, is never taken for a leftover)."""
    return _ended(staging.name[len(name) + 2:])


def _ended(owner: str) -> bool:
    """Whether the process ``owner`` names (``PID@HOST.SUFFIX``), a process of this machine, has ended; a process of
    another host, or one that may still run, is not taken for ended."""
    pid, _, rest = owner.partition("@")
    host = rest.rpartition(".")[0]
    if not pid.isdigit() or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def tidy(out_dir: str | Path, restore: bool = False) -> None:
    """Clear up what a writer of ``out_dir`` killed part-way (SIGKILL, the OOM killer) left beside it: its staging
    directories, each as large as the output, are removed, and so is the earlier ``out_dir`` it had moved aside
    once the new one has its name. With ``restore``, where it was killed between moving the earlier ``out_dir``
    aside and giving the new one its name, the earlier one is put back.
    """
    out_dir = Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old")
    if restore and not out_dir.exists() and old.is_dir():
        logger.warning("%s: putting back the earlier directory a stopped write had moved aside (%s)", out_dir, old)
        os.replace(old, out_dir)
    elif out_dir.is_dir() and old.is_dir() and not old.is_symlink():
        # Killed after the new directory took its name and before the earlier one was removed: it is garbage.
        logger.warning("%s: removing the earlier directory a stopped write left beside it (%s)", out_dir, old)
        shutil.rmtree(old, ignore_errors=True)
    for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*@*"):
        if path.is_dir() and not path.is_symlink() and _writer_ended(path, out_dir.name):
            logger.warning("%s: removing what a killed write of %s left", path, out_dir.name)
            shutil.rmtree(path, ignore_errors=True)


SCRATCH_PREFIX = "fineprune-"  # scratch directories in the system's temporary directory: fineprune-WHAT.PID@HOST.XXXX
_SCRATCH_CLEARED: set[Path] = set()  # the temporary directories this process has cleared (once each is enough)


@contextlib.contextmanager
def scratch_dir(what: str) -> Iterator[str]:
    """A directory in the system's temporary directory for ``what`` (``export``, ``download``, ...), removed when the
    block ends, however it ends. It is named with this process's id and host, so that the next process to make one,
    by any command, first clears those that a process killed outright (SIGKILL, the OOM killer) left behind: an ONNX
    export or a registered model's files, each as large as the model (:func:`clear_scratch`, once a process: a
    registration makes several)."""
    root = Path(tempfile.gettempdir())
    if root not in _SCRATCH_CLEARED:
        clear_scratch(root)
        _SCRATCH_CLEARED.add(root)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{what}.{_writer()}.", dir=root) as tmp:
        yield tmp


def _left_by_ended_process(path: Path, owner: str, directory: bool) -> bool:
    """Whether ``path``, a directory (or a file) of this user and no link, was left by the process ``owner`` names
    (``PID@HOST.SUFFIX``), which has ended on this machine (:func:`_ended`)."""
    try:
        kind = path.is_dir() if directory else path.is_file()
        mine = kind and not path.is_symlink() and path.stat().st_uid == os.getuid()
    except OSError:  # removed meanwhile
        return False
    return mine and _ended(owner)


def clear_scratch(root: str | Path) -> list[Path]:
    """Remove the scratch directories in ``root`` (see :func:`scratch_dir`) of this user whose process, on this
    machine, has ended; those of a process that may still run, here or on another host sharing ``root``, or of
    another user, are left. Returns the directories removed."""
    removed = []
    for path in Path(root).glob(f"{glob.escape(SCRATCH_PREFIX)}*.*@*"):
        owner = path.name[len(SCRATCH_PREFIX):].partition(".")[2]
        if _left_by_ended_process(path, owner, directory=True):
            logger.warning("%s: removing what a killed process left", path)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """A staging directory to write ``out_dir``'s files into; it becomes ``out_dir`` when the block ends normally.

    However the block ends otherwise (an error, Ctrl-C), the staging directory is removed and ``out_dir`` is left as
    it was; an error writing a file is raised as :class:`WriteError` naming ``out_dir``. What an earlier writer
    killed part-way left is cleared up first (:func:`tidy`).
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # the directory it points to is replaced, beside itself; the link stays
        out_dir = out_dir.resolve()
    tmp = None
    try:
        if out_dir.parent.is_dir():
            tidy(out_dir)
        tmp = staging_dir(out_dir)
        yield tmp
        replace_dir(tmp, out_dir)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, SafetensorError)) and not isinstance(err, WriteError):
            raise _write_error(out_dir, err) from err
        raise


def _sibling_name(name: str, token: str) -> str:
    """The name of a temporary sibling of ``name`` (see :func:`temporary_sibling`) with random part ``token``."""
    return f".{name}.{_writer()}.{token}.tmp"


def sibling_name_problem(path: str | Path) -> str | None:
    """Why the temporary siblings that write ``path`` (:func:`staging_dir`, :func:`temporary_sibling`) cannot be
    named on its filesystem, or None: their names hold ``path``'s with this writer's process, host and a random part,
    and would be longer than the filesystem takes (``NAME_MAX``, 255 bytes on most) though ``path``'s name fits."""
    path = Path(path).absolute()
    longest = len(os.fsencode(_sibling_name(path.name, "0" * 8)))
    directory = next((p for p in path.parents if p.is_dir()), None)
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX") if directory is not None else 255
    except (OSError, ValueError):
        limit = 255
    if longest <= limit:
        return None
    return (f"a name of {len(os.fsencode(path.name))} bytes is too long to write: the name it is written under "
            f"first, beside it ({longest - len(os.fsencode(path.name))} bytes longer on this host), would exceed the "
            f"{limit} the filesystem takes; give a shorter name")


def temporary_sibling(path: Path) -> Path:
    """A name beside ``path`` for writing it before it takes its name: one of its own for every writer (two threads
    of one process, or processes of one pid on two hosts that share the directory), so that no writer renames or
    removes another's half-written file. It names the writer's process and host (``.NAME.PID@HOST.XXXXXXXX.tmp``),
    so that what a writer killed outright left is known as such: those are removed first (:func:`clear_siblings`)."""
    clear_siblings(path)
    return path.with_name(_sibling_name(path.name, secrets.token_hex(4)))


def clear_siblings(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` (see :func:`temporary_sibling`) whose writer, a process of this
    machine, has ended (killed outright: SIGKILL, the OOM killer, a machine that went down): a half-written copy of
    the output, as large as it (a feature cache: hundreds of MB). Those of a writer that may still run, here or on
    another host sharing the directory, are left. Returns the files removed."""
    removed = []
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*@*.tmp"):
        owner = sibling.name[len(path.name) + 2:-len(".tmp")]
        if _left_by_ended_process(sibling, owner, directory=False):
            logger.warning("%s: removing what a killed write of %s left", sibling, path.name)
            with contextlib.suppress(OSError):
                sibling.unlink()
                removed.append(sibling)
    return removed


def written_in_place(path: str | Path) -> bool:
    """Whether ``path`` (a link followed) is neither a regular file nor a directory, nor missing: a device or a pipe
    (``/dev/null``, ``/dev/stdout`` into a pipe), which :func:`write_bytes` writes into rather than replaces."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def write_text(path: str | Path, text: str) -> None:
    """Write a text file whole or not at all (:func:`write_bytes`)."""
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file whole or not at all (a temporary sibling renamed over it).

    The file it replaces keeps its permissions. A symbolic link stays: the file it points to is replaced, beside
    itself (as :func:`staged_dir` replaces the directory a link points to). A device or a pipe (``/dev/null``,
    ``/dev/stdout``) is written into as it is, never replaced by a file of the same name.

    Raises:
        WriteError: it cannot be written (a full disk, a directory that takes no new files, a directory in its
            place); one line naming ``path``. The file there before is left as it was.
    """
    path = Path(path)
    if written_in_place(path):
        try:
            with open(path, "wb") as stream:
                stream.write(data)
        except OSError as err:
            raise _write_error(path, err) from err
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    tmp = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # on the disk before it takes the name
        with contextlib.suppress(FileNotFoundError):  # the file it replaces keeps its mode (0600 private, 0664 shared)
            mode = os.stat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(tmp, stat.S_IMODE(mode))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(path, err) from err
        raise

"""Files and directories that appear complete or not at all: a crash, Ctrl-C or a full disk while
writing leaves the previous version, never a half-written one. Every file nanorlhf writes goes
through these (run.Run's metrics.jsonl is the one exception: appended line by line, see run.py).

The recipe: write a temporary sibling PATH.tmp-PID, fsync it, rename it over PATH (atomic on POSIX),
fsync the directory so the rename itself survives a power cut. A rename replaces a symbolic link at
PATH, never the file it points to. A temporary left by a process that was killed is removed by the
next write of the same PATH (its PID no longer runs). A failed write is one UserError line.
fault_point is a test hook: it lets tests crash or fill the disk in the middle of any write.
"""

import errno
import glob
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from nanorlhf.errors import UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)  # reading the umask means setting it: put it straight back
FILE_MODE = 0o666 & ~_UMASK  # what a plain open() gives a new file (0644 under the usual umask)


# --- a test hook (tests/test_reliability_scripts.py): unset, it costs one lookup per write ---

_writes: dict[str, int] = {}  # NAME -> how many writes to a file named NAME this process began


def fault_point(path: Path, file=None) -> None:
    """A test hook: with NANORLHF_FAULT=NAME:N:ACTION in the environment, the N-th write in this
    process to a file or directory named NAME (config.json, metrics.jsonl, eval.json, state,
    model, rm, training.svg...) fails here, halfway: a file's temporary (or appended line) partly
    written and flushed (`file`), a directory's filled, nothing renamed yet. ACTION: kill
    (SIGKILL: a crash, a power cut), enospc (OSError ENOSPC: a full disk) or stop (SIGSTOP: a run
    still going, until SIGCONT)."""
    fault = os.environ.get("NANORLHF_FAULT")
    if not fault:
        return
    name, n, action = fault.rsplit(":", 2)
    if path.name != name:
        return
    _writes[name] = _writes.get(name, 0) + 1
    if _writes[name] != int(n):
        return
    if file is not None:
        file.flush()
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}[action])


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (signal 0 checks without sending)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a file, a symbolic link (never what it points to) or a directory tree, if present."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temps(path: str | Path) -> None:
    """Delete the PATH.tmp-PID siblings of `path` left by writers that were killed (PID dead)."""
    path = Path(path)
    for tmp in glob.glob(glob.escape(str(path)) + ".tmp-*"):
        pid = tmp.rsplit(".tmp-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            _remove(Path(tmp))


def fsync_dir(path: Path) -> None:
    """Make a rename inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # a few file systems cannot sync a directory: nothing more to do there
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file under `root` (and give it FILE_MODE: safetensors writes through a 0600
    temporary of its own), then every directory, before the tree is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            os.chmod(path, FILE_MODE)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def write_error(path: Path, e: OSError) -> UserError:
    reason = e.strerror or str(e) or type(e).__name__
    return UserError(f"{path}: could not write it ({reason}); its previous version, if any, "
                     "is kept")


@contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary sibling of `path` to fill; when the block finishes it replaces
    `path`. A crash inside the block leaves the previous `path` untouched; a crash during the swap
    leaves it as PATH.old (which run.state_dir also accepts); PATH.old goes once PATH is whole."""
    path = Path(path)
    tmp, old = path.with_name(f"{path.name}.tmp-{os.getpid()}"), path.with_name(path.name + ".old")
    remove_stale_temps(path)
    try:
        _remove(tmp)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
        fault_point(path)
        _sync_tree(tmp)
        if path.exists() or path.is_symlink():
            _remove(old)
            os.replace(path, old)  # PATH -> PATH.old: one complete version exists at every moment
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:  # a full disk, a read-only file system: one line, the old version kept
        raise write_error(path, e) from None
    finally:
        _remove(tmp)
    _remove(old)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to PATH.tmp-PID, fsync it, rename it over `path`, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    remove_stale_temps(path)
    try:
        _remove(tmp)
        # O_EXCL | O_NOFOLLOW: a file or link planted under the temporary's name is never written
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        with os.fdopen(fd, "wb") as f:
            half = len(data) // 2
            f.write(memoryview(data)[:half])
            fault_point(path, f)
            f.write(memoryview(data)[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"))

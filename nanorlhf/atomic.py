"""Files and directories that appear complete or not at all: a crash (or Ctrl-C) while writing leaves
the previous version, never a half-written one. Every writer in nanorlhf goes through these two."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(path: Path):
    """Yield an empty temporary sibling of `path` to fill; when the block finishes it replaces `path`.
    A crash inside the block leaves the previous `path` untouched; a crash during the swap leaves it as
    PATH.old, which `latest` also accepts."""
    path = Path(path)
    tmp, old = path.with_name(path.name + f".tmp-{os.getpid()}"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary sibling, then rename it over `path` (a rename is atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

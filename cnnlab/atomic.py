"""Every file cnnlab writes is written atomically: into a temporary file in the same folder, flushed
and fsynced, then renamed over the target. A crash or a full disk at any moment leaves either the
old file or the new one, never half of one, and a failure is one clear CnnlabError naming the file.

    with atomic_path("report.html") as tmp:   # any writer that takes a path
        fig.savefig(tmp)
    write_text("notes.txt", "hello\\n")       # the common case
"""
import os
from contextlib import contextmanager

from .errors import CnnlabError


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` (same extension, so writers that pick a format from
    the name still do); on success it replaces `path`, on any failure it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    base, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.tmp{ext}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise CnnlabError(f"could not write {path}: {e.strerror or e}. "
                          "Any previous version is intact; free some space or choose a writable folder.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_folder(folder)


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder):
    """Make the rename itself durable (best effort: some file systems refuse to fsync a folder)."""
    try:
        _fsync(folder)
    except OSError:
        pass

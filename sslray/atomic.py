"""One atomic write for every file sslray stores: a temp file beside the target, fsync, then ``os.replace``.

Readers (other trials, other drivers, ``sslray status`` while a study runs) see either no file, the old one or
the complete new one, never a half-written file. Standard library only, so the lowest layers (split files in
``sslray.data``) and the storage owner (``sslray.storage``, which re-exports it) share it without an import circle.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

TMP_PREFIX = ".tmp"  # temp files of atomic_write; the store ignores directory entries starting with it


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], what: str = "") -> Path:
    """Write ``path`` through ``write(binary file)`` atomically (temp file + fsync + rename); returns the path.

    The parent directory is created. On any failure the temp file is removed; a failing ``OSError`` (also one a
    library wrapped in another exception, as ``torch.save`` does) becomes ``OSError(errno, "cannot write [what]
    <path>: <reason>")``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes do
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, OSError) and cause.errno is not None:  # a full disk: say which file and why
            raise OSError(cause.errno, f"cannot write {what + ' ' if what else ''}{path}: {cause.strerror}") from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 string."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))

"""What a file or a model directory holds, as one hash: the key of what is reused across runs (a sweep's dense
teacher, tokenized training windows).

A path says where an input is, not what it is: a data file edited in place, or a model directory replaced by
another, keeps its path. :func:`content_digest` hashes the bytes. Within a process a file is hashed again only
when its size, modification or change time, or inode changed (every write sets the change time, which, unlike the
modification time, cannot be set back), so asking twice for a large model costs one read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["content_digest"]

_CHUNK = 1 << 20
_FILE_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}  # (path, size, mtime, ctime, inode) -> sha256


def _file_digest(path: Path) -> str:
    stat = path.stat()  # follows a link: a cache's snapshot directory links to its blobs
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    digest = _FILE_DIGESTS.get(key)
    if digest is None:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                sha.update(chunk)
        digest = _FILE_DIGESTS[key] = sha.hexdigest()
    return digest


def content_digest(path: str | Path) -> str:
    """The sha256 of a file's bytes, or of a directory's files (each one's path inside it and its bytes, in name
    order, subdirectories included).

    Raises:
        OSError: ``path`` or a file in it cannot be read.
    """
    path = Path(path).resolve()
    if not path.is_dir():
        return _file_digest(path)
    sha = hashlib.sha256()
    for parent, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file = Path(parent, name)
            sha.update(f"{file.relative_to(path).as_posix()}\0{_file_digest(file)}\n".encode())
    return sha.hexdigest()

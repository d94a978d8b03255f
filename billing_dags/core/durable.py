"""Durable publishing: every file the project publishes goes through here (DESIGN rule 10).

A file is written under a temporary name in its destination's folder, then :func:`publish`
fsyncs it, renames it over the destination and fsyncs the folder: a reader sees the old bytes
or the new ones, never a mix, and once it returns the new bytes and their name survive a crash.
:func:`staged` wraps the temporary name for a writer (removed again on an error, so nothing is
published), :func:`write_bytes` publishes bytes, and :class:`Batch` publishes many files at once
with one flush. Validate before publishing: inside ``staged``, raise to publish nothing.
:func:`exclusive_lock` serialises a read-modify-write across processes (an flock on a lock file).

A mirror (``add_mirror``: ``core.storage`` registers one when the warehouse lives in object storage)
is handed every file before it is renamed into place and every path before it is removed, so the
local folder is a working copy of the bucket: an upload that fails publishes nothing locally either.

This module imports nothing from the package, so every layer can use it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_path(path: Path | str) -> None:
    """fsync a file or a folder by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(dest: Path, suffix: str = "") -> Path:
    """A hidden temporary name next to ``dest`` (same folder, so the rename is atomic), unique per thread."""
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}{suffix}")


#: the mirrors of published files (``add_mirror``); none by default
_MIRRORS: list[Any] = []


def add_mirror(mirror: Any) -> None:
    """Hand every publish and removal from now on to ``mirror`` first: ``mirror.put([(tmp, dest), ...])``
    before the renames (raise to publish nothing) and ``mirror.remove([path, ...])`` before the unlinks;
    and every :func:`read_for_update` after it read (``mirror.read_at(path, stat or None)``).
    A mirror ignores paths it does not cover."""
    if mirror not in _MIRRORS:
        _MIRRORS.append(mirror)


def remove_mirror(mirror: Any) -> None:
    if mirror in _MIRRORS:
        _MIRRORS.remove(mirror)


def _mirror_put(pairs: list[tuple[Path, Path]]) -> None:
    for mirror in _MIRRORS:
        mirror.put([(Path(tmp), Path(dest)) for tmp, dest in pairs])


def _mirror_remove(paths: list[Path]) -> None:
    for mirror in _MIRRORS:
        mirror.remove([Path(p) for p in paths])


def read_for_update(path: Path | str) -> bytes | None:
    """The bytes of ``path`` (None when there is none) read for a read-modify-write: the mirrors learn which
    version was read (``read_at``), so that publishing ``path`` later is conditional on the stored object
    still being that version, whatever another process put in the folder meanwhile (``core.storage``)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        st, data = None, None
    for mirror in _MIRRORS:
        mirror.read_at(path, st)
    return data


def publish(tmp: Path | str, dest: Path | str) -> None:
    """fsync ``tmp``, rename it over ``dest``, fsync ``dest``'s folder."""
    dest = Path(dest)
    fsync_path(tmp)
    if _MIRRORS:
        _mirror_put([(Path(tmp), dest)])
    os.replace(tmp, dest)
    fsync_path(dest.parent)


@contextmanager
def staged(dest: Path | str) -> Iterator[Path]:
    """A temporary path to write ``dest``'s new bytes to; published when the block ends without an
    error, removed otherwise (``dest`` keeps its old bytes)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        yield tmp
        publish(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def remove(path: Path | str) -> bool:
    """Remove ``path`` durably (unlink, fsync its folder); False when it was not there."""
    path = Path(path)
    if _MIRRORS:
        _mirror_remove([path])
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_path(path.parent)
    return True


def remove_tree(folder: Path | str) -> int:
    """Remove ``folder`` and everything in it durably; returns the number of files removed."""
    import shutil

    folder = Path(folder)
    if not folder.exists():
        return 0
    files = [p for p in folder.rglob("*") if not p.is_dir()]
    if _MIRRORS:
        _mirror_remove(files)
    shutil.rmtree(folder)
    fsync_path(folder.parent)
    return len(files)


def write_bytes(dest: Path | str, data: bytes, *, mirrored: bool = True, sync: bool = True) -> None:
    """Publish ``data`` as ``dest`` (``mirrored``, ``sync``: as for ``write_chunks``)."""
    write_chunks(dest, (data,), mirrored=mirrored, sync=sync)


def write_chunks(dest: Path | str, chunks: Iterable[bytes], *, mirrored: bool = True, sync: bool = True) -> None:
    """Publish the concatenated ``chunks`` as ``dest``. ``mirrored=False, sync=False`` is for a local
    copy of bytes held durably elsewhere (the working copy of a bucket, ``core.storage``): renamed into
    place (a reader still sees old or new bytes) without fsync and without handing it to the mirrors."""
    if mirrored and sync:
        with staged(dest) as tmp, open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        return
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        if sync:
            fsync_path(tmp)
        if mirrored and _MIRRORS:
            _mirror_put([(tmp, dest)])
        os.replace(tmp, dest)
        if sync:
            fsync_path(dest.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _syncfs_function() -> Any:
    """libc ``syncfs`` where it reports write-back errors (Linux 5.8 on), else None."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return None
    try:
        major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
        if (major, minor) < (5, 8):
            return None
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError, TypeError, ValueError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS: Any = _syncfs_function()


class Batch:
    """:func:`publish` for many files: made durable together, then renamed.

    ``write`` puts each file under a temporary name in its folder; ``commit`` makes all of them
    durable, then renames each over its destination and fsyncs each folder once. A reader sees a
    file's old or new bytes, never a mix; once ``commit`` returns every file is durable. ``abort``
    removes the temporary files (the destinations keep their old bytes).

    Making them durable: a month of 10,000 invoices is 30,000 files. One fsync of the file and one
    of its folder per file, one after the other, cost about 30 s on a VM disk; fsyncs in parallel
    (a thread pool) about 7 s, as each fsync of a new file also writes its folder and flushes the
    disk cache. A batch of at least ``SYNCFS_MIN_FILES`` files on Linux (5.8 or later, where
    ``syncfs`` reports write-back errors) is made durable with one ``syncfs`` per file system
    instead: everything dirty on it is written and the disk cache is flushed once (it also writes
    other programs' dirty data on that file system: a batch takes longer while another program
    has much unwritten data there). An error reported by it (on any file of that file system since
    the batch began) fails the batch. Smaller batches, and other systems, fsync each file.
    """

    SYNCFS_MIN_FILES = 256

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []
        self.removals: list[Path] = []
        self._folders: set[Path] = set()
        self._devices: dict[int, int] = {}  # st_dev -> descriptor of a folder on it, opened before its first file

    def write(self, dest: Path, data: bytes) -> None:
        folder = dest.parent
        if folder not in self._folders:
            folder.mkdir(parents=True, exist_ok=True)
            if _SYNCFS is not None:
                dev = os.stat(folder).st_dev
                if dev not in self._devices:  # syncfs reports errors since this descriptor was opened
                    self._devices[dev] = os.open(folder, os.O_RDONLY | os.O_CLOEXEC)
            self._folders.add(folder)
        tmp = temp_path(dest, f"-{len(self.pending)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self.pending.append((tmp, dest))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def _sync_files(self) -> None:
        if _SYNCFS is not None and self._devices and len(self.pending) >= self.SYNCFS_MIN_FILES:
            for fd in self._devices.values():
                if _SYNCFS(fd) != 0:
                    import ctypes

                    err = ctypes.get_errno() or errno.EIO
                    raise OSError(err, f"syncfs: {os.strerror(err)}")
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(16, len(self.pending))) as pool:
            list(pool.map(fsync_path, [tmp for tmp, _ in self.pending]))

    def remove(self, path: Path | str) -> None:
        """Remove ``path`` once the batch's files are published (``commit``); when their publish fails, it stays."""
        self.removals.append(Path(path))

    def commit(self) -> None:
        removals, self.removals = self.removals, []
        if self.pending:
            self._publish()
        for path in removals:
            remove(path)

    def _publish(self) -> None:
        try:
            self._sync_files()
            if _MIRRORS:
                _mirror_put(self.pending)
        except BaseException:
            self.abort()
            raise
        folders: dict[Path, None] = {}
        for tmp, dest in self.pending:
            os.replace(tmp, dest)
            folders[dest.parent] = None
        self.pending = []
        for folder in folders:
            fsync_path(folder)

    def abort(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending = []
        self.removals = []

    def close(self) -> None:
        """Close the descriptors kept for ``syncfs`` (after ``commit`` or ``abort``)."""
        for fd in self._devices.values():
            os.close(fd)
        self._devices = {}


# --------------------------------------------------------------------------- canonical JSON


try:  # the same bytes as the json module below, about 10x faster (the indent=2 encoder is pure Python)
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the json module writes the same bytes
    _orjson = None
_ORJSON_OPTIONS = _orjson.OPT_INDENT_2 | _orjson.OPT_SORT_KEYS | _orjson.OPT_APPEND_NEWLINE if _orjson else 0


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, 2-space indent, UTF-8, final newline), as ``json.dumps(obj,
    sort_keys=True, indent=2, ensure_ascii=False) + "\\n"`` writes it. orjson writes the same bytes for
    what these files hold (strings, integers, booleans, null, lists, dicts with string keys: money
    is never a float here; a float would still be written deterministically, though 1e-07 reads
    1e-7); what it refuses (an integer beyond 64 bits, a non-string key) goes to the json module."""
    if _orjson is not None:
        try:
            return _orjson.dumps(obj, option=_ORJSON_OPTIONS)
        except TypeError:
            pass
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def sha256_file(path: Path | str) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def exclusive_lock(lock_file: Path | str) -> Iterator[None]:
    """Hold an exclusive flock on ``lock_file`` (created empty if missing, never written) for the
    block: one read-modify-write at a time across the processes of the machine.
    The lock is released when the block ends or the process dies."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

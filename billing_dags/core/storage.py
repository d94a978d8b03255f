"""Where the warehouse's objects live: the local folder (the default) or an S3 bucket (BILLING_DATA_URL).

The code of every stage reads and writes files under ``Paths.data_dir`` and publishes only through
``core.durable``. With ``BILLING_DATA_URL=s3://bucket/prefix`` that folder is a *working copy* of the
bucket (``WorkingCopy``):

- ``pull`` (when a step or a command resolves its paths: ``settings.resolve_paths``) lists the bucket
  and downloads the objects whose ETag differs from the copy's (removing those gone from the bucket),
  so a step starts from what every earlier step, on any machine, published;
- every publish uploads the new bytes as one object *before* the local rename (a PUT is atomic in S3:
  a reader sees the old object or the new one), so an upload that fails publishes nothing; every
  removal deletes the object first;
- the read-modify-write files (``GUARDED``: invoices and their number registry, the Stripe outbox,
  notification deliveries, flag acknowledgements) are put conditionally: ``If-Match`` the ETag of the
  version the writer read (``durable.read_for_update`` records it, whatever a pull by another process
  sharing the folder puts there afterwards), else of the version the copy holds, or ``If-None-Match: *``
  when there was none. A writer that read a version another machine has replaced since is refused with
  ``ConcurrentWriteError`` instead of overwriting: a finalized invoice is never overwritten, and an
  invoice number never given out twice, by a writer that did not read the latest.

``Store`` is the few operations this needs (list, read, exists, put, delete), implemented for S3
(``S3Store``, boto3: the ``s3`` extra). Landing segments
(``landing/``: a remote-write receiver's own durable buffer), lock files, temporary names and the
views-only ``warehouse.duckdb`` stay local to each machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from billing_dags.core import durable
from billing_dags.core.errors import InputError

#: key prefixes whose objects are read, changed and written back: conditional puts (see module doc)
GUARDED = ("invoices/", "outbox/", "notifications/", "flags/acks.json")
#: key prefixes and names that stay local to each machine
LOCAL_ONLY_PREFIXES = ("landing/",)
LOCAL_ONLY_NAMES = ("warehouse.duckdb",)
#: the working copy's own bookkeeping, inside it
SYNC_DIR = ".sync"
#: parallel transfers of a pull or a batch upload
TRANSFER_THREADS = 8
#: objects larger than this (and not conditional) are uploaded in parts of this size
MULTIPART_BYTES = 256 << 20


class StorageError(InputError):
    """The warehouse's storage cannot be used as configured; the message names the variable and the fix."""


class ConcurrentWriteError(StorageError):
    """A conditional put refused: another writer changed the object since this working copy read it."""


@dataclass(frozen=True)
class Entry:
    """An object: its ETag (quotes stripped) and size in bytes."""

    etag: str
    size: int


def is_mirrored(key: str) -> bool:
    """Whether the object ``key`` (a path relative to the warehouse root, ``/``-separated) lives in the store."""
    if key.startswith(LOCAL_ONLY_PREFIXES) or key in LOCAL_ONLY_NAMES:
        return False
    return not any(part.startswith(".") for part in key.split("/"))


def is_guarded(key: str) -> bool:
    return key.startswith(GUARDED)


# --------------------------------------------------------------------------- stores


class Store:
    """The operations the warehouse needs from where its objects live. Keys are ``/``-separated paths
    relative to the warehouse root."""

    url: str

    def list(self, prefix: str = "") -> dict[str, Entry]:
        raise NotImplementedError

    def read(self, key: str) -> bytes | None:
        """The object's bytes, None when there is none."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def put(self, key: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """Publish ``data`` as ``key`` atomically; returns the new ETag. ``if_match``: only over that ETag;
        ``if_none_match``: only when there is no object (else ``ConcurrentWriteError``)."""
        raise NotImplementedError

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove the object (nothing when there is none); ``if_match``: only that version (else
        ``ConcurrentWriteError``)."""
        raise NotImplementedError

    def put_file(self, key: str, path: Path, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """``put`` of a local file's bytes."""
        return self.put(key, Path(path).read_bytes(), if_match=if_match, if_none_match=if_none_match)

    def download(self, key: str, dest: Path) -> str | None:
        """Put the object's bytes in place as the local file ``dest`` (a copy: no fsync, no mirror); returns
        the ETag of what was written, None when there is no object."""
        data = self.read(key)
        if data is None:
            return None
        durable.write_bytes(dest, data, mirrored=False, sync=False)
        return _md5(data)


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
URL_FIX = "set BILLING_DATA_URL to s3://BUCKET/PREFIX (e.g. s3://billing/warehouse), or unset it to use the local folder BILLING_DATA_DIR"


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix ending in ``/`` or empty) of ``s3://bucket/prefix``; a StorageError naming the fix otherwise."""
    try:
        parts = urlsplit(url)
    except ValueError as e:  # e.g. an unclosed '[' in the host
        raise StorageError(f"BILLING_DATA_URL={url!r} is not a valid URL ({e}); {URL_FIX}") from None
    if parts.scheme != "s3" or "://" not in url:
        raise StorageError(f"BILLING_DATA_URL={url!r} is not an s3:// URL; {URL_FIX}")
    if not _BUCKET_RE.match(parts.netloc or ""):
        raise StorageError(f"BILLING_DATA_URL={url!r} names no valid bucket ({parts.netloc!r}: 3-63 lowercase letters, digits, dots, hyphens); {URL_FIX}")
    if parts.query or parts.fragment:
        raise StorageError(f"BILLING_DATA_URL={url!r} has a query or fragment; {URL_FIX}")
    prefix = parts.path.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise StorageError(f"BILLING_DATA_URL={url!r} has an empty, '.' or '..' path segment; {URL_FIX}")
    return parts.netloc, f"{prefix}/" if prefix else ""


class S3Store(Store):
    """A bucket (and prefix) on S3 or an S3-compatible server, through boto3. Endpoint, credentials and
    region come from the standard environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_REGION, or any other source boto3 reads: profiles, instance roles)."""

    def __init__(self, url: str, environ: dict | None = None):
        env = os.environ if environ is None else environ
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise StorageError(f"BILLING_DATA_URL={url!r} needs boto3: pip install -e '.[s3]' (or unset BILLING_DATA_URL)") from None
        self.endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        if self.endpoint:
            try:
                ep = urlsplit(self.endpoint)
                bad = ep.scheme not in ("http", "https") or not ep.hostname
            except ValueError:  # e.g. an unclosed '[' in the host
                bad = True
            if bad:
                raise StorageError(
                    f"AWS_ENDPOINT_URL={self.endpoint!r} is not an http(s) URL; set it to the S3 server's URL "
                    "(e.g. http://127.0.0.1:9000), or unset it for AWS itself"
                )
        session = boto3.session.Session(region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1")
        if session.get_credentials() is None:
            raise StorageError(
                f"BILLING_DATA_URL={url!r} but no S3 credentials were found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run where an instance role provides them)"
            )
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=TRANSFER_THREADS * 2,
            s3={"addressing_style": "path"} if self.endpoint else None,
        )
        self.client = session.client("s3", endpoint_url=self.endpoint, config=config)

    def _name(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _error(self, e: Exception, key: str = "") -> StorageError:
        """A StorageError naming the variable to fix for a failed request."""
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        where = self.endpoint or "AWS S3"
        if isinstance(e, NoCredentialsError):
            return StorageError("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return StorageError(f"the bucket {self.bucket!r} of BILLING_DATA_URL does not exist at {where}; create it, or fix BILLING_DATA_URL")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403") or status == 403:
                return StorageError(f"{where} refused the credentials for {self._name()}{key} ({code}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return ConcurrentWriteError(
                    f"{self._name()}{key} was changed by another writer since this working copy read it, and is not "
                    "overwritten; rerun the step (it starts from the bucket's current objects)"
                )
            return StorageError(f"{where} answered {code or status} for {self._name()}{key}: {e}")
        if isinstance(e, EndpointConnectionError) or "Could not connect" in str(e):
            return StorageError(
                f"cannot reach the S3 endpoint {where} (AWS_ENDPOINT_URL) for BILLING_DATA_URL={self.url}: {e}; start the server, or fix AWS_ENDPOINT_URL"
            )
        return StorageError(f"S3 request to {where} for {self._name()}{key} failed: {e}; check AWS_ENDPOINT_URL and the network")

    def _call(self, key: str, fn, *args, missing: bool = False, **kwargs):
        """``fn(*args, **kwargs)`` with a failed request as a StorageError; with ``missing``, None for no such object."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if missing and (status == 404 or e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")):
                return None
            raise self._error(e, key) from None
        except BotoCoreError as e:
            raise self._error(e, key) from None

    def list(self, prefix: str = "") -> dict[str, Entry]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        n = len(self.prefix)
        return self._call(prefix, lambda: {o["Key"][n:]: Entry(o["ETag"].strip('"'), o["Size"]) for page in pages for o in page.get("Contents", ())})

    def _get(self, key: str):
        return self._call(key, self.client.get_object, missing=True, Bucket=self.bucket, Key=self.prefix + key)

    def read(self, key: str) -> bytes | None:
        obj = self._get(key)
        return None if obj is None else self._call(key, obj["Body"].read)

    def exists(self, key: str) -> bool:
        return self._call(key, self.client.head_object, missing=True, Bucket=self.bucket, Key=self.prefix + key) is not None

    def put(self, key: str, data, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        kwargs = {"Bucket": self.bucket, "Key": self.prefix + key, "Body": data}
        if if_match is not None:
            kwargs["IfMatch"] = f'"{if_match}"'
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        return self._call(key, self.client.put_object, **kwargs)["ETag"].strip('"')

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        kwargs = {"Bucket": self.bucket, "Key": self.prefix + key}
        if if_match is not None:
            kwargs["IfMatch"] = f'"{if_match}"'  # a conditional delete (S3 general purpose buckets, since 2025)
        self._call(key, self.client.delete_object, missing=True, **kwargs)

    def put_file(self, key: str, path: Path, *, if_match: str | None = None, if_none_match: bool = False) -> str:
        """One PUT streamed from the file; beyond ``MULTIPART_BYTES`` (unconditional puts only) a multipart
        upload, which S3 makes visible only when it completes: atomic as well. The ETag returned is the one
        S3 answered for this upload (not read back afterwards, when another writer may have replaced it)."""
        size = Path(path).stat().st_size
        if size <= MULTIPART_BYTES or if_match is not None or if_none_match:
            with open(path, "rb") as f:
                return self.put(key, f, if_match=if_match, if_none_match=if_none_match)
        target = {"Bucket": self.bucket, "Key": self.prefix + key}
        upload_id = self._call(key, self.client.create_multipart_upload, **target)["UploadId"]

        def part(number: int) -> dict:
            with open(path, "rb") as f:
                f.seek((number - 1) * MULTIPART_BYTES)
                body = f.read(MULTIPART_BYTES)
            answer = self._call(key, self.client.upload_part, **target, UploadId=upload_id, PartNumber=number, Body=body)
            return {"PartNumber": number, "ETag": answer["ETag"]}

        try:
            with ThreadPoolExecutor(4) as pool:  # 4 parts in flight: at most 1 GB of a file in memory
                parts = list(pool.map(part, range(1, -(-size // MULTIPART_BYTES) + 1)))
            answer = self._call(key, self.client.complete_multipart_upload, **target, UploadId=upload_id, MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(StorageError):  # the parts are dropped; the upload's own error is the one to report
                self._call(key, self.client.abort_multipart_upload, missing=True, **target, UploadId=upload_id)
            raise
        return answer["ETag"].strip('"')

    def download(self, key: str, dest: Path) -> str | None:
        obj = self._get(key)
        if obj is None:
            return None
        self._call(key, durable.write_chunks, dest, obj["Body"].iter_chunks(1 << 20), mirrored=False, sync=False)
        return obj["ETag"].strip('"')


def open_store(url: str, environ: dict | None = None) -> Store:
    """The store of BILLING_DATA_URL (only s3:// URLs)."""
    return S3Store(url, environ)


# --------------------------------------------------------------------------- the working copy


class WorkingCopy:
    """A local folder kept in step with a store (see the module doc); registered as a ``durable`` mirror.

    ``.sync/index.json`` records, per object, the ETag the local file holds and the file's size and
    mtime: a file whose record matches the listing is not downloaded again. One pull or upload at a
    time per folder (an flock on ``.sync/lock``): processes of one machine may share a working copy.
    """

    def __init__(self, store: Store, root: Path):
        self.store = store
        self.root = Path(root)
        self._sync = self.root / SYNC_DIR
        self._index_path = self._sync / "index.json"
        self._lock = self._sync / "lock"
        #: guarded key -> the ETag of the version this process read for an update (None: none, or unknown)
        self._read_versions: dict[str, str | None] = {}
        self._read_lock = threading.Lock()
        self._index_cache: tuple[tuple, dict] = ((), {})

    # ---- bookkeeping

    def _load(self) -> dict[str, list]:
        try:
            return json.loads(self._index_path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError:  # a damaged index only costs downloads
            return {}

    def _load_cached(self) -> dict[str, list]:
        """The index as last saved (by any process), parsed again only when its file changed."""
        try:
            st = self._index_path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._index_cache[0] != stamp:
            self._index_cache = (stamp, self._load())
        return self._index_cache[1]

    def _save(self, index: dict[str, list]) -> None:
        durable.write_bytes(self._index_path, json.dumps(index, sort_keys=True).encode(), mirrored=False, sync=False)

    def key_of(self, path: Path) -> str | None:
        """The object key of a local path, None for a path outside the copy or one that stays local."""
        try:
            key = Path(os.path.abspath(path)).relative_to(self.root).as_posix()
        except ValueError:
            return None
        return key if key != "." and is_mirrored(key) else None

    @staticmethod
    def _current(index: dict, key: str, path: Path) -> str | None:
        """The ETag the local file holds per the index, None when it is not known to hold one."""
        rec = index.get(key)
        if rec is None:
            return None
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return rec[0] if (st.st_size, st.st_mtime_ns) == (rec[1], rec[2]) else None

    # ---- the durable mirror

    def read_at(self, path: Path, st: os.stat_result | None) -> None:
        """Record the version of a guarded object a read for an update saw (``st``: the stat of the file it
        read, None when there was none): the local file's version per the index, or None when the index
        does not vouch for those bytes (a pull replacing them right now), which makes the later put refused
        rather than unconditional."""
        key = self.key_of(path)
        if key is None or not is_guarded(key):
            return
        etag = None
        if st is not None:
            rec = self._load_cached().get(key)
            if rec is not None and (st.st_size, st.st_mtime_ns) == (rec[1], rec[2]):
                etag = rec[0]
        with self._read_lock:
            self._read_versions[key] = etag

    def _condition(self, index: dict, key: str) -> tuple[bool, str | None]:
        """(read for an update, the ETag a guarded put is conditional on: None for If-None-Match)."""
        with self._read_lock:
            if key in self._read_versions:
                return True, self._read_versions[key]
        return False, self._current(index, key, self.root / key)

    def put(self, pairs: list[tuple[Path, Path]]) -> None:
        todo = [(tmp, key) for tmp, dest in pairs if (key := self.key_of(dest)) is not None]
        if not todo:
            return
        with durable.exclusive_lock(self._lock):
            index = self._load()

            def upload(item):
                tmp, key = item
                if is_guarded(key):
                    was_read, seen = self._condition(index, key)
                    etag = self.store.put_file(key, tmp, if_match=seen, if_none_match=seen is None)
                    if was_read:  # the writer now holds the version it wrote: its next put is conditional on it
                        with self._read_lock:
                            self._read_versions[key] = etag
                else:
                    etag = self.store.put_file(key, tmp)
                st = Path(tmp).stat()  # the rename keeps size and mtime
                return key, [etag, st.st_size, st.st_mtime_ns]

            # the files of one document (one name, several formats: an invoice's JSON, CSV, HTML and PDF) go
            # up together, the ones written from a version read for an update first: when one of those is
            # refused, the rest of its document is not put (no page beside a JSON it does not render)
            with self._read_lock:
                noted = {key for _, key in todo if key in self._read_versions}
            documents: dict[str, list] = {}
            for item in todo:
                documents.setdefault(item[1].rsplit(".", 1)[0], []).append(item)

            def upload_document(items: list) -> tuple[list, Exception | None]:
                done = []
                for item in sorted(items, key=lambda i: i[1] not in noted):
                    try:
                        done.append(upload(item))
                    except ConcurrentWriteError as e:
                        return done, e
                return done, None

            refused = None
            try:
                for done, error in _map(upload_document, documents.values()):
                    index.update(done)
                    refused = refused or error
            finally:
                self._save(index)
            if refused is not None:
                raise refused

    def remove(self, paths: list[Path]) -> None:
        keys = [key for p in paths if (key := self.key_of(p)) is not None]
        if not keys:
            return
        with durable.exclusive_lock(self._lock):
            index = self._load()
            try:
                for key in keys:
                    if is_guarded(key):
                        # only the version this copy read or holds; one it never saw is another writer's
                        _, seen = self._condition(index, key)
                        if seen is not None:
                            self.store.delete(key, if_match=seen)
                        elif self.store.exists(key):
                            raise ConcurrentWriteError(
                                f"{self.store.url.rstrip('/')}/{key} was written by another writer since this working copy "
                                "read it, and is not removed; rerun the step (it starts from the bucket's current objects)"
                            )
                    else:
                        self.store.delete(key)
                    index.pop(key, None)
                    with self._read_lock:
                        self._read_versions.pop(key, None)
            finally:
                self._save(index)

    # ---- pull

    def pull(self) -> dict:
        """Bring the copy in step with the store; returns figures (objects, downloaded, removed, bytes)."""
        with durable.exclusive_lock(self._lock):
            remote = {k: e for k, e in self.store.list().items() if is_mirrored(k)}
            index = self._load()
            stale = [k for k, e in remote.items() if self._current(index, k, self.root / k) != e.etag]

            def download(key):
                dest = self.root / key
                etag = self.store.download(key, dest)  # a copy: no fsync (the bucket holds the durable one)
                if etag is None:  # removed since the listing
                    return key, None
                st = dest.stat()
                return key, [etag, st.st_size, st.st_mtime_ns]

            downloaded = nbytes = 0
            try:
                for key, rec in _map(download, stale):
                    if rec is None:
                        index.pop(key, None)
                        (self.root / key).unlink(missing_ok=True)
                    else:
                        index[key] = rec
                        downloaded += 1
                        nbytes += rec[1]
                removed = 0
                for key in [k for k in index if k not in remote]:
                    (self.root / key).unlink(missing_ok=True)
                    del index[key]
                    removed += 1
            finally:
                self._save(index)
        return {"objects": len(remote), "downloaded": downloaded, "removed": removed, "bytes": nbytes}


def _map(fn, items: Iterable):
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(TRANSFER_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


# --------------------------------------------------------------------------- one working copy per process

_ATTACHED: dict[tuple[int, str, Path], WorkingCopy] = {}
_ATTACH_LOCK = threading.Lock()


def default_working_copy(url: str) -> Path:
    """Where the working copy of ``url`` goes when BILLING_DATA_DIR is not set: under the user's cache folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "billing-dags" / hashlib.sha256(url.encode()).hexdigest()[:16]


def attach(url: str, root: Path) -> WorkingCopy:
    """The working copy of ``url`` in ``root`` for this process, registered with ``durable`` (once)."""
    key = (os.getpid(), url, Path(root))
    with _ATTACH_LOCK:
        wc = _ATTACHED.get(key)
        if wc is None:
            wc = _ATTACHED[key] = WorkingCopy(open_store(url), Path(root))
            for (pid, _, _), other in list(_ATTACHED.items()):
                if pid != os.getpid():  # a forked child: its parent's mirrors are not its own
                    durable.remove_mirror(other)
            durable.add_mirror(wc)
        return wc


def detach_all() -> None:
    """Unregister every working copy of this process (tests)."""
    with _ATTACH_LOCK:
        for wc in _ATTACHED.values():
            durable.remove_mirror(wc)
        _ATTACHED.clear()

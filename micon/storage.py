"""Where data lives: local paths or object storage (s3://, any fsspec URL) behind one small layer.

`path(x)` gives a pathlib.Path for a local path and an `ObjectPath` (the same few methods: `/`, name,
is_file, read_bytes, stat, glob, ...) for a URL. Reads go through fsspec with bounded retries and backoff on
transient errors (throttling, dropped connections, timeouts), each retry counted; a missing object raises
FileNotFoundError naming its key. Every request has a deadline (`$MICON_STORAGE_TIMEOUT_S`, default 60 s: to
connect, for each read, and for an upload plus a second per MB), so a server that stops answering (frozen,
partitioned) costs retries x deadline and ends in an error naming the endpoint, never a hang. Writes of whole objects only (micon.atomic stages them locally and puts
them complete), so an object store never holds half an object. Never logs or stores credentials.
"""
from __future__ import annotations

import errno
import fnmatch
import io
import logging
import os
import posixpath
import re
import time
from collections import Counter
from pathlib import Path
from typing import Callable

log = logging.getLogger("micon.storage")

PUBLIC_BUCKETS = ("cellpainting-gallery",)      # anonymous reads (the JUMP images)
ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
RETRIES_ENV, BACKOFF_ENV, ANON_ENV = "MICON_STORAGE_RETRIES", "MICON_STORAGE_BACKOFF_S", "MICON_STORAGE_ANON"
TIMEOUT_ENV = "MICON_STORAGE_TIMEOUT_S"     # seconds a request may wait on the server (see the module's docstring)
UPLOAD_MB_PER_S = 1.0                       # the slowest upload rate an upload's deadline allows for
# what every process counts: retries of transient errors, by kind (the data stream reports its own share)
RETRIES: Counter = Counter()


def check_settings(endpoint: str = "", anon: str = "auto", retries: int = 5, backoff_s: float = 0.5,
                   timeout_s: float = 60.0) -> None:
    """ValueError naming the key when a storage setting cannot work (a job's config words it as its own)."""
    if anon not in ("auto", "true", "false"):
        raise ValueError(f"storage.anon={anon!r}: choose auto, true or false")
    if endpoint:
        check_url(endpoint, "storage.endpoint")


def configure(endpoint: str = "", anon: str = "auto", retries: int = 5, backoff_s: float = 0.5,
              timeout_s: float = 60.0) -> None:
    """Make these settings this process's and its children's (Ray workers, loader workers inherit the
    environment): the endpoint through the standard AWS variable, the retry policy through ours. Values
    left at their defaults leave the environment's as they are."""
    if endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    for env, value, default in ((RETRIES_ENV, retries, 5), (BACKOFF_ENV, backoff_s, 0.5), (ANON_ENV, anon, "auto"),
                                (TIMEOUT_ENV, timeout_s, 60.0)):
        if value != default:
            os.environ[env] = str(value)


def is_url(x) -> bool:
    """True for an fsspec URL other than a local file (`s3://b/k`, `gs://...`, `memory://...`)."""
    s = str(x) if isinstance(x, ObjectPath) else x
    return isinstance(s, str) and bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s)) and not s.startswith("file://")


_CREDENTIALS_IN_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*@|[?&](X-Amz-(Signature|Credential|Security-Token)"
                                 r"|AWSAccessKeyId|Signature|sig|token)=", re.I)


def check_url(url: str, what: str = "a path") -> str:
    """Refuse a URL that carries credentials (user:secret@host, a presigned query): they would end up in
    configs, manifests, logs and wandb. Credentials belong to the standard AWS chain."""
    if _CREDENTIALS_IN_URL.search(url):
        raise ValueError(f"{what} {redact(url)} carries credentials in the URL; give them through the standard AWS "
                         f"chain instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)")
    return url


def redact(text: str) -> str:
    """`text` with any user:password@ in URLs and any signature/token query values replaced by ***."""
    text = re.sub(r"(://)[^/@\s]*@", r"\1***@", str(text))
    return re.sub(r"((?:X-Amz-(?:Signature|Credential|Security-Token)|AWSAccessKeyId|Signature|sig|token)=)[^&\s]+",
                  r"\1***", text, flags=re.I)


def path(x: "str | os.PathLike | ObjectPath") -> "Path | ObjectPath":
    """A Path for a local path (or file:// URL), an ObjectPath for any other fsspec URL."""
    if isinstance(x, (Path, ObjectPath)):
        return x
    s = os.fspath(x)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    return ObjectPath(check_url(s)) if is_url(s) else Path(s)


# ----------------------------------------------------------------------------------------- file systems

def _endpoint() -> str | None:
    return next((os.environ[k] for k in ENDPOINT_ENVS if os.environ.get(k)), None)


_filesystems: dict = {}


def timeout_s() -> float:
    """The deadline of one request in seconds ($MICON_STORAGE_TIMEOUT_S, default 60)."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, 60))
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: give seconds, e.g. 60") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: must be more than 0 seconds")
    return value


def upload_deadline(nbytes: int) -> float:
    """Seconds one upload of `nbytes` may take before it counts as stalled: the request deadline, plus the
    time the bytes take at UPLOAD_MB_PER_S."""
    return timeout_s() + nbytes / (UPLOAD_MB_PER_S * 1e6)


def endpoint_name(url: str = "s3://") -> str:
    """Where requests for `url` go, for messages: the configured endpoint, else the provider's default."""
    protocol = url.partition("://")[0]
    if protocol in ("s3", "s3a"):
        return redact(_endpoint() or "AWS S3 (the default endpoint)")
    return f"{protocol}://"


def _options(url: str) -> dict:
    """fsspec options for `url`: for S3 the anonymous switch, the endpoint and timeouts."""
    protocol, _, rest = url.partition("://")
    if protocol not in ("s3", "s3a"):
        return {}
    anon = os.environ.get(ANON_ENV, "auto")
    options = dict(anon=(rest.split("/", 1)[0] in PUBLIC_BUCKETS) if anon == "auto" else anon == "true",
                   config_kwargs={"connect_timeout": min(10.0, timeout_s()), "read_timeout": timeout_s()},
                   use_listings_cache=False)     # other processes (Ray tasks) write: never trust a cached listing
    if _endpoint():
        options["endpoint_url"] = _endpoint()
    return options


def filesystem(url: str):
    """(fsspec file system, path inside it) for `url`. S3: anonymous for the public bucket (unless
    $MICON_STORAGE_ANON says otherwise), else the standard AWS credential chain; the endpoint from
    $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL (or storage.endpoint=); retries are ours (`call`), so the
    client's own are off and every retry is counted."""
    import fsspec

    protocol = url.partition("://")[0]
    options = _options(url)
    if "config_kwargs" in options:
        options["config_kwargs"]["retries"] = {"total_max_attempts": 1}
    key = (os.getpid(), protocol, repr(sorted(options.items())))
    if key not in _filesystems:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        if hasattr(fs, "retries"):
            fs.retries = 1          # s3fs's own retry loop: off, `call` retries (and counts)
        _bound_uploads(fs)
        _filesystems[key] = fs
    fs = _filesystems[key]
    return fs, fs._strip_protocol(url)


def _bound_uploads(fs) -> None:
    """Give this file system's uploads (put_file, pipe_file) a deadline on the whole call (fsspec's `timeout`:
    FSTimeoutError, retried by `call`): the client's read timeout does not cover a PUT whose body stalls on
    its way to a server that stopped reading (a frozen server held one for as long as it stayed frozen)."""
    from fsspec.asyn import AsyncFileSystem

    if not isinstance(fs, AsyncFileSystem):
        return
    put_file, pipe_file = fs.put_file, fs.pipe_file

    def bounded_put_file(lpath, rpath, *args, **kwargs):
        kwargs.setdefault("timeout", upload_deadline(os.path.getsize(lpath)))
        return put_file(lpath, rpath, *args, **kwargs)

    def bounded_pipe_file(path, value, *args, **kwargs):
        kwargs.setdefault("timeout", upload_deadline(len(value)))
        return pipe_file(path, value, *args, **kwargs)

    fs.put_file, fs.pipe_file = bounded_put_file, bounded_pipe_file


def transient(e: BaseException) -> bool:
    """Worth another attempt: throttling (503 SlowDown), a dropped or reset connection, a timeout, a
    server error. Not: a missing object, a refused permission, a bad request."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    if isinstance(e, OSError) and e.errno in (errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET,
                                              errno.ECONNABORTED, errno.EPIPE, errno.EIO):
        return True
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"IncompleteRead", "ClientPayloadError", "ClientConnectionError", "ServerDisconnectedError",
                "HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                "ConnectTimeoutError", "ResponseParserError", "FSTimeoutError", "ProtocolError", "ClientOSError"}:
        return True
    text = str(e)
    return any(s in text for s in ("SlowDown", "reduce your request rate", "Throttl", "ServiceUnavailable",
                                   "InternalError", "503", "500 ", "RequestTimeout"))


class StorageTimeout(TimeoutError):
    """The storage endpoint did not answer within the deadline, every attempt: the message names it."""


def _unanswered(e: BaseException) -> bool:
    """A timeout or a refused connection: the server did not answer at all (not a reply with an error)."""
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (TimeoutError, ConnectionRefusedError)) or bool(names & {
        "FSTimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError",
        "ServerTimeoutError", "ConnectionTimeoutError", "SocketTimeoutError"})


def _policy() -> tuple[int, float]:
    return int(os.environ.get(RETRIES_ENV, 5)), float(os.environ.get(BACKOFF_ENV, 0.5))


def call(fn: Callable, what: str, on_retry: Callable[[BaseException], None] | None = None):
    """`fn()` with bounded retries and exponential backoff on transient errors; each retry is counted in
    RETRIES and passed to `on_retry`. A missing object is FileNotFoundError naming `what`; a transient error
    that outlasts the retries is OSError naming `what` and the attempts."""
    import random

    attempts, backoff = _policy()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, f"no such object {redact(what)}", redact(what)) from None
        except Exception as e:
            if not transient(e):
                raise
            if attempt == attempts:
                if _unanswered(e):
                    raise StorageTimeout(f"{redact(what)}: the storage endpoint {endpoint_name(what)} did not answer "
                                         f"({type(e).__name__}; {attempts} attempt{'s' if attempts != 1 else ''} of "
                                         f"{timeout_s():g} s each, uploads 1 s more per MB): is the server up and "
                                         f"reachable? (A slow link may need a longer deadline: {TIMEOUT_ENV}=SECONDS)"
                                         ) from None
                raise OSError(errno.EIO, f"{redact(what)}: gave up after {attempts} attempts, last error "
                                         f"{type(e).__name__}: {redact(str(e))[:200]}") from None
            RETRIES[type(e).__name__] += 1
            if on_retry is not None:
                on_retry(e)
            wait = min(backoff * 2 ** (attempt - 1), 20.0) * (0.5 + random.random())
            log.warning("%s: transient %s (attempt %d of %d), retrying in %.1f s", redact(what), type(e).__name__,
                        attempt, attempts, wait)
            time.sleep(wait)


# ----------------------------------------------------------------------------------------- object paths

class _Stat:
    def __init__(self, size: int):
        self.st_size = size


class ObjectPath:
    """A path in object storage with the pathlib methods the jobs use. Directories are key prefixes:
    `mkdir` does nothing, `is_dir` is true when any key lies under the prefix."""

    def __init__(self, url: str):
        protocol, _, rest = url.partition("://")
        self.protocol = protocol
        self.key = posixpath.normpath(rest).lstrip("/") if rest else ""

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, part) -> "ObjectPath":
        return ObjectPath(f"{self.protocol}://{posixpath.join(self.key, str(part))}")

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def parent(self) -> "ObjectPath":
        return ObjectPath(f"{self.protocol}://{posixpath.dirname(self.key)}")

    def with_name(self, name: str) -> "ObjectPath":
        return self.parent / name

    def _fs(self):
        return filesystem(str(self))

    def exists(self) -> bool:
        fs, p = self._fs()
        return call(lambda: fs.exists(p), str(self))

    def is_file(self) -> bool:
        fs, p = self._fs()
        return call(lambda: fs.isfile(p), str(self))

    def is_dir(self) -> bool:
        fs, p = self._fs()
        return call(lambda: fs.isdir(p), str(self))

    def stat(self) -> _Stat:
        fs, p = self._fs()
        return _Stat(int(call(lambda: fs.info(p), str(self))["size"]))

    def read_bytes(self) -> bytes:
        return read_bytes(self)

    def read_text(self) -> str:
        return read_bytes(self).decode()

    def glob(self, pattern: str) -> list["ObjectPath"]:
        fs, p = self._fs()
        try:
            names = call(lambda: fs.ls(p, detail=False, refresh=True), str(self))
        except FileNotFoundError:
            return []
        return sorted(ObjectPath(f"{self.protocol}://{n}") for n in names
                      if fnmatch.fnmatchcase(posixpath.basename(n), pattern))

    def iterdir(self) -> list["ObjectPath"]:
        return self.glob("*")

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no directories: nothing to make."""

    def unlink(self, missing_ok: bool = False) -> None:
        fs, p = self._fs()
        try:
            call(lambda: fs.rm_file(p), str(self))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def __lt__(self, other) -> bool:
        return str(self) < str(other)


# ----------------------------------------------------------------------------------------- reading and writing

def read_bytes(p, on_retry=None) -> bytes:
    """The whole object (or local file) `p`; retried on transient errors, FileNotFoundError naming it."""
    p = path(p)
    if isinstance(p, Path):
        return p.read_bytes()
    fs, key = filesystem(str(p))
    return call(lambda: fs.cat_file(key), str(p), on_retry)


def read_many(paths: list, on_retry=None) -> dict[str, "bytes | BaseException"]:
    """Several objects at once (one request each, concurrently on object storage): {str(path): bytes, or
    the exception that stopped it (FileNotFoundError for a missing one)}. Transient errors are retried."""
    out: dict[str, bytes | BaseException] = {}
    remote = [p for p in map(path, paths) if isinstance(p, ObjectPath)]
    for p in map(path, paths):
        if isinstance(p, Path):
            try:
                out[str(p)] = p.read_bytes()
            except OSError as e:
                out[str(p)] = e
    if not remote:
        return out
    fs, _ = filesystem(str(remote[0]))
    keys = {filesystem(str(p))[1]: str(p) for p in remote}
    todo = list(keys)
    attempts, _ = _policy()
    for attempt in range(attempts):
        got = fs.cat(todo, on_error="return") if todo else {}
        got = got if isinstance(got, dict) else {todo[0]: got}
        retry = []
        for k, v in got.items():
            if isinstance(v, BaseException) and transient(v) and attempt + 1 < attempts:
                retry.append(k)
                continue
            if isinstance(v, FileNotFoundError) or (isinstance(v, BaseException) and "NoSuchKey" in str(v)):
                v = FileNotFoundError(errno.ENOENT, f"no such object {keys[k]}", keys[k])
            out[keys[k]] = v
        if not retry:
            break
        for k in retry:       # one at a time, with backoff and counted
            try:
                out[keys[k]] = call(lambda k=k: fs.cat_file(k), keys[k], on_retry)
            except Exception as e:
                out[keys[k]] = e
        todo = []
    return out


class RetryingReader(io.RawIOBase):
    """A sequential reader of one object that survives dropped connections: a transient error re-opens the
    object at the current offset (a range request) after a backoff, counted, up to the retry limit."""

    def __init__(self, url: str, on_retry=None, block_size: int = 8 << 20):
        super().__init__()
        self.url, self.on_retry, self.block_size = url, on_retry, block_size
        self.fs, self.key = filesystem(url)
        self.pos, self._fh = 0, None
        self.size = call(lambda: self.fs.size(self.key), url, on_retry)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size + offset}[whence]
        if self._fh is not None:
            self._fh.seek(self.pos)
        return self.pos

    def _read_once(self, n: int) -> bytes:
        try:
            if self._fh is None:
                self._fh = self.fs.open(self.key, "rb", block_size=self.block_size, cache_type="readahead")
                self._fh.seek(self.pos)
            return self._fh.read(n)
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except Exception:
                pass
            self._fh = None

    def readinto(self, buffer) -> int:
        n = min(len(buffer), max(self.size - self.pos, 0))
        if n == 0:
            return 0
        data = call(lambda: self._read_once(n), f"{self.url} at byte {self.pos}", self.on_retry)
        if len(data) < n:         # a short read mid-object is a dropped connection, not the end
            self._drop()
            if not data:
                raise OSError(errno.EIO, f"{self.url}: object ended at byte {self.pos} of {self.size}")
        memoryview(buffer)[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        self._drop()
        super().close()


def open_read(p, on_retry=None, buffer: int = 1 << 20):
    """A buffered binary reader of a local file (the default buffer, as `open`) or of an object (a
    RetryingReader behind a `buffer`-byte buffer; its file reads ahead in 8 MB blocks)."""
    p = path(p)
    if isinstance(p, Path):
        return open(p, "rb")
    return io.BufferedReader(RetryingReader(str(p), on_retry), buffer)


def put_file(local: str | Path, p: "ObjectPath") -> None:
    """Upload a finished local file as one whole object: a single PUT, or a multipart upload that is
    completed only when every part arrived (else nothing appears under the key)."""
    fs, key = filesystem(str(p))
    call(lambda: fs.put_file(str(local), key), str(p))


def put_tree(local_dir: str | Path, p: "ObjectPath", last: tuple[str, ...] = ()) -> None:
    """Upload every file under a local directory to the prefix `p` (each object whole); the files named in
    `last` (paths relative to `local_dir`: a job's status record) after all the others."""
    local_dir = Path(local_dir)
    files = sorted((f for f in local_dir.rglob("*") if f.is_file()),
                   key=lambda f: (f.relative_to(local_dir).as_posix() in last, f))
    for f in files:
        put_file(f, p / f.relative_to(local_dir).as_posix())


def remove_tree(p) -> None:
    """Remove a local directory or every object under a prefix; nothing there is fine."""
    import shutil

    p = path(p)
    if isinstance(p, Path):
        shutil.rmtree(p, ignore_errors=True)
        return
    fs, key = filesystem(str(p))
    try:
        if call(lambda: fs.exists(key), str(p)):
            call(lambda: fs.rm(key, recursive=True), str(p))
    except FileNotFoundError:
        pass


def checksum(p, like: str | None = None) -> str:
    """micon.integrity's checksum of a local file or an object, read as a stream."""
    from micon import integrity

    p = path(p)
    if isinstance(p, Path):
        return integrity.of_file(p, like)
    h = integrity.Checksum(integrity._algorithm(like) if like else integrity.ALGORITHM)
    with open_read(p) as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest() if like is None or ":" in like else h.hexdigest().split(":", 1)[1]


def zarr_store(p, read_only: bool = False):
    """What zarr opens for `p`: the local path as a string, or an fsspec store over the object prefix
    (whose reads and writes retry through s3fs's own loop, not `call`)."""
    p = path(p)
    if isinstance(p, Path):
        return str(p)
    from zarr.storage import FsspecStore

    # zarr drives its own event loop, so it gets its own asynchronous client (with s3fs's own retries)
    return FsspecStore.from_url(str(p), storage_options=_options(str(p)), read_only=read_only)

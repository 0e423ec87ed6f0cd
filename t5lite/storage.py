"""Paths on local disk and in Google Cloud Storage (`gs://bucket/...`), in one place.

Every t5lite module that reads or writes a user-given path goes through these functions; local
paths use the standard library (nothing extra is imported), `gs://` paths use gcsfs (fsspec).
Orbax checkpoints reach GCS through tensorstore and etils.epath; `configure()` points all three
at the same endpoint and keeps etils off TensorFlow's GCS client (which cannot be pointed at an
emulator and retries for minutes without credentials).

Object stores have no atomic directory rename and no append, so writes are shaped for them:

- `write_atomic(path, data)`: local files via a temporary file + `os.replace`; objects with one
  upload (an object appears whole or not at all).
- `AppendLog(path)` (metrics.jsonl, TensorBoard event files): local files are appended to and
  flushed per write; on gs:// the lines go to *segment objects* `PATH.00000`, `PATH.00001`, ...
  The current segment is uploaded again (whole) at most every `flush_secs` and on `flush()` /
  `close()`; once it holds `segment_bytes` (256 KiB) it is closed and the next one starts, so
  one upload never exceeds that however long the run (benchmarks/gcs_append.py measures it). `read_lines(path)` returns PATH
  followed by its segments.
- Checkpoints: Orbax writes gs:// steps in place and commits them with a `commit_success.txt`
  object written last; `latest_step` only counts committed steps.

Emulators: with `STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT` set, gcsfs and (through
`TENSORSTORE_GCS_HTTP_URL`) tensorstore talk to that endpoint without credentials.

Bad input: `check_remote(path)` answers within a bounded time (one HTTP request, 10 s timeout,
no retries) with a `UserError` naming the path and what failed: no credentials, endpoint
unreachable, bucket missing or access denied. `t5lite.cli` runs it for every gs:// path on the
command line before a verb starts.

Example::

    >>> from t5lite import storage
    >>> storage.join("gs://bucket/run", "model_config.json")
    'gs://bucket/run/model_config.json'
    >>> storage.write_atomic("gs://bucket/run/run_info.json", "{}")
    >>> storage.exists("gs://bucket/run/run_info.json")
    True
"""

from __future__ import annotations

import builtins
import functools
import glob as globlib
import json
import os
import posixpath
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any

from t5lite.errors import UserError

REMOTE_PREFIX = "gs://"
DEFAULT_ENDPOINT = "https://storage.googleapis.com"
CHECK_TIMEOUT_S = 10.0


def is_remote(path: str | os.PathLike) -> bool:
    return os.fspath(path).startswith(REMOTE_PREFIX)


def emulator_endpoint() -> str | None:
    """`STORAGE_EMULATOR_HOST` as a URL (`http://` added when it has no scheme), or None."""
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if not host or host == "default":
        return None
    return host if host.startswith(("http://", "https://")) else f"http://{host}"


def configure() -> None:
    """Point gcsfs, etils.epath (Orbax's paths) and tensorstore (Orbax's arrays) at one GCS
    endpoint. Called on import; values the user set are kept."""
    os.environ.setdefault("EPATH_USE_TF", "false")       # epath: gcsfs, not tf.io.gfile
    # gcsfs' zonal/HNS bucket probe is a gRPC call that waits 60 s where it cannot connect
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    endpoint = emulator_endpoint()
    if endpoint:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", endpoint)
        # no credentials against an emulator: let tensorstore's metadata-server probe fail fast
        os.environ.setdefault("GCE_METADATA_ROOT", "127.0.0.1:9")
        os.environ.setdefault("GCE_METADATA_HOST", "127.0.0.1:9")
        try:
            import fsspec.config

            fsspec.config.conf.setdefault("gs", {}).setdefault("token", "anon")
        except ImportError:
            pass


configure()


# ---------------------------------------------------------------- path arithmetic

def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def isabs(path: str) -> bool:
    return is_remote(path) or os.path.isabs(path)


def abspath(path: str) -> str:
    """Remote paths unchanged (without a trailing slash); local ones absolute, `~` expanded."""
    if is_remote(path):
        return path.rstrip("/") if path.rstrip("/") != "gs:/" else path
    return os.path.abspath(os.path.expanduser(path))


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def split_bucket(path: str) -> tuple[str, str]:
    """('bucket', 'key/inside') of gs://bucket/key/inside."""
    rest = path[len(REMOTE_PREFIX):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise UserError(f"{path}: a gs:// path needs a bucket name (gs://BUCKET/...).")
    return bucket, key


# ---------------------------------------------------------------- gcsfs

@functools.lru_cache(maxsize=1)
def _fs():
    import gcsfs

    kwargs: dict[str, Any] = {}
    if emulator_endpoint():
        kwargs.update(token="anon", endpoint_url=emulator_endpoint())
    return gcsfs.GCSFileSystem(**kwargs)


def _key(path: str) -> str:
    return path[len(REMOTE_PREFIX):]


def _remote_error(path: str, action: str, e: Exception) -> UserError:
    return UserError(f"{path}: could not {action} on Google Cloud Storage "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).")


# ---------------------------------------------------------------- file-system calls

def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    try:
        return _fs().exists(_key(path))
    except Exception as e:  # noqa: BLE001
        raise _remote_error(path, "check", e) from None


def isdir(path: str) -> bool:
    """Local: a directory. Remote: any object lies under `path/` (object stores have no dirs)."""
    if not is_remote(path):
        return os.path.isdir(path)
    try:
        _fs().invalidate_cache(_key(path))
        return _fs().isdir(_key(path))
    except Exception as e:  # noqa: BLE001
        raise _remote_error(path, "list", e) from None


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    try:
        return _fs().isfile(_key(path))
    except Exception as e:  # noqa: BLE001
        raise _remote_error(path, "check", e) from None


def makedirs(path: str) -> None:
    """Local: `os.makedirs(exist_ok=True)`. Remote: nothing (prefixes need no creation)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names (not paths) directly under `path`, sorted."""
    if not is_remote(path):
        return sorted(os.listdir(path))
    try:
        _fs().invalidate_cache(_key(path))
        return sorted(posixpath.basename(p.rstrip("/")) for p in _fs().ls(_key(path), detail=False))
    except FileNotFoundError:
        return []
    except Exception as e:  # noqa: BLE001
        raise _remote_error(path, "list", e) from None


def glob(pattern: str) -> list[str]:
    """Sorted matches of a `*`/`?`/`[...]` pattern (remote matches keep their gs:// prefix)."""
    if not is_remote(pattern):
        return sorted(globlib.glob(pattern))
    try:
        _fs().invalidate_cache()
        return sorted(REMOTE_PREFIX + p for p in _fs().glob(_key(pattern)))
    except Exception as e:  # noqa: BLE001
        raise _remote_error(pattern, "list", e) from None


def open(path: str, mode: str = "r", encoding: str | None = "utf-8") -> IO:  # noqa: A001
    """Like builtins.open; remote files support "r", "rb", "w", "wb" ("w": the object appears
    when the file is closed)."""
    binary = "b" in mode
    if not is_remote(path):
        return builtins.open(path, mode, encoding=None if binary else encoding)
    if "a" in mode or "+" in mode:
        raise ValueError(f"{path}: mode {mode!r} is not available on an object store; "
                         "use storage.AppendLog")
    try:
        if "r" in mode:
            _fs().invalidate_cache(_key(path))
        return _fs().open(_key(path), mode, **({} if binary else {"encoding": encoding}))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _remote_error(path, "open", e) from None


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def write_atomic(path: str, data: str | bytes) -> None:
    """Write a whole file so that readers see the old or the new content, never a part."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(path):
        try:
            _fs().pipe_file(_key(path), payload)   # one upload: the object appears complete
            _fs().invalidate_cache(_key(dirname(path)))
        except Exception as e:  # noqa: BLE001
            raise _remote_error(path, "write", e) from None
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    with builtins.open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def remove(path: str) -> None:
    if is_remote(path):
        _fs().rm_file(_key(path))
    else:
        os.remove(path)


def local_copy(path: str) -> str:
    """A local file with `path`'s content, for libraries that only read local files
    (SentencePiece, safetensors). Local paths are returned as they are."""
    if not is_remote(path):
        return path
    cache = os.path.join(tempfile.gettempdir(), "t5lite-gcs-cache")
    os.makedirs(cache, exist_ok=True)
    target = os.path.join(cache, _key(path).replace("/", "__"))
    tmp = f"{target}.tmp-{os.getpid()}"
    with builtins.open(tmp, "wb") as f:
        f.write(read_bytes(path))
    os.replace(tmp, target)
    return target


def upload_dir(local_dir: str, remote_dir: str, last: tuple[str, ...] = ()) -> None:
    """Copy the files of `local_dir` to `remote_dir`; the names in `last` are uploaded after
    all others, so a reader that waits for them sees a complete directory."""
    names = sorted(os.listdir(local_dir), key=lambda n: (n in last, n))
    for name in names:
        src = os.path.join(local_dir, name)
        if os.path.isfile(src):
            with builtins.open(src, "rb") as f:
                write_atomic(join(remote_dir, name), f.read())


# ---------------------------------------------------------------- append-only logs

class AppendLog:
    """Lines appended to `path`: a local file, or segment objects PATH.NNNNN on gs://.

    >>> log = AppendLog("gs://bucket/run/metrics.jsonl")   # continues after the last segment
    >>> log.write('{"step": 1}\\n'); log.close()
    >>> read_lines("gs://bucket/run/metrics.jsonl")
    ['{"step": 1}\\n']
    """

    def __init__(self, path: str, *, flush_secs: float = 30.0, segment_bytes: int = 256 << 10):
        self.path = path
        self.remote = is_remote(path)
        self.flush_secs, self.segment_bytes = flush_secs, segment_bytes
        self.uploads = 0          # segment uploads so far (remote)
        self.uploaded_bytes = 0   # bytes sent so far (remote)
        if self.remote:
            self._index = 1 + max((_segment_index(p) for p in glob(path + ".*")), default=-1)
            self._segment = bytearray()
            self._dirty = False
            self._last_upload = time.monotonic()
        else:
            makedirs(os.path.dirname(path) or ".")

    def segment_path(self, index: int | None = None) -> str:
        return f"{self.path}.{self._index if index is None else index:05d}"

    def write(self, data: str | bytes) -> None:
        payload = data.encode("utf-8") if isinstance(data, str) else data
        if not self.remote:
            with builtins.open(self.path, "ab") as f:
                f.write(payload)
            return
        self._segment += payload
        self._dirty = True
        if (len(self._segment) >= self.segment_bytes
                or time.monotonic() - self._last_upload >= self.flush_secs):
            self.flush()

    def flush(self) -> None:
        if not self.remote or not self._dirty:
            return
        write_atomic(self.segment_path(), bytes(self._segment))
        self.uploads += 1
        self.uploaded_bytes += len(self._segment)
        self._dirty = False
        self._last_upload = time.monotonic()
        if len(self._segment) >= self.segment_bytes:
            self._index += 1
            self._segment = bytearray()

    def close(self) -> None:
        self.flush()


def _segment_index(path: str) -> int:
    suffix = path.rsplit(".", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1


def read_lines(path: str) -> list[str]:
    """The lines of an `AppendLog`: `path` itself (if any), then its segments in order."""
    files = [path] if exists(path) else []
    if is_remote(path):
        files += sorted((p for p in glob(path + ".*") if _segment_index(p) >= 0),
                        key=_segment_index)
    lines: list[str] = []
    for name in files:
        lines += read_text(name).splitlines(keepends=True)
    return lines


class _EventFileFactory:
    """tensorboardX writer factory for gs:// event files: an `AppendLog` per file, so a flush
    uploads at most one segment (tensorboardX's own GCS writer re-uploads the whole file)."""

    def open(self, path: str) -> AppendLog:  # noqa: A003
        return AppendLog(path)

    def directory_check(self, path: str) -> None:
        pass


def register_tensorboard_writer() -> None:
    """Make tensorboardX write gs:// event files through `AppendLog` (segments PATH.NNNNN,
    which TensorBoard reads in order: their names still contain "tfevents")."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory("gs", _EventFileFactory())


# ---------------------------------------------------------------- checking a bucket

def check_remote(path: str, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise UserError (naming `path`) unless its bucket can be read with the current
    credentials at the current endpoint. One request, bounded by `timeout` seconds."""
    bucket, _ = split_bucket(path)
    endpoint = emulator_endpoint() or DEFAULT_ENDPOINT
    headers = {}
    if not emulator_endpoint():
        headers["Authorization"] = f"Bearer {_access_token(path)}"
    url = f"{endpoint}/storage/v1/b/{urllib.parse.quote(bucket, safe='')}?fields=name"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            json.load(response)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise UserError(f"{path}: bucket gs://{bucket} does not exist (at {endpoint}); "
                            "create it or fix the path.") from None
        if e.code in (401, 403):
            raise UserError(f"{path}: access to bucket gs://{bucket} was denied (HTTP {e.code}) "
                            "for the current credentials.") from None
        raise UserError(f"{path}: the storage endpoint {endpoint} answered HTTP {e.code} "
                        f"for bucket gs://{bucket}.") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"{path}: cannot reach the storage endpoint {endpoint} ({reason}); "
                        "check the network (or STORAGE_EMULATOR_HOST).") from None


def _access_token(path: str) -> str:
    try:
        import google.auth
        import google.auth.transport.requests
        from google.auth.exceptions import DefaultCredentialsError, GoogleAuthError
    except ImportError:
        raise UserError(f"{path}: gs:// paths need gcsfs and google-auth "
                        "(pip install t5lite installs them).") from None
    try:
        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
        credentials.refresh(google.auth.transport.requests.Request())
    except DefaultCredentialsError:
        raise UserError(f"{path}: no Google Cloud credentials found; run `gcloud auth "
                        "application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or "
                        "run on a VM with a service account.") from None
    except (GoogleAuthError, OSError) as e:
        raise UserError(f"{path}: could not get a Google Cloud access token "
                        f"({str(e).splitlines()[0]}).") from None
    return credentials.token


def remote_paths_in(args: list[str]) -> list[str]:
    """The distinct gs:// paths in command-line arguments (`--flag=gs://...`, gin bindings)."""
    found: list[str] = []
    for arg in args:
        value = arg.split("=", 1)[1] if "=" in arg else arg
        value = value.strip().strip("'\"")
        if value.startswith(REMOTE_PREFIX) and value not in found:
            found.append(value)
    return found


def check_remote_args(args: list[str]) -> None:
    """`check_remote` once per bucket named in `args`."""
    seen: set[str] = set()
    for path in remote_paths_in(args):
        bucket, _ = split_bucket(path)
        if bucket not in seen:
            seen.add(bucket)
            check_remote(path)

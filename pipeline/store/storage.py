"""Open any fsspec URL as a filesystem (for markers) and as a zarr store (for arrays), turning
connection and credential failures into errors that name the URL and the fix."""

from __future__ import annotations

import importlib
import json
from contextlib import contextmanager
from typing import Any

from fsspec.core import url_to_fs

from pipeline.errors import StorageAccessError, StoreError


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _credential_error(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"NoCredentialsError", "PartialCredentialsError", "InvalidAccessKeyId",
                         "SignatureDoesNotMatch"}) or "credentials" in str(exc).lower()


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _unreachable(exc: BaseException) -> bool:
    """The endpoint refused or never answered the connection (as opposed to failing mid-way)."""
    names = {type(e).__name__ for e in _chain(exc)}
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionRefusedError",
                         "ClientConnectorError"})


def is_transport_error(exc: BaseException) -> bool:
    """Whether `exc` is the storage service or the network failing (what fsspec backends raise once
    their own retries are spent: s3fs's OSError translations, botocore's and aiohttp's own errors,
    a local disk's OSError), as opposed to a missing file, which callers handle, or an error of ours."""
    if isinstance(exc, (StoreError, FileNotFoundError)):
        return False
    return isinstance(exc, (OSError, TimeoutError) + _client_errors())


def _client_errors() -> tuple[type, ...]:
    found = []
    for module, names in (("botocore.exceptions", ("BotoCoreError", "ClientError")), ("aiohttp", ("ClientError",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:  # a backend that is not installed raises none of its errors
            continue
        found += [getattr(mod, n) for n in names]
    return tuple(found)


def describe_access_error(url: str, storage_options: dict | None, exc: BaseException) -> StorageAccessError:
    endpoint = (storage_options or {}).get("endpoint_url") or \
        (storage_options or {}).get("client_kwargs", {}).get("endpoint_url")
    if _credential_error(exc):
        return StorageAccessError(
            f"no valid credentials for {url!r} ({type(exc).__name__}: {exc}). Fix: set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment, or pass "
            "storage_options key=... secret=...")
    where = f"endpoint {endpoint!r}" if endpoint else "the default endpoint"
    return StorageAccessError(
        f"cannot reach the storage behind {url!r} at {where} ({type(exc).__name__}: {exc}). Fix: check "
        "that the server is running and that storage_options.endpoint_url is right")


class Storage:
    """One fsspec URL, opened once: `fs`/`root` for small JSON objects, `zarr_store` for arrays."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        if self.url.startswith("s3://"):
            # Fail in seconds, not minutes, when the endpoint is down (botocore retries ~5 times
            # with back-off by default); users can override both in storage_options.
            cfg = self.storage_options.setdefault("config_kwargs", {})
            cfg.setdefault("connect_timeout", 5)
            cfg.setdefault("retries", {"max_attempts": 2})
        try:
            self.fs, self.root = url_to_fs(self.url, **self.storage_options)
        except Exception as exc:  # bad protocol, missing s3fs, bad options
            raise describe_access_error(url, storage_options, exc) from exc

    def check_access(self) -> bool:
        """Touch the storage once; returns whether `root` exists. Raises StorageAccessError."""
        try:
            return bool(self.fs.exists(self.root))
        except Exception as exc:
            raise describe_access_error(self.url, self.storage_options, exc) from exc

    @contextmanager
    def failures(self, doing: str):
        """Turns the storage failing (after the backend's retries) while `doing` into a StorageAccessError."""
        try:
            yield
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            raise self.access_error(exc, doing) from exc

    def access_error(self, exc: BaseException, doing: str) -> StorageAccessError:
        """The error for the storage failing while `doing`: it names the store, says nothing is lost, and how to resume
        (or, for an endpoint that cannot be reached or credentials that are refused, that fix)."""
        if _credential_error(exc) or _unreachable(exc):
            err = StorageAccessError(f"{doing}: {describe_access_error(self.url, self.storage_options, exc)}. What was "
                                     "written before is intact: rerun the same command once it is fixed")
            err.__cause__ = exc
            return err
        err = StorageAccessError(
            f"{doing} at {self.url!r} failed: the storage gave up answering ({type(exc).__name__}: {exc}). "
            "What was written before is intact. Fix: check the storage service (and storage_options.endpoint_url), "
            "then rerun the same command: it resumes where this run stopped; for a flaky service, raise "
            "storage_options.config_kwargs.retries.max_attempts")
        err.__cause__ = exc
        return err

    def zarr_store(self, read_only: bool = False):
        from zarr.storage import FsspecStore, LocalStore
        if is_local(self.url):
            return LocalStore(self.root, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)

    def open_group(self, mode: str = "r", attributes: dict | None = None):
        """The zarr group at the root (created with `attributes` if it does not exist); a missing or
        unreadable metadata file raises StoreError."""
        import zarr
        with self._metadata(""):
            try:
                return zarr.open_group(self.zarr_store(read_only=mode == "r"), mode=mode, attributes=attributes)
            except zarr.errors.ContainsGroupError:
                # mode "a" checks, then creates: a concurrent worker of the same store created the group
                # in between (its metadata is written atomically, header included), so open that one
                return zarr.open_group(self.zarr_store(), mode="r+")

    def open_array(self, group, name: str):
        """Array `name` of `group`; a missing or unreadable metadata file raises StoreError."""
        with self._metadata(name):
            return group[name]

    @contextmanager
    def _metadata(self, node: str):
        """Zarr reports a truncated or garbled zarr.json as a bare JSON, Unicode or schema error (a
        ValueError or TypeError) and a missing one as KeyError or FileNotFoundError, none naming the file."""
        try:
            with self.failures(f"reading the metadata of {node or 'the group'}"):
                yield
        except (ValueError, TypeError, KeyError) as exc:
            path = self.path(f"{node}/zarr.json" if node else "zarr.json")
            state = "missing" if isinstance(exc, (KeyError, FileNotFoundError)) else \
                f"unreadable ({type(exc).__name__}: {exc})"
            raise StoreError(
                f"the metadata file {path!r} of the store at {self.url!r} is {state}. Fix: restore the file from "
                "a copy of the store, or delete the store and rerun the caching stage") from exc

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def read_json(self, key: str) -> Any | None:
        """The JSON object at `key`, or None if there is none; one that does not parse raises StoreError."""
        try:
            with self.failures(f"reading {key}"), self.fs.open(self.path(key), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: a truncated or garbled file
            raise StoreError(
                f"{self.path(key)!r} (under {self.url!r}) is not valid JSON ({type(exc).__name__}: {exc}). Fix: "
                "restore it from a copy, or delete it and rerun the stage that wrote it") from exc

    def write_json(self, key: str, obj: Any) -> None:
        with self.failures(f"writing {key}"):
            self._write_json(key, obj)

    def _write_json(self, key: str, obj: Any) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        path = self.path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if is_local(self.url):  # atomic on a local disk: a killed writer never leaves half a marker
            tmp = path + ".tmp"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        else:  # object stores put a whole object or nothing
            with self.fs.open(path, "wb") as f:
                f.write(data)

    def list_json(self, prefix: str) -> list[str]:
        try:
            with self.failures(f"listing {prefix}"):
                names = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted(n.rsplit("/", 1)[-1] for n in names if n.endswith(".json"))


__all__ = ["Storage", "describe_access_error", "is_local", "is_transport_error"]

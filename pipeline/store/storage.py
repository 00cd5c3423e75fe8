"""Open any fsspec URL as a filesystem (for markers) and as a zarr store (for arrays), turning
connection and credential failures into errors that name the URL and the fix."""

from __future__ import annotations

import json
from typing import Any

from fsspec.core import url_to_fs

from pipeline.errors import StorageAccessError


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

    def zarr_store(self, read_only: bool = False):
        from zarr.storage import FsspecStore, LocalStore
        if is_local(self.url):
            return LocalStore(self.root, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def read_json(self, key: str) -> Any | None:
        try:
            with self.fs.open(self.path(key), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def write_json(self, key: str, obj: Any) -> None:
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
            names = self.fs.ls(self.path(prefix), detail=False)
        except FileNotFoundError:
            return []
        return sorted(n.rsplit("/", 1)[-1] for n in names if n.endswith(".json"))


__all__ = ["Storage", "describe_access_error", "is_local"]

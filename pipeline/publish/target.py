"""Copy a release folder to any fsspec URL (s3://, gs://, a path, ...), idempotently.

A remote SAE folder whose manifest (release.json) lists a file with the same sha256 and size keeps
that file. Before a changed SAE folder gets any file, its remote manifest is removed; the manifest
goes back last, then the card: a half-copied release never shows a manifest. On a rerun after an
interruption (no manifest), files of the right size are read back and hashed, and kept if equal.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field

from pipeline.errors import StorageAccessError
from pipeline.publish.hub import LocalFile, local_files
from pipeline.analysis.release import CARD, MANIFEST
from pipeline.store.storage import Storage, describe_access_error

log = logging.getLogger("pipeline.publish")


@dataclass
class CopyPlan:
    upload: list[LocalFile] = field(default_factory=list)
    unchanged: list[LocalFile] = field(default_factory=list)
    remove_first: list[str] = field(default_factory=list)
    remote_checked: bool = True

    def describe(self, url: str) -> list[str]:
        lines = [f"copy to {url}" + ("" if self.remote_checked else " (dry run: the target was not read)")]
        lines += [f"  remove {p} (until the new files are in)" for p in self.remove_first]
        lines += [f"  put {f.path} ({f.size} bytes)" for f in self.upload]
        if not self.upload:
            lines.append(f"  nothing to copy: {len(self.unchanged)} files already there")
        return lines


def _order(files: list[LocalFile]) -> list[LocalFile]:
    """Data first, then each folder's manifest, then the card."""
    return sorted(files, key=lambda f: (2 if f.path == CARD else 1 if f.path.endswith("/" + MANIFEST) else 0, f.path))


def _remote_sha256(st: Storage, path: str) -> str:
    h = hashlib.sha256()
    with st.fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def copy(folder, url: str, storage_options: dict | None = None, dry_run: bool = False) -> CopyPlan:
    files = local_files(folder, "")
    if dry_run:
        return CopyPlan(upload=_order(files), remote_checked=False)
    st = Storage(url, storage_options)
    try:
        p = _plan(st, files)
        for r in p.remove_first:
            st.fs.rm(st.path(r))
        for i, f in enumerate(p.upload):
            log.info("put %d/%d %s (%d bytes)", i + 1, len(p.upload), f.path, f.size)
            dest = st.path(f.path)
            st.fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            st.fs.put_file(str(f.local), dest)  # an object store writes a whole object or nothing
    except StorageAccessError:
        raise
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise describe_access_error(url, storage_options, exc) from exc
    log.info("copied the release to %s: %d files written, %d unchanged", url, len(p.upload), len(p.unchanged))
    return p


def _plan(st: Storage, files: list[LocalFile]) -> CopyPlan:
    p = CopyPlan()
    remote_manifests = {}  # SAE folder -> its remote manifest's file list ({} if none)
    for d in {f.path.split("/", 1)[0] for f in files if "/" in f.path}:
        remote_manifests[d] = (st.read_json(f"{d}/{MANIFEST}") or {}).get("files", {})
    root = st.root.rstrip("/") + "/"
    try:
        sizes = {k[len(root):]: v.get("size") for k, v in st.fs.find(st.root, detail=True).items() if k.startswith(root)}
    except FileNotFoundError:
        sizes = {}
    manifests = [f for f in files if f.path.endswith("/" + MANIFEST)]
    for f in files:
        if f in manifests:
            continue
        d, _, name = f.path.partition("/")
        listed = remote_manifests.get(d, {}).get(name) if name else None
        if sizes.get(f.path) != f.size:
            same = False
        elif listed is not None:
            same = listed.get("sha256") == f.sha256
        else:  # no manifest (an interrupted copy) or the card: read it back
            same = _remote_sha256(st, st.path(f.path)) == f.sha256
        (p.unchanged if same else p.upload).append(f)
    changed = {f.path.split("/", 1)[0] for f in p.upload if "/" in f.path}
    for f in manifests:
        d = f.path.split("/", 1)[0]
        same = d not in changed and remote_manifests[d] == json.loads(f.local.read_text())["files"]
        (p.unchanged if same else p.upload).append(f)
    p.remove_first = sorted(f"{d}/{MANIFEST}" for d in changed if f"{d}/{MANIFEST}" in sizes)
    p.upload = _order(p.upload)
    return p

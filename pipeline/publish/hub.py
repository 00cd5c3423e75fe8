"""Upload a release folder to the Hugging Face Hub, idempotently and resumably, and download one
back for `pipeline.publish.load("hf://owner/repo/sae_id@revision")`.

What is already on the Hub is read first (one tree listing); only files whose content differs are
sent. Small releases go in one commit. Large ones go in several commits of data files; the files that
make a release loadable and complete (each SAE's cfg.json, pipeline.json and release.json manifest,
and the README.md card) go in the last commit, and the first commit deletes the manifests of the SAEs
being replaced. An interrupted upload thus leaves no folder that presents itself as complete, and a
rerun sends only what is missing (the Hub's LFS/Xet storage also skips content it already holds).

The token comes from $HF_TOKEN or the `hf auth login` file. It is passed to huggingface_hub only,
never formatted into a message or a log line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.analysis.release import CARD, MANIFEST, PIPELINE_CONFIG, SAELENS_CFG, SHARDS
from pipeline.errors import UserError
from pipeline.publish.release import sha256_file

log = logging.getLogger("pipeline.publish")
FINAL_NAMES = (SAELENS_CFG, PIPELINE_CONFIG, MANIFEST)
"""Per-SAE files committed last; with README.md they make a release visible as complete."""


class PublishAuthError(UserError, PermissionError):
    """No token, or the Hub refused it, or it may not write to the repo."""


class PublishIncompleteError(UserError, OSError):
    """The upload stopped part way (network failure); rerunning the same command resumes it."""


@dataclass
class LocalFile:
    path: str        # relative to the release folder
    repo_path: str   # in the repo
    size: int
    sha256: str
    local: Path

    @property
    def final(self) -> bool:
        """The card, an SAE's FINAL_NAMES, and a shard folder's cfg.json (it makes SAELens see that shard)."""
        parts = self.path.split("/")
        return (self.path == CARD or (len(parts) == 2 and parts[1] in FINAL_NAMES)
                or (len(parts) == 4 and parts[1] == SHARDS and parts[3] == SAELENS_CFG))

    @property
    def sae_folder(self) -> str:
        """The repo path of the SAE folder this file belongs to."""
        return self.repo_path[:len(self.repo_path) - len(self.path)] + self.path.split("/", 1)[0]


@dataclass
class HubPlan:
    """What a publish does on the Hub."""

    upload: list[LocalFile] = field(default_factory=list)
    unchanged: list[LocalFile] = field(default_factory=list)
    delete_first: list[str] = field(default_factory=list)  # manifests of SAEs being replaced
    commits: list[list[LocalFile]] = field(default_factory=list)
    remote_checked: bool = True

    def describe(self, repo_id: str, revision: str) -> list[str]:
        lines = [f"create_repo {repo_id} (if missing), branch {revision}"]
        if not self.remote_checked:
            lines.append("(dry run: the Hub was not contacted, every file is listed)")
        if not self.upload:
            lines.append(f"nothing to upload: {len(self.unchanged)} files already there")
        for i, files in enumerate(self.commits):
            size = sum(f.size for f in files)
            extra = f", delete {self.delete_first}" if i == 0 and self.delete_first else ""
            lines.append(f"commit {i + 1}/{len(self.commits)}: {len(files)} files, {_human(size)}{extra}")
            lines += [f"  {f.repo_path} ({_human(f.size)})" for f in files]
        return lines


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def local_files(folder: Path, path_in_repo: str) -> list[LocalFile]:
    prefix = path_in_repo.strip("/")
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            out.append(LocalFile(rel, f"{prefix}/{rel}" if prefix else rel, p.stat().st_size, sha256_file(p), p))
    return out


def get_token() -> str:
    from huggingface_hub import get_token as hf_token
    token = hf_token()
    if not token:
        raise PublishAuthError("no Hugging Face token: set HF_TOKEN in the environment or run `hf auth login` "
                               "(the token is read from there and never printed), or use dry_run=true")
    return token


def _same(remote, f: LocalFile) -> bool:
    from huggingface_hub.utils import sha
    if remote is None or remote.size != f.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == f.sha256
    return remote.blob_id == sha.git_hash(f.local.read_bytes())


def plan(files: list[LocalFile], remote: dict | None, single_commit: int, commit_size: int) -> HubPlan:
    """`remote`: repo path -> RepoFile as listed (None: not checked, everything is uploaded)."""
    p = HubPlan(remote_checked=remote is not None)
    for f in files:
        (p.unchanged if remote and _same(remote.get(f.repo_path), f) else p.upload).append(f)
    if not p.upload:
        return p
    data = [f for f in p.upload if not f.final]
    final = [f for f in p.upload if f.final]
    if sum(f.size for f in p.upload) <= single_commit:
        p.commits = [p.upload]
        return p
    batch: list[LocalFile] = []
    for f in data:
        if batch and sum(b.size for b in batch) + f.size > commit_size:
            p.commits.append(batch)
            batch = []
        batch.append(f)
    if batch:
        p.commits.append(batch)
    p.commits.append(final)
    changed_saes = {f.sae_folder for f in data if "/" in f.path}
    p.delete_first = sorted(f"{d}/{MANIFEST}" for d in changed_saes if remote and f"{d}/{MANIFEST}" in remote)
    return p


def _explain(exc: Exception, repo_id: str, revision: str) -> Exception:
    """A clear error for what the Hub or the network said."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    if isinstance(exc, OfflineModeIsEnabled):
        return PublishIncompleteError("HF_HUB_OFFLINE=1 is set: unset it to publish, or use dry_run=true")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        server = exc.response.headers.get("X-Error-Message") or ""
        if status == 401:
            return PublishAuthError(f"the Hub rejected the token (HTTP 401{': ' + server if server else ''}). Fix: "
                                    "set a valid write token in HF_TOKEN or run `hf auth login`")
        if status == 403:
            return PublishAuthError(
                f"the token may not write to {repo_id!r} (HTTP 403{': ' + server if server else ''}): the repo "
                "belongs to another user or organisation. Fix: publish under your own namespace "
                "(repo_id=<you>/<name>) or get write access to it; nothing was committed by this step")
        return exc
    return PublishIncompleteError(f"upload to {repo_id}@{revision} failed ({type(exc).__name__}: {exc})")


def publish(folder: Path, repo_id: str, *, revision: str = "main", path_in_repo: str = "", private: bool = False,
            endpoint: str | None = None, single_commit: int, commit_size: int, commit_message: str,
            dry_run: bool = False, progress: bool = True) -> HubPlan:
    """Upload the release at `folder` to repo_id@revision (under path_in_repo); returns what it did."""
    files = local_files(folder, path_in_repo)
    if dry_run:
        return plan(files, None, single_commit, commit_size)
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=get_token())
    try:
        try:  # an existing repo (ours or, for a clear 403 later, someone else's) is not re-created
            api.repo_info(repo_id)
        except RepositoryNotFoundError:
            api.create_repo(repo_id, private=private, exist_ok=True)
        if revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        try:
            remote = {f.path: f for f in api.list_repo_tree(repo_id, path_in_repo=path_in_repo.strip("/") or None,
                                                            recursive=True, revision=revision)
                      if hasattr(f, "blob_id")}
        except (EntryNotFoundError, RevisionNotFoundError):
            remote = {}
    except RepositoryNotFoundError as exc:
        raise PublishAuthError(f"repo {repo_id!r} does not exist and could not be created, or the token may not "
                               f"see it ({exc.response.status_code if exc.response is not None else '?'}). Fix: "
                               "check repo_id and the token's permissions") from None
    except Exception as exc:
        raise _explain(exc, repo_id, revision) from None
    p = plan(files, remote, single_commit, commit_size)
    if not p.upload:
        log.info("%s@%s already holds this release (%d files): nothing to upload", repo_id, revision, len(files))
        return p
    log.info("uploading %d of %d files (%s) to %s@%s in %d commit(s)", len(p.upload), len(files),
             _human(sum(f.size for f in p.upload)), repo_id, revision, len(p.commits))
    done = 0
    for i, batch in enumerate(p.commits):
        ops = [CommitOperationAdd(path_in_repo=f.repo_path, path_or_fileobj=str(f.local)) for f in batch]
        if i == 0:
            ops = [CommitOperationDelete(path_in_repo=d) for d in p.delete_first] + ops
        suffix = f" (part {i + 1} of {len(p.commits)})" if len(p.commits) > 1 else ""
        log.info("commit %d/%d: %d files, %s", i + 1, len(p.commits), len(batch), _human(sum(f.size for f in batch)))
        try:
            api.create_commit(repo_id, operations=ops, commit_message=commit_message + suffix, revision=revision)
        except Exception as exc:
            err = _explain(exc, repo_id, revision)
            if isinstance(err, PublishIncompleteError):
                err = PublishIncompleteError(
                    f"upload to {repo_id}@{revision} stopped in commit {i + 1} of {len(p.commits)} "
                    f"({done} of {len(p.upload)} files committed; {type(exc).__name__}: {exc}). The release is "
                    f"not marked complete (its {MANIFEST} and {SAELENS_CFG} go in the last commit). Fix: rerun "
                    "the same command; files already on the Hub are not sent again")
            raise err from None
        done += len(batch)
    log.info("published %s@%s: %d files uploaded, %d unchanged", repo_id, revision, len(p.upload), len(p.unchanged))
    return p

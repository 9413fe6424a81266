"""Hub access through huggingface_hub: resolve a revision to a commit, fetch files resumably, verify them."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_manager import errors
from model_manager.names import is_hex

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


class HubUnreachable(Exception):
    """The Hub could not be reached (network error, timeout, server error or offline mode)."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A file of a repository at a commit: path, size and the digests the Hub publishes for it."""

    path: str
    size: int
    sha256: str
    blob_id: str

    @property
    def partial_key(self) -> str:
        """Content-derived name of the partial download, so a resume only ever continues the same bytes."""
        return self.sha256 or self.blob_id


@dataclasses.dataclass(frozen=True)
class RepoSnapshot:
    """A repository resolved to one commit."""

    repo_id: str
    commit: str
    files: tuple[RemoteFile, ...]

    def file(self, path: str) -> RemoteFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


class _ByteCounter:
    """A tqdm stand-in for huggingface_hub's http_get: forwards byte counts and stops the transfer on cancel."""

    def __init__(self, on_bytes: Callable[[int], None], cancel: threading.Event, **_kwargs: Any):
        self._on_bytes = on_bytes
        self._cancel = cancel

    def update(self, n: int | float | None = 1) -> None:
        if self._cancel.is_set():
            raise errors.Cancelled("the pull was cancelled")
        if n:
            self._on_bytes(int(n))

    def __enter__(self) -> _ByteCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def close(self) -> None:
        return None


class Hub:
    """One Hub endpoint with one token (or none); partial downloads live in `downloads`."""

    def __init__(self, endpoint: str, token: str, timeout: float, offline: bool, downloads: Path):
        self.endpoint = endpoint.rstrip("/")
        self.token: str | bool = token or False
        self.timeout = timeout
        self.offline = offline
        self.downloads = downloads
        self._part_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def resolve(self, repo_id: str, revision: str) -> RepoSnapshot:
        """The commit `revision` points at and the repository's files there; raises HubUnreachable when offline."""
        if self.offline:
            raise HubUnreachable("offline mode is on")
        import httpx2
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        api = HfApi(endpoint=self.endpoint, token=self.token)
        try:
            info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=self.timeout)
        except GatedRepoError:
            raise errors.PermissionDenied(
                f"{repo_id} is gated: accept its licence on the Hub and give the sidecar a token (HF_TOKEN)"
            ) from None
        except RevisionNotFoundError:
            raise errors.NotFound(f"{repo_id} has no revision {revision!r}") from None
        except RepositoryNotFoundError:
            raise errors.NotFound(
                f"repository {repo_id} does not exist on {self.endpoint}, or is private and the token cannot see it"
            ) from None
        except OfflineModeIsEnabled as exc:
            raise HubUnreachable(str(exc)) from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status in (401, 403):
                raise errors.PermissionDenied(f"the Hub refused access to {repo_id} (HTTP {status})") from None
            if status >= 500 or status in (408, 429):
                raise HubUnreachable(f"HTTP {status} from the Hub") from None
            raise errors.Unavailable(f"the Hub answered HTTP {status} for {repo_id}") from None
        except (httpx2.TransportError, OSError) as exc:
            raise HubUnreachable(f"{type(exc).__name__}: {exc}") from None
        commit = str(info.sha or "")
        if not is_hex(commit):
            raise errors.Unavailable(f"the Hub returned no commit for {repo_id}@{revision}")
        files = []
        for sibling in info.siblings or ():
            lfs = sibling.lfs
            sha256 = str(lfs.sha256) if lfs is not None else ""
            files.append(RemoteFile(sibling.rfilename, int(sibling.size or 0), sha256, str(sibling.blob_id or "")))
        return RepoSnapshot(repo_id, commit, tuple(files))

    def partial_path(self, file: RemoteFile) -> Path:
        key = file.partial_key
        if not is_hex(key):
            raise errors.DataLoss(f"{file.path}: the Hub published no usable digest ({key!r})")
        return self.downloads / f"{key}.part"

    def download(
        self,
        snapshot: RepoSnapshot,
        file: RemoteFile,
        dest: Path,
        on_bytes: Callable[[int], None],
        cancel: threading.Event,
        on_resumed: Callable[[int], None] | None = None,
    ) -> tuple[int, int]:
        """Fetches one file to `dest`, resuming a partial download, and verifies it; returns (fetched, resumed) bytes.

        A file whose bytes do not match the Hub's digest is deleted and DATA_LOSS is raised.
        """
        part = self.partial_path(file)
        with self._guard:
            lock = self._part_locks.setdefault(part.name, threading.Lock())
        # Two pulls that need the same bytes (two names for one repository) must not append to one partial file.
        while not lock.acquire(timeout=0.2):
            if cancel.is_set():
                raise errors.Cancelled("the pull was cancelled")
        try:
            return self._download(snapshot, file, part, dest, on_bytes, cancel, on_resumed)
        finally:
            lock.release()

    def _download(
        self,
        snapshot: RepoSnapshot,
        file: RemoteFile,
        part: Path,
        dest: Path,
        on_bytes: Callable[[int], None],
        cancel: threading.Event,
        on_resumed: Callable[[int], None] | None,
    ) -> tuple[int, int]:
        """Fetches `file` into `part`, verifies it and moves it to `dest`; returns (fetched, resumed) bytes."""
        resumed = self._resumable_bytes(file, part, on_resumed)
        fetched = 0

        def count(n: int) -> None:
            nonlocal fetched
            fetched += n
            on_bytes(n)

        self._fetch(snapshot, file, part, resumed, functools.partial(_ByteCounter, count, cancel))
        self._verify(file, part)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
        return fetched, resumed

    def _resumable_bytes(self, file: RemoteFile, part: Path, on_resumed: Callable[[int], None] | None) -> int:
        """Bytes of `file` already in its partial download (one larger than the file is deleted); reports a resume."""
        resumed = part.stat().st_size if part.exists() else 0
        if resumed > file.size:
            part.unlink()
            resumed = 0
        if resumed:
            log.info("resuming download", extra={"file": file.path, "have": resumed, "size": file.size})
            if on_resumed is not None:
                on_resumed(resumed)
        return resumed

    def _fetch(
        self, snapshot: RepoSnapshot, file: RemoteFile, part: Path, resumed: int, counter: Callable[..., _ByteCounter]
    ) -> None:
        """Appends the rest of `file` to `part` from byte `resumed` on and syncs it; transfer failures become errors."""
        import httpx2
        from huggingface_hub import hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        url = hf_hub_url(snapshot.repo_id, file.path, revision=snapshot.commit, endpoint=self.endpoint)
        headers = build_hf_headers(token=self.token)
        try:
            with part.open("r+b" if resumed else "wb") as fh:
                fh.seek(resumed)
                http_get(url, fh, resume_size=resumed, headers=headers, expected_size=file.size, tqdm_class=counter)
                fh.flush()
                os.fsync(fh.fileno())
        except errors.ManagerError:
            raise
        except OfflineModeIsEnabled as exc:
            raise HubUnreachable(str(exc)) from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            raise errors.Unavailable(
                f"{file.path}: the Hub answered HTTP {status}; {part.stat().st_size} of {file.size} bytes are kept "
                "and the next pull resumes"
            ) from None
        except httpx2.TransportError as exc:
            raise errors.Unavailable(
                f"{file.path}: transfer failed ({type(exc).__name__}); {part.stat().st_size} of {file.size} bytes "
                "are kept and the next pull resumes"
            ) from None
        except OSError as exc:
            if "Consistency check failed" in str(exc):
                part.unlink(missing_ok=True)
                raise errors.ChecksumMismatch(
                    f"{file.path}: the Hub sent a different size than it lists ({exc})"
                ) from None
            raise

    def _verify(self, file: RemoteFile, path: Path) -> None:
        size = path.stat().st_size
        problem = ""
        if size != file.size:
            problem = f"{size} bytes, the Hub lists {file.size}"
        elif file.sha256:
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
            if digest.hexdigest() != file.sha256:
                problem = f"sha256 {digest.hexdigest()[:16]}… does not match the Hub's {file.sha256[:16]}…"
        else:
            blob = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
            with path.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    blob.update(chunk)
            if blob.hexdigest() != file.blob_id:
                problem = f"git blob id {blob.hexdigest()[:16]}… does not match the Hub's {file.blob_id[:16]}…"
        if problem:
            path.unlink(missing_ok=True)
            raise errors.ChecksumMismatch(f"{file.path}: {problem}; the file was discarded and nothing was published")

    def discard_partials(self, files: list[RemoteFile]) -> None:
        """Deletes the partial downloads of `files` (after a failure that makes resuming pointless)."""
        for f in files:
            if is_hex(f.partial_key):
                (self.downloads / f"{f.partial_key}.part").unlink(missing_ok=True)

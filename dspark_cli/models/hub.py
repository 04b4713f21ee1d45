"""Downloads from the Hugging Face hub, through huggingface-hub into its standard cache (never a second copy).

huggingface-hub already does the protocol: HF_ENDPOINT, the token (HF_TOKEN or the token file `hf auth login`
writes), HF_HUB_OFFLINE, and resuming with a Range request when the connection drops mid-file. This module
adds what dspark promises on top: a Rich progress bar on stderr, a disk-space check before the first byte, a
sha256 check of what arrived, and one clear DownloadError line for every way a download can fail.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
from pathlib import Path

from ..console import console
from ..errors import DownloadError
from ..llama.memory import fmt_bytes

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = {"1", "true", "yes", "on"}


def offline_mode(flag: bool = False) -> bool:
    """--offline or HF_HUB_OFFLINE=1 (the variable huggingface-hub itself honours)."""
    return flag or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_file(repo: str, filename: str, revision: str | None = None) -> Path | None:
    """The file's path in the HF cache if it is there in full, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, revision=revision)
    except ValueError:  # a malformed repo id: certainly not cached
        return None
    if isinstance(found, str) and os.path.isfile(found):
        return Path(found)
    return None


def cached_files(repo: str) -> list[str]:
    """Relative paths of the files of `repo` present in the HF cache (any snapshot); offline QUANT lookups."""
    from huggingface_hub.file_download import repo_folder_name

    snapshots = cache_dir() / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots"
    found: set[str] = set()
    if snapshots.is_dir():
        for snap in snapshots.iterdir():
            for p in snap.rglob("*"):
                if p.is_file():  # follows the symlink into blobs/, so a dangling link does not count
                    found.add(p.relative_to(snap).as_posix())
    return sorted(found)


def list_files(repo: str, *, offline: bool = False) -> list[str]:
    """The files of a hub repo (the API's tree listing), or those in the cache when offline."""
    if offline_mode(offline):
        return cached_files(repo)
    from huggingface_hub import HfApi, get_session

    try:
        # One request without huggingface-hub's retry loop first (the listing backs off for ~20 s and logs
        # a dozen lines when there is no network): any answer at all means the host is reachable.
        get_session().head(endpoint(), timeout=15)
        with _quiet_hub_logs():
            return sorted(HfApi(endpoint=endpoint()).list_repo_files(repo))
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        raise _download_error(e, repo, None) from None


def download(
    repo: str,
    filename: str,
    *,
    sha256: str | None = None,
    offline: bool = False,
    revision: str | None = None,
    progress: bool = True,
) -> Path:
    """Bring `repo/filename` into the HF cache (or find it there) and return its path.

    A file already cached is returned without a network round trip. A new download is checked against
    `sha256` when given, else against the hub's ETag when that is a sha256 (the hub's ETag for LFS files);
    a file that fails the check is removed from the cache so the next try downloads it again.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    if offline_mode(offline):
        found = cached_file(repo, filename, revision)
        if found is None:
            raise DownloadError(
                f"{repo}:{filename} is not in the Hugging Face cache ({cache_dir()}) and dspark is offline",
                hint="drop --offline / HF_HUB_OFFLINE=1 to download it",
            )
        return found

    found = cached_file(repo, filename, revision)
    if found is not None:
        return found

    try:
        # One HEAD without huggingface-hub's retry loop (which backs off for ~20 s when there is no network):
        # it fails fast with the real reason and gives the size for the disk check.
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision))
        if meta.size:
            _check_disk(meta.size, repo, filename)
        with _quiet_hub_logs():
            # huggingface-hub labels its bar with the URL; a subclass carries the file name instead.
            bar = type("FileBar", (RichBar if progress else _NoBar,), {"label": filename})
            path = Path(hf_hub_download(repo, filename, revision=revision, tqdm_class=bar))
    except DownloadError:
        raise
    except Exception as e:  # noqa: BLE001 - huggingface-hub raises many types; each maps to one line
        # (Ctrl-C, SystemExit and a cancelled task are not Exceptions: they pass through as themselves.)
        raise _download_error(e, repo, filename) from None

    expected = (sha256 or "").lower() or _etag_sha256(path)
    if expected:
        actual = file_sha256(path, progress=progress)
        if actual != expected:
            _evict(path)
            raise DownloadError(
                f"checksum mismatch for {repo}:{filename}: expected sha256 {expected[:16]}…, got {actual[:16]}…; "
                "the file was removed from the cache",
                hint="run the command again; if it keeps failing the registry entry or the mirror is wrong",
            )
    return path


def file_sha256(path: Path, *, progress: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    bar = RichBar(total=size, desc=f"sha256 {path.name}", unit="B") if progress and size > 64 << 20 else None
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            if bar:
                bar.update(len(chunk))
    if bar:
        bar.close()
    return h.hexdigest()


def _etag_sha256(path: Path) -> str | None:
    # The cache stores each blob under its ETag; for LFS files (every GGUF) that ETag is the content's sha256.
    name = Path(os.path.realpath(path)).name
    return name if _HEX64.match(name) else None


def _evict(path: Path) -> None:
    blob = Path(os.path.realpath(path))
    for p in (path, blob):
        try:
            p.unlink()
        except OSError:
            pass


def _check_disk(size: int, repo: str, filename: str) -> None:
    where = cache_dir()
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < size:
        raise DownloadError(
            f"not enough disk space for {repo}:{filename}: it needs {fmt_bytes(size)}, "
            f"{where} has {fmt_bytes(free)} free",
            hint="free some space, or point HF_HUB_CACHE (or HF_HOME) at a bigger disk",
        )


def _download_error(e: BaseException, repo: str, filename: str | None) -> DownloadError:
    """One line for each way huggingface-hub (or the disk) can fail."""
    from huggingface_hub import errors as hf

    what = f"{repo}:{filename}" if filename else repo
    host = endpoint()
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hf.GatedRepoError):
        return DownloadError(
            f"{repo} is a gated repo and this account has no access to it",
            hint=f"accept its terms at {host}/{repo}, then log in (`hf auth login`) or set HF_TOKEN",
        )
    if filename is not None and (isinstance(e, hf.RemoteEntryNotFoundError) or (
            isinstance(e, hf.HfHubHTTPError) and status == 404 and not isinstance(e, hf.RepositoryNotFoundError))):
        return DownloadError(f"{filename} not found in {repo} on {host}",
                             hint=f"list its files at {host}/{repo}/tree/main")
    if isinstance(e, hf.RevisionNotFoundError):
        return DownloadError(f"revision not found for {what} on {host}")
    if isinstance(e, hf.RepositoryNotFoundError) or (filename is None and status == 404):
        return DownloadError(
            f"repository {repo} not found on {host} (or it is private)",
            hint="check the name; for a private repo log in (`hf auth login`) or set HF_TOKEN",
        )
    if isinstance(e, hf.HfHubHTTPError) and status in (401, 403):
        return DownloadError(f"access to {what} refused ({status}): the token is missing, invalid or lacks access",
                             hint="log in with `hf auth login` or set HF_TOKEN")
    if isinstance(e, hf.OfflineModeIsEnabled) or (
        isinstance(e, hf.LocalEntryNotFoundError) and "outgoing traffic has been disabled" in str(e)
    ):
        return DownloadError(f"{what} is not in the Hugging Face cache and offline mode is on",
                             hint="unset HF_HUB_OFFLINE to download it")
    if isinstance(e, hf.LocalEntryNotFoundError):
        return DownloadError(f"cannot reach {host} (no network?) and {what} is not in the cache",
                             hint="check the connection, or HF_ENDPOINT if you use a mirror")
    if isinstance(e, hf.HfHubHTTPError):
        return DownloadError(f"the hub answered {status} for {what}; try again later")
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return DownloadError(f"the disk filled up while downloading {what} into {cache_dir()}",
                             hint="free some space, or point HF_HUB_CACHE (or HF_HOME) at a bigger disk")
    if isinstance(e, OSError) and "Consistency check failed" in str(e):
        return DownloadError(f"the download of {what} was cut short (size mismatch); run the command again")
    if _is_network_error(e, connect_only=True):
        return DownloadError(f"cannot reach {host} (no network?): {_first_line(e)}",
                             hint="check the connection (or HF_ENDPOINT for a mirror); cached files work offline")
    if _is_network_error(e):
        return DownloadError(f"network error while downloading {what} from {host}: {_first_line(e)}",
                             hint="run the command again")
    if isinstance(e, OSError):
        return DownloadError(f"cannot write {what} into {cache_dir()}: {e.strerror or _first_line(e)}")
    if isinstance(e, ValueError):
        return DownloadError(f"bad model reference {what}: {_first_line(e)}")
    return DownloadError(f"unexpected answer from {host} for {what} ({type(e).__name__}: {_first_line(e)})",
                         hint="is HF_ENDPOINT a Hugging Face hub (or a mirror of one)?")


def _is_network_error(e: BaseException, *, connect_only: bool = False) -> bool:
    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - huggingface-hub < 2 uses httpx
        import httpx
    if connect_only:
        return isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionRefusedError))
    return isinstance(e, (httpx.TransportError, ConnectionError))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class _quiet_hub_logs:
    """huggingface-hub logs multi-line warnings when it resumes after a dropped connection; show one line."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            if "Trying to resume download" in msg:
                console(stderr=True).print("[yellow]connection dropped; resuming the download…[/]")
                return False
            return record.levelno >= logging.ERROR

    def __enter__(self):
        self._logger = logging.getLogger("huggingface_hub")
        self._filter = self._Filter()
        self._logger.addFilter(self._filter)
        for h in self._logger.handlers:
            h.addFilter(self._filter)
        return self

    def __exit__(self, *exc):
        self._logger.removeFilter(self._filter)
        for h in self._logger.handlers:
            h.removeFilter(self._filter)
        return False


class RichBar:
    """The part of tqdm's interface huggingface-hub uses (`tqdm_class=`), drawn by Rich on stderr."""

    label: str | None = None

    def __init__(self, *args, total=None, initial=0, desc=None, disable=False, **kwargs):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.n = initial
        self.total = total
        self.disable = disable
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=console(stderr=True), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.label or desc or "download", total=total, completed=initial)

    def update(self, n=1):
        self.n += n
        self._progress.update(self._task, advance=n)

    def set_description(self, desc=None, refresh=True):
        self._progress.update(self._task, description=desc or "")

    def refresh(self, *args, **kwargs):
        self._progress.refresh()

    def reset(self, total=None):
        self.n = 0
        self._progress.reset(self._task, total=total)

    def close(self):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _NoBar(RichBar):
    def __init__(self, *args, total=None, initial=0, **kwargs):
        self.n = initial
        self.total = total
        self._progress = None

    def update(self, n=1):
        self.n += n

    def set_description(self, desc=None, refresh=True):
        pass

    def refresh(self, *args, **kwargs):
        pass

    def reset(self, total=None):
        self.n = 0

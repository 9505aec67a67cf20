"""Shared fixtures: tiny random Llama checkpoints (MHA and GQA) written in Hugging Face format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Same default as the Makefile: the offline data mirror beside the checkout, when present.
_MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"
if "MORPHSERVE_DATA_MIRROR" not in os.environ and _MIRROR.is_dir():
    os.environ["MORPHSERVE_DATA_MIRROR"] = str(_MIRROR)

TINY = {
    # name: (heads, kv_heads, head_dim, tied)
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=False),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
}


def make_tiny_checkpoint(path: Path, kind: str, seed: int = 0, **overrides) -> Path:
    """A randomly initialised LlamaForCausalLM saved with save_pretrained, plus a small tokenizer (GPT-2 style
    byte-level BPE trained on the fly, so no download is needed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 max_position_embeddings=1024, **TINY[kind])
    cfg = LlamaConfig(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, **{**shape, **overrides})
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger-than-default weights so logits are far from ties and outputs vary
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "paged attention with continuous batching",
            "hello world, this is a tiny tokenizer for tests"] * 20
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(autouse=True)
def _heap_freeze_released():
    """Fails a test that leaves an engine's heap freeze held (an engine warmed up and not closed): its frozen
    objects, and every later test's, would never be collected.  The leftover references are released first, so
    one leak does not fail the tests after it."""
    yield
    from morphserve.engine import heap_freeze

    left = heap_freeze.holders()
    for _ in range(left):
        heap_freeze.release()
    if left:
        pytest.fail(f"{left} heap-freeze reference(s) left held: close the engines that called warmed_up()")


@pytest.fixture(scope="session", params=["mha", "gqa"])
def tiny_checkpoint(request, tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{request.param}"), request.param)


@pytest.fixture(scope="session")
def tiny_mha(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-mha"), "mha")

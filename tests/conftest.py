"""Shared test fixtures: tiny random models for every adapter, and a saved tiny model folder.

`tiny_model(model_type)` is the one helper other test modules should use for structural tests:
it builds a two-layer, float32, eval-mode model of the given architecture from a fixed seed, with
every parameter (biases and norms included) re-drawn at random, so a test that keeps the wrong
rows or drops a bias changes the logits instead of passing by accident on zero-initialised
weights. Tests import it with `from tests.conftest import tiny_model` or use the `make_tiny_model`
fixture.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

# Set before torch starts its thread pools: 1 thread is fast and reproducible on 2-core machines
# (docs/architecture.md, "Findings"), and subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from prunenet.analysis.selfgen import SelfGenConfig
from prunenet.core.arch import supported_model_types

torch.set_num_threads(1)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

SEED = 1234
VOCAB_SIZE = 64
HIDDEN_SIZE = 16
NUM_LAYERS = 2
FFN_WIDTH = 24  # set explicitly where the config has a field; GPT-2 and Falcon use 4 x hidden
SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

_DECODER = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 2,
    "max_position_embeddings": 64,
    **SPECIAL_TOKENS,
}
_GQA = {**_DECODER, "num_key_value_heads": 1, "intermediate_size": FFN_WIDTH}
_GEMMA = {**_GQA, "head_dim": 8}

# model_type -> config keyword arguments. Every adapter in prunenet.core.arch.ADAPTERS needs a row;
# test_arch checks that the two lists agree.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": _GQA,
    "mistral": _GQA,
    "qwen2": _GQA,
    "qwen3": {**_GQA, "head_dim": 8},
    "gemma": _GEMMA,
    "gemma2": _GEMMA,
    "gemma3_text": _GEMMA,
    "gemma3": {
        "text_config": _GEMMA,
        "vision_config": {
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        "mm_tokens_per_image": 4,
        "boi_token_index": 61,
        "eoi_token_index": 62,
        "image_token_index": 63,
    },
    "phi": {**_DECODER, "intermediate_size": FFN_WIDTH},
    "phi3": _GQA,
    "opt": {**_DECODER, "ffn_dim": FFN_WIDTH, "word_embed_proj_dim": HIDDEN_SIZE},
    # n_inner=None exercises the adapter's "4 x n_embd" default width.
    "gpt2": {
        "vocab_size": VOCAB_SIZE,
        "n_embd": HIDDEN_SIZE,
        "n_layer": NUM_LAYERS,
        "n_head": 2,
        "n_positions": 64,
        "n_inner": None,
        **SPECIAL_TOKENS,
    },
    "gpt_neox": {**_DECODER, "intermediate_size": FFN_WIDTH},
    "falcon": {**_DECODER, "bias": True},
}

ALL_MODEL_TYPES = supported_model_types()


def tiny_config(model_type: str, **overrides: Any):
    """A tiny config of `model_type` (two layers, hidden 16) with `overrides` applied."""
    if model_type not in TINY_CONFIGS:
        raise KeyError(f"No tiny config for {model_type!r}; add one to tests/conftest.py.")
    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = SEED, **overrides: Any) -> PreTrainedModel:
    """A tiny random float32 causal LM of `model_type` in eval mode, identical for equal seeds.

    Every parameter is redrawn from N(0, 0.3²): the library initialisers set biases to zero and
    norms to one, which would hide a bias cut at the wrong indices.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.float().eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary, built offline (no hub access)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB_SIZE)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


# 4 layers, 4 query heads in 2 KV groups of 2: FFN rows, heads and layers all have room to go.
ROOMY_GQA = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 4}  # fmt: skip


def start_token_text(sequences: int = 16, length: int = 12) -> torch.Tensor:
    """Random ids shaped like self-generated text: every sequence begins with the start token."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, VOCAB_SIZE, (sequences, length), generator=generator)
    tokens[:, 0] = 1
    return tokens


def sample_input_ids(seed: int = 0, length: int = 12) -> torch.Tensor:
    """A fixed batch of two token sequences that avoids the special and image tokens."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB_SIZE - 4, (2, length), generator=generator)


@torch.no_grad()
def logits_of(model: PreTrainedModel, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids if input_ids is not None else sample_input_ids()).logits


@pytest.fixture
def make_tiny_model():
    """The `tiny_model` factory as a fixture, for modules that prefer not to import conftest."""
    return tiny_model


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama with tokenizer, as `save_pretrained` writes it. Treat as read-only."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# Self-generated text small enough for tiny models and fast tests.
SMALL_SELFGEN = SelfGenConfig(sequences=2, length=16, kept_tokens=16)


@pytest.fixture
def no_disk_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a test's self-generated analyses out of the on-disk cache (and away from stale ones)."""
    monkeypatch.setenv("PRUNENET_NO_CACHE", "1")


def load_script(name: str):
    """Import `scripts/<name>.py` as a module (scripts are not a package), for one test module.

    Registered in `sys.modules` while in use because dataclasses look their module up there.
    """
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test ends with torch back on one thread: `prunenet.prune` runs a request on every
    usable core by default (`PruneRequest.threads`), and the next test in the same process must
    not inherit that."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def private_prunenet_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> None:
    """Every test gets an empty PruneNet cache: tests never write to (or read stale entries
    from) the user's ~/.cache/prunenet, and one test's cached text cannot hide another's."""
    monkeypatch.setenv("PRUNENET_CACHE", str(tmp_path_factory.mktemp("prunenet-cache")))

"""Shared fixtures: tiny random models of each supported family, and the real default model."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

REAL_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for getting better sleep.",
    "Write a Python function that returns the factorial of n.",
]


def pytest_configure(config):
    """ProPD's chooser memory of this session only (``$PROPD_MEMORY``, inherited by the CLI's
    subprocesses): a test starts from no earlier run's learning, and leaves none in the user's cache."""
    os.environ["PROPD_MEMORY"] = tempfile.mkdtemp(prefix="propd-memory-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.pop("PROPD_MEMORY"), ignore_errors=True)


def pytest_collection_modifyitems(items):
    """Tests that load the real default model (a fixture, or the CLI in a subprocess) are ``slow``:
    ``pytest -m "not slow"`` runs the rest in a fraction of the time; ``make test`` runs all."""
    for item in items:
        code = getattr(getattr(item, "function", None), "__code__", None)
        if {"default_model", "reference_model"} & set(item.fixturenames) or (code is not None and "run_cli" in code.co_names):
            item.add_marker(pytest.mark.slow)


def tiny_hf_model(family: str = "llama", seed: int = 0, vocab: int = 96, layers: int = 3, **config):
    """A randomly initialised transformers model small enough to run in milliseconds (``config``:
    more of the config's fields, e.g. ``tie_word_embeddings=True``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[family]
    torch.manual_seed(seed)
    config = config_cls(**{**common, **config})
    model = model_cls(config).eval()
    with torch.no_grad():  # larger weights than the default init so that greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif "bias" in str(p):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def default_model():
    """The default model as ``make run`` loads it: the fastest exact route measured on this machine."""
    from propd.engine import Propd

    return Propd.from_pretrained("default")


@pytest.fixture(scope="session")
def reference_model():
    """The default model with plain fp32 products, the way transformers computes it."""
    from propd.engine import Propd
    from propd.models.kernels import autograd_route

    return Propd.from_pretrained("default", route=autograd_route(torch.float32))

"""Shared fixtures: tiny models built offline, trained once per session and cached."""

from __future__ import annotations

import gc
import random

import numpy as np
import pytest
import torch

WORDS = ("the a cat dog sat ran on in park mat bird sang while and over under house tree river "
         "blue red green small large quickly slowly").split()


@pytest.fixture(scope="module", autouse=True)
def _freeze_long_lived_objects():
    """Move every object alive when a test module starts (the imported libraries: torch,
    transformers, nnsight, ... about half a million objects) out of the cyclic garbage collector's
    reach, so a full collection scans only what the tests create. kronfluence collects after each
    of its stages (`kronfluence.utils.state.release_memory`): 0.25 s per collection otherwise,
    half the time of the EK-FAC tests. Reference counting still frees frozen objects; only their
    cycles wait for the end of the run."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def small_texts() -> list[str]:
    """40 short random sentences."""
    return _texts(40)


@pytest.fixture(scope="session")
def tiny_tokenizer(small_texts):
    from stride_nnsight.toy import train_tokenizer

    return train_tokenizer(small_texts + ["The capital of Veldoria is Quarnith."], vocab_size=300)


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_tokenizer):
    """An untrained 2-layer GPT-2 (d_model 32), eval mode, dropout 0."""
    from transformers import GPT2LMHeadModel

    from stride_nnsight.toy import tiny_gpt2_config

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(tiny_tokenizer, n_layer=2, n_embd=32, n_head=2, n_positions=64))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model(tiny_hf_model, tiny_tokenizer):
    """The untrained tiny GPT-2 wrapped as an nnsight TransformersModel."""
    from nnsight import TransformersModel

    return TransformersModel(tiny_hf_model, tokenizer=tiny_tokenizer, task="text-generation")


@pytest.fixture(scope="session")
def toy_cache_dir(tmp_path_factory):
    """Per-session cache of the bundled toy model (shared with the notebooks and the demo)."""
    return tmp_path_factory.mktemp("toy-cache")


@pytest.fixture(scope="session")
def toy(toy_cache_dir):
    """(nnsight model, ToyCorpus) of the bundled setting, trained once per session."""
    from stride_nnsight.toy import toy_language_model

    return toy_language_model(seed=0, cache_dir=toy_cache_dir)

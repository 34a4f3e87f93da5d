"""Shared fixtures: tiny random-init families that build and run in milliseconds."""

from __future__ import annotations

import signal

import pytest
import torch

import snnet

# The test machine has 2 cores shared with other work; one thread avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_as_in_a_terminal():
    """Run the suite with Python's own Ctrl-C handler wherever it was started.

    A shell starts a background job (``pytest &``, ``nohup pytest &``) with SIGINT ignored, and Python
    keeps an ignored signal ignored; the tests of Ctrl-C check that training puts back the handler it
    found, which would then be "ignore". Restored when the session ends; processes the tests start
    inherit Python's default disposition, as from a terminal.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

TINY_VITS = ["snnet_tiny_vit_ti", "snnet_tiny_vit_s", "snnet_tiny_vit_b"]


@pytest.fixture
def tiny_net() -> snnet.StitchedNet:
    torch.manual_seed(0)
    return snnet.create_snnet(TINY_VITS)


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 32, 32, generator=g)


# ------------------------------------------------------------------ tiny language models (tests/test_lm*.py)

LM_TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    '''A point in the plane.'''\n\n"
           "    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n") * 4


def lm_tokenizer(extra: str = ""):
    """A byte-level BPE tokenizer of 300 tokens trained on LM_TEXT (+ ``extra``), end-of-text id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([LM_TEXT + extra], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def lm_config(family: str, width: int, depth: int, vocab: int, extra_rows: int):
    """A tiny random-init transformers config of ``family`` (gpt2, pythia, qwen2.5, smollm2, llama3.2), 64 positions."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(bos_token_id=0, eos_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_embd=width, n_layer=depth, n_head=4, n_positions=64, vocab_size=vocab, **common)
    if family == "pythia":  # padded embedding matrices, as Pythia's members pad theirs differently
        return GPTNeoXConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=4, intermediate_size=2 * width,
                             vocab_size=vocab + extra_rows, rotary_pct=0.25, max_position_embeddings=64, **common)
    if family == "qwen2.5":
        return Qwen2Config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab + extra_rows, tie_word_embeddings=extra_rows == 0,
                           max_position_embeddings=64, **common)
    scaling = ({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16} if family == "llama3.2" else None)
    return LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=64,
                       rope_scaling=scaling, rope_theta=500000.0 if scaling else 100000.0, **common)


# ------------------------------------------------------------------ two processes (tests of DDP)

SPAWN_TIMEOUT = 120


def free_port() -> int:
    """A TCP port free on this machine now (for a process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(worker, *args) -> None:
    """Run ``worker(rank, 2, port, *args)`` on two processes (with a timeout, so a DDP hang fails instead of blocking)."""
    import time

    import torch.multiprocessing as mp

    world = 2
    ctx = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"two-process DDP run hung for {SPAWN_TIMEOUT}s")

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

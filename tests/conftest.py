"""Shared fixtures: tiny random-init families that build and run in milliseconds."""

from __future__ import annotations

import pytest
import torch

import snnet

# The test machine has 2 cores shared with other work; one thread avoids oversubscription.
torch.set_num_threads(1)

TINY_VITS = ["snnet_tiny_vit_ti", "snnet_tiny_vit_s", "snnet_tiny_vit_b"]


@pytest.fixture
def tiny_net() -> snnet.StitchedNet:
    torch.manual_seed(0)
    return snnet.create_snnet(TINY_VITS)


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 32, 32, generator=g)

"""Shared fixtures and helpers: tiny random-init families that build and run in milliseconds,
synthetic data and image folders, running the command line. Test modules import helpers from
here, never from one another."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import snnet
from snnet.config import TrainConfig

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


# ------------------------------------------------------------------ networks, data and runs


class Synthetic(TensorDataset):
    """A learnable task: each class is a fixed random template plus noise."""

    def __init__(self, n: int = 96, classes: int = 10, size: tuple[int, ...] = (3, 32, 32), seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        templates = torch.randn(classes, *size, generator=g)
        y = torch.arange(n) % classes
        super().__init__(templates[y] + 0.5 * torch.randn(n, *size, generator=g), y)
        self.num_classes = classes


def cfg(tmp_path: Path, **kw) -> TrainConfig:
    """A small run's settings; settings named by their leaf name, the learning rate as used (not scaled)."""
    base = dict(epochs=1, batch_size=8, out_dir=str(tmp_path / "run"), progress=False, tensorboard=False,
                init_images=16, log_every=5, ckpt_every=0, lr=5e-5, lr_base_batch=None)
    return TrainConfig().override(**{**base, **kw})


def fresh_net(seed: int = 0, **space) -> snnet.StitchedNet:
    torch.manual_seed(seed)
    return snnet.create_snnet(TINY_VITS[:2], **space)


def seeded_net(**kw) -> snnet.StitchedNet:
    """A family built at seed 0: the three tiny ViTs unless ``anchors=`` says otherwise."""
    torch.manual_seed(0)
    return snnet.create_snnet(kw.pop("anchors", TINY_VITS), **kw)


def fitted_net(**kw) -> snnet.StitchedNet:
    """Least-squares layers, then a nudge, so that every layer and stitch computes something different."""
    net = seeded_net(**kw)
    net.init_stitching([torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))], max_images=16)
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for layer in net.stitch_layers:
            for p in ([layer.lora_a, layer.lora_b] if layer.rank else [layer.proj.weight]):
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def route_kind(net: snnet.StitchedNet, s: snnet.Stitch) -> str:
    """A route as the anchors it runs through, S(mall) and L(arge): ``S-L-S`` for a round trip."""
    return "-".join("SL"[a] for a in s.anchors)



def _by_hand(net: snnet.StitchedNet, s: snnet.Stitch, x: torch.Tensor) -> torch.Tensor:
    h = net.anchors[s.segments[0].anchor].stem(x)
    for k, seg in enumerate(s.segments):
        if k:
            h = net.stitch_layers[s.layers[k - 1]](h)
        for blk in net.anchors[seg.anchor].blocks[seg.start:seg.stop]:
            h = blk(h)
    return net.anchors[s.segments[-1].anchor].head(h)


def _params(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _batches(n: int = 24, batch: int = 16, size: int = 32, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _naive(net: snnet.StitchedNet, batches, stitch) -> tuple[float, float, float]:
    """Reference: select the stitch and run the whole network, the way a user would."""
    net.select(stitch)
    hit1 = hit5 = 0
    loss = 0.0
    n = 0
    with torch.no_grad():
        for x, y in batches:
            logits = net(x)
            top = logits.topk(5, dim=-1).indices
            hit1 += (top[:, 0] == y).sum().item()
            hit5 += (top == y[:, None]).any(-1).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            n += len(y)
    return 100 * hit1 / n, 100 * hit5 / n, loss / n


def _run(args: list[str]) -> int:
    """``snnet ARGS`` in this process; its exit code."""
    from snnet.cli import main

    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _cli(*args: str) -> int:
    """:func:`_run` with the arguments spread out."""
    return _run(list(args))


def _one_line(err: str) -> str:
    """The one line ``error: ...`` a refused command prints (no traceback); fails the test otherwise."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved 3-class stitched network of two tiny ViTs (32x32 RGB)."""
    root = tmp_path_factory.mktemp("tiny3")
    torch.manual_seed(0)
    snnet.create_snnet(TINY_VITS[:2], num_classes=3).save_pretrained(root / "net")
    return root / "net"



# ------------------------------------------------------------------ image folders and files


def _folder(root: Path, classes: int = 3, per_class: int = 3, mode: str = "RGB", size: int = 32) -> Path:
    """``root/class<c>/<i>.png``: distinct random images, ``per_class`` per class."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels, mode=mode).save(root / f"class{c}" / f"{i}.png")
    return root


def _image_folder(root: Path, classes: int = 10, per_class: int = 2) -> Path:
    """Ten classes of two RGB images: a training run's small folder."""
    return _folder(root, classes, per_class)


def _damage(root: Path) -> tuple[Path, Path]:
    """A JPEG with 16 bytes of its header zeroed and a PNG cut after 100 bytes, among good images."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "JPEG")
    raw = buf.getvalue()
    corrupt, truncated = root / "class1" / "9-corrupt.jpg", root / "class2" / "9-truncated.png"
    corrupt.write_bytes(raw[:20] + bytes(16) + raw[36:200])
    truncated.write_bytes((root / "class2" / "0.png").read_bytes()[:100])
    return corrupt, truncated


def _refuse_listing(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make listing ``folder`` fail as a chmod-000 folder does for anyone but root."""
    scandir = os.scandir

    def refusing(path=".", *args):
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(folder))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", refusing)
    return folder


def _png(size=(32, 32), mode="RGB", seed=0) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    chans = len(mode)
    arr = torch.randint(0, 256, (size[1], size[0], chans), generator=g, dtype=torch.uint8).squeeze(-1).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _traces(html: str) -> list[dict]:
    """The figure's traces, as plotly wrote them into the page."""
    start = re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*', html)
    assert start, "no Plotly.newPlot call in the HTML"
    data, _ = json.JSONDecoder().raw_decode(html, start.end())
    return data


# ------------------------------------------------------------------ serving

TOKEN = "test-admin-token-" + "x" * 16


def _synthetic_rows(net: snnet.StitchedNet) -> list[dict]:
    """Result rows with a latency table that grows with FLOPs (no profiling in tests)."""
    rows = []
    for c in net.costs():
        per_image = c.flops / 2e5
        rows.append(dict(c.to_dict(), latency_by_batch=[{"batch_size": b, "latency_ms": 0.5 + per_image * b,
                                                         "latency_p90_ms": 0.6 + per_image * b} for b in (1, 2, 4, 8)]))
    return rows


def _until(ok: Any, seconds: float, what: str) -> None:
    """Poll ``ok()`` until it is true (a generous deadline: this machine may be busy)."""
    deadline = time.monotonic() + seconds
    while not ok():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class UvicornLog(logging.Handler):
    """The records of uvicorn's log meanwhile (``uvicorn.error``: the servers' lines and uvicorn's own, tracebacks
    included), read where they are logged: once uvicorn has configured its logging they stop at its ``uvicorn``
    logger (no propagation), short of the root logger caplog reads. Enter it after that (``uvicorn.Config`` does
    it), which drops the handlers it finds."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger("uvicorn.error")

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "UvicornLog":
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)

    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def tracebacks(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.exc_info]

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


@pytest.fixture
def uvicorn_log() -> Iterator[UvicornLog]:
    """uvicorn's log for the test's duration, entered after the module's server configured uvicorn's logging.
    Not caplog: pytest < 9.2 reads the root logger alone, which uvicorn's lines do not reach once it has (a test of
    a line's absence then passes whatever is logged)."""
    with UvicornLog() as log:
        yield log


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

"""Tiny random-init language-model families, for tests, examples and benchmarks without a download.

:func:`tiny_tokenizer` trains a byte-level BPE tokenizer (HF ``tokenizers``) of a few hundred tokens
on a text in milliseconds and gives it a plain chat template; :func:`tiny_lm` builds a family of
GPT-2 decoders of a few layers from transformers' own ``GPT2Config`` (random weights) that share it,
stitched into one :class:`~snnet.families.causal_lm.StitchedLM`. Their text is noise: they exist so
that the real paths (generation, serving, saving) run in milliseconds, as :mod:`snnet.tiny` does
for image models.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .causal_lm import StitchedLM, create_stitched_lm

__all__ = ["CHAT_TEMPLATE", "TINY_TEXT", "tiny_lm", "tiny_tokenizer"]

TINY_TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    '''A point in the plane.'''\n\n"
             "    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n") * 4
# role: content lines, then "assistant:" for the reply: enough to exercise /v1/chat/completions
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def tiny_tokenizer(text: str = TINY_TEXT, vocab_size: int = 300, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer trained on ``text`` with one special token, ``<|endoftext|>`` (id 0,
    also BOS and EOS, as GPT-2's); every byte is in its alphabet, so it encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def tiny_lm(sizes: Sequence[tuple[int, int]] = ((32, 2), (48, 4)), *, tokenizer: Any = None, positions: int = 64,
            seed: int = 0) -> StitchedLM:
    """A stitched family of GPT-2 decoders, one per ``(width, layers)`` (4 heads each), at random
    init from ``seed``, sharing ``tokenizer`` (default :func:`tiny_tokenizer`), with ``positions``
    positions of context (also the context its FLOPs are stated at)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = [AutoModelForCausalLM.from_config(GPT2Config(n_embd=w, n_layer=d, n_head=4, n_positions=positions,
                                                              vocab_size=len(tok), bos_token_id=0, eos_token_id=0))
                  for w, d in sizes]
        net = create_stitched_lm(models, labels=[f"tiny-gpt2-{w}x{d}" for w, d in sizes], tokenizer=tok, context=positions)
    return net.eval()

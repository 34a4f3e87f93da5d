"""Stitchable language models: the public API in one place (importing it needs transformers).

    import snnet.lm as lm
    net = lm.create_stitched_lm("pythia-160m,pythia-410m,pythia-1b", weights=True, load_tokenizers=True)
    net.init_stitching(lm.text_loader(blocks, 8))            # least squares on calibration text
    net.select("pythia-160m[:6]+pythia-410m[12:]")
    print(lm.generate(net, "def fib(n):", options=lm.GenerationOptions(max_new_tokens=32)).text)

Importing this module also registers the exported-route model with transformers, so a folder
written by :func:`export_route` loads with ``AutoModelForCausalLM.from_pretrained(folder)``.
``docs/language-models.md`` walks through all of it.
"""

from .families.causal_lm import DEFAULT_CONTEXT, LMParts, RouteCache, StitchedLM, create_stitched_lm, split_lm
from .families.lm_catalog import LMSpec, check_tokenizers, lm_families, member_config, resolve_lm
from .families.lm_hf import SnnetRouteForCausalLM, StitchedLMForCausalLM, as_transformers, export_route
from .generate import Generated, GenerationOptions, generate
from .lm_eval import evaluate_lm, format_lm_results
from .text import (ByteTokenizer, TokenBlocks, corpus_fingerprint, split_documents, stdlib_root, stdlib_sources, text_files,
                   text_loader, token_blocks)

__all__ = [
    "DEFAULT_CONTEXT", "ByteTokenizer", "Generated", "GenerationOptions", "LMParts", "LMSpec", "RouteCache",
    "SnnetRouteForCausalLM", "StitchedLM", "StitchedLMForCausalLM", "TokenBlocks", "as_transformers", "check_tokenizers",
    "create_stitched_lm", "evaluate_lm", "export_route", "format_lm_results", "generate", "lm_families", "member_config",
    "corpus_fingerprint", "resolve_lm", "split_documents", "split_lm", "stdlib_root", "stdlib_sources", "text_files",
    "text_loader", "token_blocks",
]

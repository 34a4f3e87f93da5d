"""One module per kind of anchor snnet can split and stitch.

The vision families still live in :mod:`snnet.anchors` and :mod:`snnet.adapters`; decoder
language models from Hugging Face transformers live here (:mod:`snnet.families.causal_lm`,
with the named families in :mod:`snnet.families.lm_catalog` and the transformers-facing
classes in :mod:`snnet.families.lm_hf`).
"""

"""Describe the default language-model corpus: this Python's standard library source.

    python scripts/lm_corpus.py            # files, bytes, the held-out split, the fingerprint
    python scripts/lm_corpus.py --block 256 --tokenizer bytes

Prints what snnet.text reads, so a training run or an evaluation can say exactly which text it
used (the standard library differs between Python versions; the fingerprint names the files).
"""

from __future__ import annotations

import argparse
import sys

from snnet.text import ByteTokenizer, corpus_fingerprint, split_documents, stdlib_root, stdlib_sources, token_blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--held-out", type=float, default=0.1, help="share of files held out (by path hash)")
    ap.add_argument("--block", type=int, default=0, help="also cut the held-out files into blocks of this many "
                                                         "predicted tokens (byte tokenizer)")
    args = ap.parse_args()
    root = stdlib_root()
    files = stdlib_sources()
    train, val = split_documents(files, root, args.held_out)
    size = {name: sum(p.stat().st_size for p in group) for name, group in (("train", train), ("held-out", val))}
    print(f"python {sys.version.split()[0]} standard library at {root}")
    print(f"{len(files)} .py files, {sum(size.values()):,} bytes; fingerprint {corpus_fingerprint(files, root)}")
    print(f"train {len(train)} files ({size['train']:,} bytes), held out {len(val)} files ({size['held-out']:,} bytes)")
    if args.block:
        blocks = token_blocks(val, ByteTokenizer(), args.block)
        print(f"held out as {len(blocks)} blocks of {args.block} predicted bytes ({blocks.tokens:,} predictions)")


if __name__ == "__main__":
    main()

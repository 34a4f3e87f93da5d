"""The shipped language-model family (stdlib-lm), the script that trains it, and ``snnet demo --lm``.

The family's files are read as a user gets them: by snnet name through transformers'
``AutoModelForCausalLM.from_pretrained`` of the shipped folder; the card's held-out figures are
measured again; the script and the demo run as real commands with tiny settings.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import snnet.lm as lm  # noqa: E402
from snnet.errors import SnnetError  # noqa: E402
from .conftest import _cli, _one_line  # noqa: E402
from snnet.lm_family import (CONTEXT, EOS, STDLIB_LM_ARCHS, family_dir, score_lm, tokenizer_fingerprint,  # noqa: E402
                             train_tokenizer)

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
FAMILY = json.loads((family_dir() / "family.json").read_text())


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


# ------------------------------------------------------------------ the tokenizer


def test_tokenizer_is_byte_level_deterministic_and_ends_documents(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def add(a, b):\n    return a + b\n" * 20)
    b.write_text("class Point:\n    '''A point, naïve — ünïcode.'''\n" * 20)
    first, second = train_tokenizer([a, b], 300), train_tokenizer([a, b], 300)
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)  # same files, same tokenizer
    assert len(first) == 300 and first.eos_token == EOS and first.eos_token_id == 0 == first.bos_token_id
    text = "x = '日本' + \x00 + 'never seen'\n"  # bytes never in the training text still encode
    assert first.decode(first(text)["input_ids"]) == text
    with pytest.raises(SnnetError, match="more than 257"):
        train_tokenizer([a], 100)


def test_shipped_tokenizer_is_the_one_the_card_records() -> None:
    folders = [family_dir() / name for name in STDLIB_LM_ARCHS]
    toks = [AutoTokenizer.from_pretrained(str(f)) for f in folders]
    assert {tokenizer_fingerprint(t) for t in toks} == {FAMILY["tokenizer"]["fingerprint"]}
    assert len(toks[0]) == FAMILY["tokenizer"]["vocab_size"]


# ------------------------------------------------------------------ the shipped members


def test_members_load_by_snnet_name_through_from_pretrained() -> None:
    for name, arch in STDLIB_LM_ARCHS.items():
        spec = lm.resolve_lm(name)
        assert Path(spec.source) == family_dir() / name and spec.is_local and spec.member == name
        model = AutoModelForCausalLM.from_pretrained(spec.source)
        assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
        c = model.config
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == \
            (arch.hidden, arch.layers, arch.heads, arch.intermediate)
        assert c.max_position_embeddings == CONTEXT and c.eos_token_id == 0
        assert sum(p.numel() for p in model.parameters()) == FAMILY["models"][name]["params"]
        assert lm.member_config(name)["hidden_size"] == arch.hidden
    files = [p for p in family_dir().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 12e6  # a few MB in the wheel


def test_card_figures_are_measured_again() -> None:
    """The smallest member's held-out figures, recomputed from the shipped folder, are the card's."""
    name = "stdlib-lm-s"
    folder = lm.resolve_lm(name).source
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    train, held = lm.split_documents(lm.stdlib_sources(), lm.stdlib_root(), FAMILY["corpus"]["held_out_share"])
    if lm.corpus_fingerprint(held, lm.stdlib_root()) != FAMILY["corpus"]["held_out_fingerprint"]:
        pytest.skip("this Python's standard library is not the one the family was measured on")
    blocks = lm.token_blocks(held, tok, CONTEXT, max_blocks=FAMILY["eval_blocks"])
    got = score_lm(model, blocks)
    want = FAMILY["models"][name]["held_out"]
    assert got["tokens"] == FAMILY["eval_tokens"] and got["bytes"] == FAMILY["eval_bytes"]
    assert got["bpb"] == pytest.approx(want["bpb"], abs=2e-4) and got["ppl"] == pytest.approx(want["ppl"], rel=1e-3)


def test_family_spans_an_order_of_magnitude_and_orders_by_quality() -> None:
    rows = [FAMILY["models"][n] for n in STDLIB_LM_ARCHS]
    flops = [r["flops"] for r in rows]
    assert flops == sorted(flops) and 8 <= flops[-1] / flops[0] <= 15
    bpb = [r["held_out"]["bpb"] for r in rows]
    assert bpb == sorted(bpb, reverse=True)  # the dearer, the better


def test_stitches_lists_the_family_space(capsys: pytest.CaptureFixture) -> None:
    from snnet.cli import main

    main(["stitches", "--anchors", "stdlib-lm", "--context", str(CONTEXT), "--json"])
    rows = json.loads(capsys.readouterr().out)
    anchors = [r for r in rows if r["is_anchor"]]
    assert [r["name"] for r in anchors] == list(STDLIB_LM_ARCHS)
    assert [r["params"] for r in anchors] == [FAMILY["models"][n]["params"] for n in STDLIB_LM_ARCHS]
    assert [r["flops"] for r in anchors] == [FAMILY["models"][n]["flops"] for n in STDLIB_LM_ARCHS]
    assert len(rows) > 3


# ------------------------------------------------------------------ the commands


@pytest.mark.slow
def test_family_script_trains_a_member_through_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, runs = tmp_path / "lm", tmp_path / "runs"
    r = _run("scripts/train_lm_family.py", "--schedule.max_steps", "2", "--data.limit", "40",
             "--data.batch_size", "4", "--family.models", "[stdlib-lm-s]", "--family.out", str(out),
             "--family.runs", str(runs), "--family.eval_blocks", "2", "--family.vocab_size", "300")
    assert r.returncode == 0, r.stderr[-2000:]
    family = json.loads((out / "family.json").read_text())
    row = family["models"]["stdlib-lm-s"]
    assert row["steps"] == 2 and row["tokens_trained"] == 2 * 4 * CONTEXT
    assert family["tokenizer"]["vocab_size"] == 300 and family["eval_blocks"] == 2
    assert "train_lm_family.py" in row["command"] and family["corpus"]["train_files"] > family["corpus"]["held_out_files"]
    model = AutoModelForCausalLM.from_pretrained(str(out / "stdlib-lm-s"))  # the member as users get it
    assert model.config.vocab_size == 300
    # it trained through snnet's loop: the run's metrics, one line per step
    assert (runs / "stdlib-lm-s" / "metrics.jsonl").read_text().count("\n") == 2
    # a bad member is one line (the script as __main__ in this process: a second one would import torch again)
    monkeypatch.setattr(sys, "argv", ["train_lm_family.py", "--family.models", "[stdlib-lm-xl]", "--family.out", str(out)])
    with pytest.raises(SystemExit) as bad:
        runpy.run_path(str(ROOT / "scripts" / "train_lm_family.py"), run_name="__main__")
    assert str(bad.value.code).startswith("error: unknown member(s) stdlib-lm-xl") and "\n" not in str(bad.value.code)


@pytest.mark.slow
def test_lm_demo_runs_as_a_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    # --quick, measured on 2 held-out blocks and continuing for 4 tokens (the quick mode's 8 and 8 add seconds, no check)
    r = _run("-m", "snnet", "demo", "--lm", "--quick", "--demo.eval_blocks", "2", "--demo.sample_tokens", "4",
             "--run.out_dir", str(out), "--run.progress", "false")
    assert r.returncode == 0, r.stderr[-2000:]
    printed = r.stdout
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "pareto.html", "pareto.png", "results.csv", "results.json", "summary.json"]
    rows = json.loads((out / "results.json").read_text())
    net = lm.create_stitched_lm("stdlib-lm", device="meta", context=CONTEXT)
    assert len(rows) == len(net.space) and [r["id"] for r in rows] == list(range(len(net.space)))
    assert all(r["bpb"] > 0 and r["ppl"] > 1 and r["task"] == "causal-lm" for r in rows)  # results.json flattens extra
    assert any(r["pareto"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["anchors_before"]) == set(STDLIB_LM_ARCHS)
    assert [s["role"] for s in summary["samples"]] == ["cheapest", "middle", "largest"]
    assert summary["config"]["train"]["task"] == "causal-lm"
    # the frontier line names the two networks around its widest gap, as the image demo's does
    (a, fa), (b, fb) = summary["widest_gap_between"]
    assert fa < fb and {a, b} <= {r["name"] for r in rows} and f"{a} (" in printed and f"to {b} (" in printed
    assert (out / "train" / "metrics.jsonl").read_text().count("\n") == 4  # --quick: 4 steps through the loop
    assert "bits/byte" in printed and "Greedy continuations" in printed and "frontier" in printed
    assert f"{len(rows)} networks on {2 * CONTEXT} tokens" in printed  # --demo.eval_blocks 2 beside --quick
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the tree's spelling is the same demo; a bad option is one line (in this process: the command ran above)
    capsys.readouterr()
    assert _cli("demo", "--task", "causal-lm", "--print-config") == 0
    assert "anchors: stdlib-lm" in capsys.readouterr().out
    assert _cli("demo", "--lm", "--demo.eval_blocks", "0") == 2
    assert "eval_blocks" in _one_line(capsys.readouterr().err)


def test_lm_demo_refuses_samples_longer_than_the_context_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """demo.sample_tokens that would read past the anchors' positions fail in one line before any training, not at
    the samples after minutes of it (with the results written and summary.json not)."""
    import snnet.train
    from snnet.errors import ConfigError
    from snnet.lm_demo import LMDemoOptions, lm_demo_config, run_lm_demo

    def trained(*args, **kwargs):
        raise AssertionError("the demo trained before refusing its settings")

    monkeypatch.setattr(snnet.train, "train", trained)
    config = lm_demo_config(max_steps=2, limit=64, out_dir=str(tmp_path / "demo"), progress=False)
    with pytest.raises(ConfigError, match="demo.sample_tokens") as e:
        run_lm_demo(config, LMDemoOptions(eval_blocks=2, sample_tokens=CONTEXT + 1), echo=lambda _: None)
    assert "\n" not in str(e.value) and not (tmp_path / "demo" / "results.json").exists()


def test_saving_a_member_in_float16_leaves_the_callers_weights_as_they_were(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from snnet.lm_family import LMArch, llama_config, save_member

    tok = train_tokenizer([ROOT / "snnet" / "text.py"], vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(LMArch(24, 2, 2, 64), tok, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder = save_member(model, tok, tmp_path / "m")
    # was rounded to float16 and cast back: the model in memory no longer what it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    back = AutoModelForCausalLM.from_pretrained(str(folder))
    assert all(torch.equal(v, before[k].half().float()) for k, v in back.state_dict().items())  # the file: float16

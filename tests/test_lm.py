"""Stitchable language models on tiny random-init configs of every supported family.

Each family is built from transformers' own config classes (GPT2Config, GPTNeoXConfig,
Qwen2Config, LlamaConfig with and without Llama 3's rope scaling), saved with save_pretrained
and loaded back through AutoModelForCausalLM.from_pretrained, with a tiny byte-level BPE
tokenizer saved beside each: the real loading path, without a download.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import snnet.lm as lm  # noqa: E402
from snnet.errors import (CheckpointError, NotStitchableError, SnnetError, StitchNotFoundError, UnknownModelError,  # noqa: E402
                          UnverifiedFileWarning)
from snnet.families.lm_catalog import check_token_ids, lm_families, member_config  # noqa: E402
from snnet.families.lm_hf import verify_export  # noqa: E402

from .conftest import LM_TEXT as TEXT, lm_config as _config, lm_tokenizer as _tokenizer  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

FAMILIES = ["gpt2", "pythia", "qwen2.5", "smollm2", "llama3.2"]
# (width, depth, extra embedding rows): 2 and 4 layers deep so the space has unpaired stitches too
SIZES = [(32, 2, 0), (48, 4, 16)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tokenizer()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer) -> dict[str, list[str]]:
    """Every tiny family saved as model folders (weights + tokenizer), as a user's downloads would be."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("lm")
    out = {}
    for fam in FAMILIES:
        out[fam] = []
        for k, (w, d, extra) in enumerate(SIZES):
            folder = root / f"{fam}-{k}"
            AutoModelForCausalLM.from_config(_config(fam, w, d, len(tokenizer), extra)).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            out[fam].append(str(folder))
    return out


@pytest.fixture(scope="module")
def nets(folders) -> dict[str, lm.StitchedLM]:
    return {fam: lm.create_stitched_lm(",".join(paths), weights=True, load_tokenizers=True, context=64).eval()
            for fam, paths in folders.items()}


def _ids(n: int = 2, t: int = 9, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ shipped configs


def test_shipped_configs_build_with_published_sizes():
    from transformers import AutoConfig

    published = {"gpt2": 124_439_808, "pythia-160m": 162_322_944, "qwen2.5-0.5b": 494_032_768,
                 "smollm2-135m": 134_515_008, "llama3.2-1b": 1_235_814_400}
    for fam in lm_families().values():
        configs = [AutoConfig.for_model(**member_config(m)) for m in fam.names]
        check_token_ids(configs, fam.names)  # one tokenizer per family: the same special tokens
        depths = [c.num_hidden_layers for c in configs]
        assert all(d > 0 for d in depths) and len(configs) >= 2
    for name, n in published.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**member_config(name)))
        assert sum(p.numel() for p in model.parameters()) == n, name


def test_cli_lists_pythia_space_from_shipped_configs(capsys):
    from snnet.cli import main

    main(["stitches", "--anchors", "pythia-160m,pythia-410m,pythia-1b", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows[:3]] == ["pythia-160m", "pythia-410m", "pythia-1b"]
    assert sum(r["is_anchor"] for r in rows) == 3
    # 12 -> 24 layers: every layer of the deeper but the first (23); 24 -> 16: the reverse mapping (22)
    assert len(rows) == 3 + 23 + 22
    assert rows[0]["params"] == 162_322_944
    flops = [r["flops"] for r in rows[:3]]
    assert flops == sorted(flops) and flops[0] > rows[0]["params"] * 0.8  # ~ one MAC per weight, plus attention


def test_cli_errors_are_one_line(capsys):
    from snnet.cli import main

    with pytest.raises(SystemExit) as e:
        main(["stitches", "--anchors", "pythia-16m,pythia-410m"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pythia-160m" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["stitches", "--anchors", "pythia-70m,pythia-160m", "--img-size", "224"])
    assert "--context" in capsys.readouterr().err


def test_default_context_is_capped_at_the_anchors_positions(capsys):
    """stdlib-lm knows 256 positions: its costs are stated at 256 by default, and a longer context is refused
    (no route could run it) with one line saying what to pass."""
    from snnet.cli import main

    main(["stitches", "--anchors", "stdlib-lm"])
    assert "at a 256-token context" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["stitches", "--anchors", "stdlib-lm", "--context", "1024"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "256 positions" in err and "--context 256" in err and "Traceback" not in err
    assert lm.create_stitched_lm("pythia-70m,pythia-160m", device="meta").context == 1024  # 2,048 positions: the default


# ------------------------------------------------------------------ the space and its costs


@pytest.mark.parametrize("fam", FAMILIES)
def test_anchor_routes_equal_the_models_and_params_are_sums(fam, nets, folders):
    net = nets[fam]
    ids = _ids()
    with torch.no_grad():
        for k, path in enumerate(folders[fam]):
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            net.select(Path(path).name)
            want = model(ids).logits[..., : net.vocab_size]
            torch.testing.assert_close(net(ids), want, rtol=0, atol=1e-6)
    assert len(net.space) == 2 + 3  # unpaired 2 -> 4 layers
    for s, cost in zip(net.space, net.costs()):
        route = net.route(s)
        unique = {id(p): p.numel() for m in route.modules() for p in m.parameters()}
        assert cost.params == sum(unique.values()), s.name
    assert net.vocab_size == 300  # the shared tokenizer's, below the padded heads of the larger anchor


@pytest.mark.parametrize("fam", FAMILIES)
def test_cached_greedy_generation_equals_uncached_forward(fam, nets):
    net = nets[fam]
    prompt = _ids(1, 5, seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    hf = lm.as_transformers(net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # wrapping changes no weight
    for s in net.space:
        net.select(s)
        with torch.no_grad():
            got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                              pad_token_id=0, temperature=None, top_p=None, top_k=None)[0, 5:].tolist()
            seq, want = prompt, []
            for _ in range(6):  # no cache: the whole sequence through the route every time
                nxt = net(seq)[0, -1].argmax()
                want.append(int(nxt))
                seq = torch.cat([seq, nxt.view(1, 1)], 1)
        assert got == want, s.name


def test_stitch_changes_between_requests_not_within(nets):
    net = nets["smollm2"]
    opts = lm.GenerationOptions(max_new_tokens=4)
    net.select(1)
    a = lm.generate(net, "def add", options=opts, stitch=0)
    b = lm.generate(net, "def add", options=opts, stitch=2)
    assert (a.stitch, b.stitch) == (net.space[0].name, net.space[2].name)
    assert net.active == net.space[1]  # the call's stitch does not stay selected
    net.select(0)
    cache = net.new_cache()
    net(_ids(1, 3), cache=cache)
    net.select(2)
    with pytest.raises(SnnetError, match="belongs to route"):
        net(_ids(1, 1), cache=cache)


@pytest.mark.parametrize("fam", ["gpt2", "pythia"])
def test_batched_generation_equals_one_prompt_at_a_time(fam, nets):
    """Prompts of different lengths are left-padded in a batch: positions follow the mask (GPT-2's
    learned positions, Pythia's rotary angles), so every row continues as it would alone."""
    net = nets[fam]
    prompts = ["def add(a, b):", "class"]
    opts = lm.GenerationOptions(max_new_tokens=5)
    for s in net.space:
        batch = lm.generate(net, prompts, options=opts, stitch=s)
        assert [b.tokens for b in batch] == [lm.generate(net, p, options=opts, stitch=s).tokens for p in prompts], s.name


def test_generation_options(nets):
    net = nets["qwen2.5"]
    opts = lm.GenerationOptions(max_new_tokens=5, temperature=0.9, top_p=0.8, seed=3)
    one, two = (lm.generate(net, ["def add", "class Point"], options=opts) for _ in range(2))
    assert [g.tokens for g in one] == [g.tokens for g in two]  # a seed repeats a sample
    # without a seed, sampling draws from (and advances) torch's global RNG, as transformers' generate does:
    # two calls differ, and torch.manual_seed before a call repeats it
    hot = lm.GenerationOptions(max_new_tokens=8, temperature=5.0)
    torch.manual_seed(11)
    first, second = (lm.generate(net, "def add", options=hot).tokens for _ in range(2))
    torch.manual_seed(11)
    assert first != second and lm.generate(net, "def add", options=hot).tokens == first
    assert all(len(g.tokens) <= 5 for g in one)
    greedy = lm.generate(net, "class", options=lm.GenerationOptions(max_new_tokens=8))
    stop = greedy.text[1:3] if len(greedy.text) > 3 else None
    if stop:
        cut = lm.generate(net, "class", options=lm.GenerationOptions(max_new_tokens=8, stop=(stop,)))
        assert stop not in cut.text and cut.finish == "stop"
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(stop=("",))):
        with pytest.raises(SnnetError):
            lm.GenerationOptions(**bad)


# ------------------------------------------------------------------ least squares, evaluation, export


def test_least_squares_beats_random_layers(nets, tokenizer):
    net = nets["pythia"]
    blocks = lm.token_blocks([_write(TEXT)], tokenizer, 16)
    held = lm.token_blocks([_write(TEXT.replace("Point", "Vector").replace("a + b", "b + a"))], tokenizer, 16).ids

    def errors() -> list[float]:
        out = []
        with torch.no_grad():
            for slot, layer in zip(net.space.layers, net.stitch_layers):
                (e, st), = slot.joins[:1]
                src, dst = net.activations(slot.src, held)[e], net.activations(slot.dst, held)[st]
                out.append(float(((layer(src) - dst) ** 2).mean()))
        return out

    before = errors()
    report = net.init_stitching(lm.text_loader(blocks, 4), max_tokens=256)
    after = errors()
    assert report.tokens > 0 and report.layers == len(net.stitch_layers)
    assert all(a < b for a, b in zip(after, before)), (before, after)


def _write(text: str) -> Path:
    import tempfile

    p = Path(tempfile.mkdtemp()) / "doc.py"
    p.write_text(text)
    return p


def test_evaluation_shares_prefixes_and_reports_ppl_and_bpb(nets, tokenizer):
    net = nets["gpt2"]
    blocks = lm.token_blocks([_write(TEXT)], tokenizer, 12)
    rows = lm.evaluate_lm(net, lm.text_loader(blocks, 3), progress=False)
    assert [r.id for r in rows] == [s.id for s in net.space]
    ids = blocks.ids
    for r in rows:  # the shared-prefix pass gives what each network alone gives
        net.select(r.id)
        with torch.no_grad():
            logits = net(ids[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        assert math.isclose(r.loss, nll / blocks.tokens, rel_tol=1e-5)
        assert math.isclose(r.value("ppl"), math.exp(r.loss), rel_tol=1e-9)
        assert math.isclose(r.value("bpb"), nll / math.log(2) / int(blocks.byte_counts.sum()), rel_tol=1e-5)
    assert any(r.pareto for r in rows)
    text = lm.format_lm_results(rows)
    assert "bits/byte" in text and "FLOPs/token" in text
    from snnet.budget import select_stitch

    chosen = select_stitch(net, f"flops<={rows[-1].flops}", rows)
    within = [r for r in rows if r.flops <= rows[-1].flops]
    assert chosen.ranked_by == "bpb" and chosen.id == min(within, key=lambda r: r.bpb).id
    assert net.select(budget=f"flops<={rows[-1].flops}", results=rows) == chosen.stitch == net.active


@pytest.mark.parametrize("fam", ["gpt2", "llama3.2"])
def test_export_anchor_and_stitch(fam, nets, tmp_path):
    net = nets[fam]
    ids = _ids(seed=7)
    for s in (net.space[0], net.space[3]):
        out = lm.export_route(net, s, tmp_path / f"r{s.id}")
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        assert (type(model).__name__ == "SnnetRouteForCausalLM") == (not s.is_anchor)
        net.select(s)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits[..., : net.vocab_size], net(ids), rtol=0, atol=1e-5)
        assert verify_export(net, s, out) <= 1e-5
        if not s.is_anchor:  # only the route's weights are written
            n = sum(p.numel() for p in model.parameters())
            assert n == net.costs()[s.id].params
    with pytest.raises(SnnetError, match="not an empty folder"):
        lm.export_route(net, net.space[0], tmp_path / "r0")


def test_save_and_load_round_trip(nets, tmp_path):
    net = nets["qwen2.5"]
    net.select(3)
    net.save_pretrained(tmp_path / "net")
    back = lm.StitchedLM.from_pretrained(tmp_path / "net")
    ids = _ids(seed=9)
    assert back.active.name == net.active.name and back.labels == net.labels
    with torch.no_grad():
        torch.testing.assert_close(back(ids), net(ids), rtol=0, atol=0)
    assert back.tokenizer is not None and len(back.tokenizer) == net.vocab_size
    (tmp_path / "net" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="damaged"):
        lm.StitchedLM.from_pretrained(tmp_path / "net")


def test_a_save_without_adapters_over_a_lora_save_removes_its_adapters(nets, folders, tmp_path):
    """A network saved without LoRA adapters over a LoRA save left the old adapters.safetensors beside it, taken for
    the new network's; and a LoRA save into another model's folder wrote its adapters there before being refused."""
    pytest.importorskip("peft")
    import copy

    from safetensors.torch import save_file

    from snnet.families.lm_lora import ADAPTERS_NAME, add_lora

    plain = nets["gpt2"]
    adapted = copy.deepcopy(plain)
    add_lora(adapted, 2, 4.0)
    out = tmp_path / "net"
    adapted.save_pretrained(out)
    assert set(json.loads((out / "config.json").read_text())["sha256"]) - {"tokenizer.json", "tokenizer_config.json"} \
        == {"model.safetensors", ADAPTERS_NAME}
    plain.save_pretrained(out)
    assert not (out / ADAPTERS_NAME).exists() and not list(out.glob("*.previous"))
    assert set(json.loads((out / "config.json").read_text())["sha256"]) - {"tokenizer.json", "tokenizer_config.json"} \
        == {"model.safetensors"}
    own = tmp_path / "own"  # an adapters.safetensors snnet did not write stays
    own.mkdir()
    save_file({"x": torch.zeros(1)}, str(own / ADAPTERS_NAME))
    plain.save_pretrained(own)
    assert (own / ADAPTERS_NAME).is_file()
    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(folders["gpt2"][0]).save_pretrained(other)
    before = sorted(p.name for p in other.iterdir())
    with pytest.raises(CheckpointError, match="cannot save to"):
        adapted.save_pretrained(other)
    assert sorted(p.name for p in other.iterdir()) == before


def test_a_save_without_a_tokenizer_over_one_with_removes_snnets_tokenizer_files_only(nets, folders, tmp_path,
                                                                                       monkeypatch):
    """A network saved without a tokenizer over a save with one left the old tokenizer files, which from_pretrained
    then loaded as the new network's; and the tokenizer was written after config.json, so a save stopped between
    them left the old network with the new tokenizer."""
    import copy
    import shutil

    import snnet.model

    net = nets["gpt2"]
    bare = copy.deepcopy(net)
    bare.tokenizer = None
    out = tmp_path / "net"
    net.save_pretrained(out)
    bare.save_pretrained(out)
    assert lm.StitchedLM.from_pretrained(out).tokenizer is None
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    net.save_pretrained(out)  # recorded in config.json, as the weights are
    assert {"tokenizer.json", "model.safetensors"} <= set(json.loads((out / "config.json").read_text())["sha256"])
    own = tmp_path / "own"  # tokenizer files the user copied in (as the error for a broken tokenizer says) stay
    bare.save_pretrained(own)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(folders["gpt2"][0]) / name, own / name)
    bare.save_pretrained(own)
    with pytest.warns(UnverifiedFileWarning, match=r"tokenizer\S* is loaded UNVERIFIED"):  # not recorded: said
        assert lm.StitchedLM.from_pretrained(own).tokenizer is not None
    other = copy.deepcopy(net)  # a save with another tokenizer, stopped before its config.json is in
    other.tokenizer = _tokenizer("def other(): return 1\n" * 50)
    write = snnet.model.atomic_write

    def stopped(path, *a, **k):
        if Path(path).name == "config.json":
            raise KeyboardInterrupt
        return write(path, *a, **k)

    monkeypatch.setattr(snnet.model, "atomic_write", stopped)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(out)
    monkeypatch.undo()
    assert (out / "tokenizer.json").read_text() != (out / "tokenizer.json.previous").read_text()
    back = lm.StitchedLM.from_pretrained(out).tokenizer  # the earlier save's, saved with the weights that load
    assert back.backend_tokenizer.to_str() == net.tokenizer.backend_tokenizer.to_str()


def test_a_folder_saved_before_tokenizer_files_were_recorded_loads_with_a_warning_and_a_save_records_them(nets,
                                                                                                       tmp_path):
    """A save made before session 15 wrote its tokenizer after config.json, which records no SHA-256 for its files:
    they loaded unchecked and unnamed (a changed byte, or a leftover file read with them, went unnoticed). They now
    load with an UnverifiedFileWarning each; a save with the tokenizer records its files, which then load checked (a
    damaged one refused as damaged weights are), and one it does not write keeps its warning."""
    import warnings

    net = nets["gpt2"]
    out = tmp_path / "old"
    net.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())  # the old layout, written by hand:
    config["sha256"] = {"model.safetensors": config["sha256"]["model.safetensors"]}  # the weights' checksum only
    (out / "config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}  # transformers 4 wrote it too
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    names = ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]

    def load() -> tuple[lm.StitchedLM, list[str]]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            back = lm.StitchedLM.from_pretrained(out)
        said = [str(w.message) for w in caught if issubclass(w.category, UnverifiedFileWarning)]
        return back, sorted(Path(m.split(" is loaded UNVERIFIED")[0]).name for m in said)

    back, warned = load()
    assert warned == names and back.tokenizer.backend_tokenizer.to_str() == net.tokenizer.backend_tokenizer.to_str()
    back.save_pretrained(out)  # a save with the tokenizer records the files it writes
    assert set(json.loads((out / "config.json").read_text())["sha256"]) == {"model.safetensors", *names[1:]}
    assert load()[1] == ["special_tokens_map.json"]  # not written by that save: not its tokenizer's, said again
    (out / "special_tokens_map.json").unlink()
    assert load()[1] == []
    (out / "tokenizer.json").write_text((out / "tokenizer.json").read_text() + "\n")  # still a tokenizer, not the saved
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is damaged.*restore its tokenizer files"):
        lm.StitchedLM.from_pretrained(out)


@pytest.mark.parametrize("labels", [["small"], ["a", "b", "c"]])
def test_labels_that_do_not_match_the_anchors_are_refused(nets, labels):
    models = [p.model for p in nets["gpt2"].anchors]
    with pytest.raises(NotStitchableError, match="labels .* for 2 anchors"):  # was an IndexError, or a label dropped
        lm.create_stitched_lm(models, labels=labels, context=64)


def test_a_network_on_the_meta_device_is_refused_by_save_in_one_line(tmp_path):
    net = lm.create_stitched_lm("pythia-70m,pythia-160m", device="meta")  # shipped configs: no download, no weights
    with pytest.raises(CheckpointError, match="holds no weights"):  # was torch's NotImplementedError from a meta tensor
        net.save_pretrained(tmp_path / "net")
    assert not (tmp_path / "net").exists()


# ------------------------------------------------------------------ clear errors


def test_tokenizer_mismatch_is_refused(folders, tmp_path):
    other = tmp_path / "other"
    AutoModelForCausalLM.from_pretrained(folders["gpt2"][0]).save_pretrained(other)
    _tokenizer(extra="completely different words here " * 8).save_pretrained(other)
    with pytest.raises(NotStitchableError, match="do not share a tokenizer") as e:
        lm.create_stitched_lm(f"{folders['gpt2'][1]},{other}", weights=True, load_tokenizers=True)
    assert "map to other ids" in str(e.value)
    with pytest.raises(NotStitchableError, match="special token ids"):
        lm.create_stitched_lm("gpt2,pythia-160m", device="meta")


def test_unknown_names_and_out_of_range_stitches(nets):
    with pytest.raises(UnknownModelError, match="pythia-160m"):
        lm.resolve_lm("pythia-16m")
    with pytest.raises(UnknownModelError, match="qwen2.5"):
        lm.resolve_lm("qwen25")
    net = nets["gpt2"]
    with pytest.raises(StitchNotFoundError, match="0..4"):
        net.select(99)
    with pytest.raises(StitchNotFoundError, match="Did you mean"):
        net.select(net.space[3].name + "x")
    with pytest.raises(SnnetError, match="outside"):
        lm.evaluate_lm(net, [{"input_ids": torch.full((1, 4), 5000), "bytes": torch.tensor([4])}], progress=False)


# ------------------------------------------------------------------ text


def test_text_blocks_count_bytes_and_split_stably(tokenizer, tmp_path):
    from snnet.text import _encode

    docs = []
    for k, text in enumerate([TEXT, "x = 'é ü €'  # non-ASCII\n" * 20, "print('hi')\n" * 30]):
        p = tmp_path / f"d{k}.py"
        p.write_text(text, encoding="utf-8")
        docs.append(p)
    for tok in (tokenizer, lm.ByteTokenizer()):
        stream, counts = [], []
        for p in docs:
            ids, c = _encode(tok, p.read_text())
            assert len(ids) == len(c) and sum(c) == len(p.read_bytes())  # every byte counted once
            stream += ids + [tok.eos_token_id]
            counts += c + [0]
        blocks = lm.token_blocks(docs, tok, 8)
        n = len(blocks)
        assert blocks.ids.flatten().tolist() == stream[: n * 9]
        want = torch.tensor(counts[: n * 9]).view(n, 9)[:, 1:].sum(1)  # the predicted tokens' bytes
        assert blocks.byte_counts.tolist() == want.tolist()
    files = [tmp_path / "corpus" / f"m{k}" / f"f{k}.py" for k in range(40)]
    for p in files:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("pass\n")
    train, val = lm.split_documents(files, tmp_path / "corpus", held_out=0.25)
    again = lm.split_documents(list(reversed(files)), tmp_path / "corpus", held_out=0.25)
    assert sorted(train) == sorted(again[0]) and sorted(val) == sorted(again[1]) and train and val
    assert len(lm.stdlib_sources()) > 100  # the default corpus is there on every Python install


def test_a_limited_corpus_reads_files_spread_over_it_not_its_first(tmp_path):
    """--data.limit on the standard library read its first files only (sorted by path: __future__.py, _aix_support.py,
    ... asyncio/): a quick run trained on a few modules of one package. A limit now reads the split's files in an
    order drawn with the seed: across the corpus, the same for the same seed, never from the other split; without a
    limit every file is read in sorted order, as before."""
    import dataclasses
    import re
    import types

    from snnet.config import DataConfig
    from snnet.tasks import CausalLM

    root = tmp_path / "corpus"
    for pkg in "abcdef":
        for k in range(8):
            p = root / f"pkg_{pkg}" / f"m{k}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"# {p.relative_to(root).as_posix()}\nx = {k}\n")
    tok = lm.ByteTokenizer()
    task = CausalLM(DataConfig(), types.SimpleNamespace(tokenizer=tok, vocab_size=len(tok)))
    train_files, held = lm.split_documents(lm.text_files(root, "*"), root, 0.25)
    names = {k: [p.relative_to(root).as_posix() for p in files] for k, files in (("train", train_files), ("val", held))}

    def read(blocks: lm.TokenBlocks) -> list[str]:  # each file starts with its own name
        return re.findall(r"# (pkg_\w/m\d\.py)", tok.decode(blocks.ids.flatten().tolist()))

    data = DataConfig(corpus=str(root), block_size=15, held_out=0.25, limit=8)  # 128 tokens: about 5 of 48 files
    blocks = task.dataset(data, seed=0)
    got = read(blocks)
    assert len(got) >= 3 and len({n.split("/")[0] for n in got}) > 1  # not pkg_a's first modules alone
    assert got != names["train"][: len(got)] and set(got) <= set(names["train"])
    assert task.dataset(data, seed=0).ids.equal(blocks.ids) and blocks.seed == 0  # the same files for the seed
    assert not task.dataset(data, seed=1).ids.equal(blocks.ids)
    held_read = read(task.dataset(data, seed=0, split="val", train=False, limit=4))
    assert held_read and set(held_read) <= set(names["val"])  # the held-out files only
    everything = task.dataset(dataclasses.replace(data, limit=None), seed=0)  # no limit: every file, sorted
    assert everything.ids.equal(lm.token_blocks(train_files, tok, 15).ids) and everything.seed is None
    first = task.dataset(data, seed=None)  # None: the sorted files' first blocks (the demo's, as it measured them)
    assert read(first) == names["train"][: len(read(first))]


def test_a_small_limit_of_the_standard_library_takes_blocks_of_many_files():
    """A limit read the seeded files' blocks one file after another: the standard library's median file is about
    twelve 256-token blocks, so --data.limit 8 (or eval --limit 8) was one file, not a spread of the corpus. A
    file now gives at most ceil(N / files) of the N blocks, for training and for the held-out files alike."""
    import types

    from snnet.config import DataConfig
    from snnet.tasks import CausalLM

    tok = lm.ByteTokenizer()
    task = CausalLM(DataConfig(), types.SimpleNamespace(tokenizer=tok, vocab_size=len(tok)))
    root = lm.stdlib_root()
    train_files, held = lm.split_documents(lm.stdlib_sources(), root, 0.1)

    def sources(blocks: lm.TokenBlocks, files: list) -> set[str]:
        """The files the blocks' text comes from: each block's longest run between end-of-text tokens, found."""
        texts = {p.relative_to(root).as_posix(): p.read_bytes() for p in files}
        found = set()
        for row in blocks.ids.tolist():
            runs, run = [], []
            for i in [*row, tok.eos_token_id]:
                if i == tok.eos_token_id:
                    runs.append(bytes(run))
                    run = []
                else:
                    run.append(i)
            owners = [name for name, text in texts.items() if max(runs, key=len) in text]
            assert owners  # in the split's files, not the other split's
            found.add(owners[0])
        return found

    data = DataConfig(block_size=255, limit=8)
    for seed in (0, 1):
        blocks = task.dataset(data, seed=seed)
        assert len(blocks) == 8 and len(sources(blocks, train_files)) >= 4
        assert task.dataset(data, seed=seed).ids.equal(blocks.ids)  # the same blocks for the seed
    held_blocks = task.dataset(data, seed=0, split="val", train=False, limit=8)
    assert len(held_blocks) == 8 and len(sources(held_blocks, held)) >= 4


def test_a_limit_takes_a_share_of_each_file_and_more_when_small_files_leave_it_short(tmp_path, tokenizer):
    """A file gives at most ceil(N / files) blocks, cut at a block's end (no end-of-text token there, so no block
    joins two files' text without one); when small files leave the N short, each gives more, and a limit past the
    corpus reads all of it. The first tokens of a long file come from a prefix of it, as the whole file's do."""
    import re

    from snnet.text import _encode, _first_tokens

    tok = lm.ByteTokenizer()
    files = []
    for k, size in enumerate([3, 200, 5, 90, 4, 300]):
        files.append(tmp_path / f"f{k}.txt")
        files[-1].write_text(chr(ord("a") + k) * size)
    everything = lm.token_blocks(files, tok, 15)  # 608 tokens: 38 blocks of 16

    def shares(n: int) -> list[int]:  # how many blocks hold each file's text
        blocks = lm.token_blocks(files, tok, 15, max_blocks=n, seed=0)
        rows = [bytes(i if i != tok.eos_token_id else ord(".") for i in row).decode() for row in blocks.ids.tolist()]
        assert len(blocks) == n and not any(re.search(r"([a-f])(?!\1)[a-f]", row) for row in rows)  # joined: '.'
        return [sum(ch in row for row in rows) for ch in "abcdef"]

    assert max(shares(3)) == 1
    assert max(shares(24)) == 10  # 4 each left it short: 10 do (twice as many gave the first large file 16)
    assert len(lm.token_blocks(files, tok, 15, max_blocks=1000, seed=0)) == len(everything)
    text = (TEXT + "x = '" + "=" * 300 + "'\n") * 20
    for n in (1, 37, 200, 5000):
        assert _first_tokens(tokenizer, text, n) == tuple(v[:n] for v in _encode(tokenizer, text))


def test_the_refill_of_a_limit_small_files_left_short_takes_the_fewest_blocks_per_file_that_make_it_up(tmp_path):
    """_fewest_blocks (a bisection up to the blocks one file cut short then holds all of the limit, where it was a
    doubling search then a bisection: the same answers) against the reader itself: the passes token_blocks makes
    with the blocks per file it gives (each the fewest with which the files read so far, those cut short taken to
    be long enough, give the limit) end with the fewest with which the files give it."""
    from snnet.text import _fewest_blocks, _read

    tok = lm.ByteTokenizer()
    files = []
    for k, size in enumerate([3, 200, 5, 90, 4, 300, 7, 1000]):
        files.append(tmp_path / f"f{k}.txt")
        files[-1].write_text(chr(ord("a") + k) * size)
    step, found = 16, []

    def gives(per: int) -> tuple[int, list[int | None]]:
        ids, _, sizes = _read(files, tok, step, need, per, {}, 0)
        return len(ids), sizes

    for n in (9, 24, 30, 37, 50, 90):
        need, per = n * step, -(-n // len(files))
        passes = [per]
        while gives(per)[0] < need:
            assert None in gives(per)[1]  # small files left it short, and a file was cut short
            per = _fewest_blocks(gives(per)[1], step, need, per)
            passes.append(per)
        assert passes[0] == per or gives(per - 1)[0] < need  # the fewest
        found.append(passes)
    assert found == [[2, 3], [3, 6], [4, 8], [5, 10, 11], [7, 15, 16], [12, 28, 52]]  # the doubling search's too

def test_a_limit_takes_blocks_spread_through_each_file_and_no_seed_reads_the_first_ones_as_before(tmp_path, tokenizer):
    """A limit took each seeded file's first blocks, mostly a module's docstring and imports. Its blocks now come
    from places spread through each file, drawn with the seed (the same blocks for it), each block of one place
    (a whole line on), their bytes counted as before. Without a seed (snnet demo --lm and the zoo: their results
    were measured on them) a limit still reads the files' first blocks, the unlimited stream's."""
    import re
    import types

    from snnet.config import DataConfig
    from snnet.tasks import CausalLM

    root = tmp_path / "corpus"
    root.mkdir()
    for k in range(6):
        (root / f"f{k}.py").write_text("".join(f"f{k} line {i:03d} = {i * 7 % 10}\n" for i in range(200)))
    files = lm.text_files(root, "*")
    byte = lm.ByteTokenizer()

    def places(blocks: lm.TokenBlocks) -> list[list[tuple[int, int]]]:  # the (file, line) of each block's lines
        return [[(int(f), int(i)) for f, i in re.findall(r"f(\d) line (\d{3})", byte.decode(row))]
                for row in blocks.ids.tolist()]

    small = lm.token_blocks(files, byte, 31, max_blocks=6, seed=0)  # a block of each file
    lines = [row[0][1] for row in places(small)]
    assert len(small) == 6 and len({f for row in places(small) for f, _ in row}) == 6
    assert sum(lines) / len(lines) > 40  # the first blocks: line 0 of each
    assert lm.token_blocks(files, byte, 31, max_blocks=6, seed=0).ids.equal(small.ids)
    assert not lm.token_blocks(files, byte, 31, max_blocks=6, seed=1).ids.equal(small.ids)
    many = lm.token_blocks(files, byte, 31, max_blocks=36, seed=0)  # six places of each file
    by_file: dict[int, list[int]] = {}
    for row in places(many)[1:]:
        assert {f for f, _ in row} == {row[0][0]}  # one file's
        assert [i for _, i in row] == list(range(row[0][1], row[0][1] + len(row)))  # one place of it
        by_file.setdefault(row[0][0], []).append(row[0][1])
    assert all(v == sorted(v) and v[-1] - v[0] > 100 for v in by_file.values())  # in order, through the file
    texts = "".join(p.read_text() for p in files)
    for tok in (byte, tokenizer):
        blocks = lm.token_blocks(files, tok, 31, max_blocks=36, seed=0)
        for row, count in zip(blocks.ids.tolist(), blocks.byte_counts.tolist()):
            text = tok.decode(row[1:])
            assert count == len(text.encode()) and text.strip("\n").split("\n")[-2] in texts  # its text, its bytes
    # no seed: the first blocks, as the unlimited stream has them, as snnet demo --lm reads them (seed None)
    task = CausalLM(DataConfig(), types.SimpleNamespace(tokenizer=tokenizer, vocab_size=len(tokenizer)))
    for tok in (byte, tokenizer):
        stream = lm.token_blocks(files, tok, 31)
        for n in (1, 6, 36, 1000):
            first = lm.token_blocks(files, tok, 31, max_blocks=n)
            assert first.ids.equal(stream.ids[:n]) and first.byte_counts.equal(stream.byte_counts[:n])
    data = DataConfig(corpus=str(root), block_size=31, held_out=0.25, limit=20)
    train_files, held = lm.split_documents(files, root, 0.25)
    assert task.dataset(data, seed=None).ids.equal(lm.token_blocks(train_files, tokenizer, 31).ids[:20])
    assert task.dataset(data, seed=None, split="val", train=False, limit=5).ids.equal(
        lm.token_blocks(held, tokenizer, 31).ids[:5])


def test_a_corpus_fingerprint_names_the_python_version_only_for_the_stdlib(tmp_path, monkeypatch):
    """Another folder's text is the same on every Python: its fingerprint does not change with the version
    (the docstring: the same text if and only if the fingerprints agree); the standard library's does."""
    import types

    import snnet.text as text

    (tmp_path / "a.txt").write_text("hello\n")
    files, std = [tmp_path / "a.txt"], lm.stdlib_sources()[:3]
    before = lm.corpus_fingerprint(files, tmp_path), lm.corpus_fingerprint(std, lm.stdlib_root())
    monkeypatch.setattr(text, "sys", types.SimpleNamespace(version_info=types.SimpleNamespace(major=3, minor=99)))
    after = lm.corpus_fingerprint(files, tmp_path), lm.corpus_fingerprint(std, lm.stdlib_root())
    assert after[0] == before[0] and after[1] != before[1]


def test_two_way_round_trips_generate_and_export(folders, tokenizer, tmp_path):
    """SN-Netv2's space on LMs: a round trip runs one anchor twice (one cache per anchor, a tied head
    shared by its stem and head), generates with its cache as without, and exports exactly."""
    torch.manual_seed(1)
    paths = []
    for k, (w, d) in enumerate([(32, 3), (48, 6)]):
        folder = tmp_path / f"g{k}"
        AutoModelForCausalLM.from_config(_config("gpt2", w, d, len(tokenizer), 0)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        paths.append(str(folder))
    net = lm.create_stitched_lm(",".join(paths), weights=True, load_tokenizers=True, two_way=True, context=64).eval()
    trips = [s for s in net.space if len(s.segments) == 3]
    assert len(trips) == 2  # S->L->S and L->S->L through the two matched positions
    hf = lm.as_transformers(net)
    prompt = _ids(1, 4, seed=2)
    for s in trips:
        net.select(s)
        with torch.no_grad():
            got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                              pad_token_id=0, temperature=None, top_p=None, top_k=None)[0, 4:].tolist()
            seq, want = prompt, []
            for _ in range(4):
                nxt = net(seq)[0, -1].argmax()
                want.append(int(nxt))
                seq = torch.cat([seq, nxt.view(1, 1)], 1)
        assert got == want, s.name
        route = net.route(s)
        assert net.costs()[s.id].params == sum({id(p): p.numel() for m in route.modules() for p in m.parameters()}.values())
        out = lm.export_route(net, s, tmp_path / f"trip{s.id}")
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)  # the folder's own loader module
        with torch.no_grad():
            torch.testing.assert_close(remote(prompt).logits[..., : net.vocab_size], net(prompt), rtol=0, atol=1e-5)


def test_plot_and_rows_for_a_language_model(nets, tokenizer, tmp_path):
    from snnet.plot import plot_pareto
    from snnet.results import load_results, write_results

    net = nets["smollm2"]
    rows = lm.evaluate_lm(net, lm.text_loader(lm.token_blocks([_write(TEXT)], tokenizer, 12), 4), progress=False)
    write_results(rows, tmp_path)
    back = load_results(tmp_path)
    assert [r.value("bpb") for r in back] == [r.value("bpb") for r in rows]
    html, png = plot_pareto(back, tmp_path / "front.html", tmp_path / "front.png", y="bpb")
    assert "bits per byte" in html.read_text() and png.stat().st_size > 0


def test_blocks_longer_than_the_positions_are_refused_in_one_line(tmp_path, capsys):
    from snnet.cli import main
    from snnet.families.lm_tiny import tiny_lm

    net = tiny_lm(positions=16)
    ok = lm.TokenBlocks(torch.zeros(2, 17, dtype=torch.long), torch.ones(2, dtype=torch.long))
    assert lm.evaluate_lm(net, lm.text_loader(ok, 2), progress=False)[0].images == 32
    long = lm.TokenBlocks(torch.zeros(2, 18, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(SnnetError, match="17 predicted tokens are longer than the 16 positions"):
        lm.evaluate_lm(net, lm.text_loader(long, 2), progress=False)  # was an IndexError in GPT-2's position embedding
    for bad in (-3, 10 ** 6):  # a token id outside the vocabulary is named, the negative one too
        ids = torch.zeros(2, 17, dtype=torch.long)
        ids[1, 5] = bad
        with pytest.raises(SnnetError, match=f"token id {bad} is outside"):
            lm.evaluate_lm(net, lm.text_loader(lm.TokenBlocks(ids, torch.ones(2, dtype=torch.long)), 2), progress=False)
    net.save_pretrained(tmp_path / "lm")
    for flags in ([], ["--block-size", "17"]):  # the default block (256) too: a saved network has no run's settings
        with pytest.raises(SystemExit) as e:
            main(["eval", "--model", str(tmp_path / "lm"), "--out", str(tmp_path / "ev"), "--no-progress", *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "give --block-size 16 or less" in err and "Traceback" not in err

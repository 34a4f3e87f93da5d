"""snnet.generate on a tiny random-init stitched LM (snnet.families.lm_tiny): edge cases of the options."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("transformers")
import snnet.lm as lm  # noqa: E402
from snnet.errors import ConfigError, SnnetError  # noqa: E402
from snnet.families.lm_tiny import tiny_lm  # noqa: E402

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def net() -> lm.StitchedLM:
    return tiny_lm()


def test_a_stop_string_is_looked_for_in_the_continuation_not_the_prompt(net):
    free = lm.generate(net, PROMPT, options=lm.GenerationOptions(max_new_tokens=8))
    first = net.tokenizer.decode(free.tokens[:1])
    stop = PROMPT[-3:] + first  # ends in the first new token, begins in the prompt: never in the continuation
    assert stop not in free.text
    cut = lm.generate(net, PROMPT, options=lm.GenerationOptions(max_new_tokens=8, stop=(stop,)))
    assert (cut.text, cut.tokens, cut.finish) == (free.text, free.tokens, "length")


def test_each_prompt_of_a_batch_counts_its_own_tokens_not_the_padding(net):
    prompts = ["a", PROMPT + "\n    return a + b"]
    batch = lm.generate(net, prompts, options=lm.GenerationOptions(max_new_tokens=2))
    assert [g.prompt_tokens for g in batch] == [len(net.tokenizer(p)["input_ids"]) for p in prompts]
    assert batch[0].prompt_tokens == lm.generate(net, "a", options=lm.GenerationOptions(max_new_tokens=2)).prompt_tokens



def test_a_row_a_stop_string_ends_in_a_batch_keeps_no_padding(net):
    """A stop string ends one row of a batch early: generation pads that row to the others' length; those pads
    were never generated and must not be among its tokens (the row is what the prompt gives alone)."""
    prompts = ["a", PROMPT]
    opts = lm.GenerationOptions(max_new_tokens=8)
    free = [lm.generate(net, p, options=opts) for p in prompts]
    stop = net.tokenizer.decode(free[0].tokens[:2])
    assert stop not in free[1].text  # the second row runs on: the first is padded in the batch
    opts = lm.GenerationOptions(max_new_tokens=8, stop=(stop,))
    alone = [lm.generate(net, p, options=opts) for p in prompts]
    batch = lm.generate(net, prompts, options=opts)
    assert [(g.tokens, g.text, g.finish) for g in batch] == [(g.tokens, g.text, g.finish) for g in alone]
    assert len(batch[0].tokens) <= 2 and batch[0].finish == "stop"


def test_sampling_draws_from_every_token_top_p_keeps(net):
    """top_p=1 samples from the whole vocabulary: transformers' default top_k of 50 is not applied behind it."""
    opts = [lm.GenerationOptions(max_new_tokens=1, temperature=100.0, top_p=1.0, seed=k) for k in range(150)]
    seen = {lm.generate(net, "def", options=o).tokens[0] for o in opts}
    assert net.vocab_size > 100 and len(seen) > 60  # near uniform: about 120 distinct tokens; at most 50 with top_k=50


def test_one_stop_string_is_one_string_not_its_characters(net):
    free = lm.generate(net, PROMPT, options=lm.GenerationOptions(max_new_tokens=8))
    never = free.text[:1] + "\x00"  # begins like the continuation, never in it
    assert lm.GenerationOptions(stop=never).stop == (never,)
    cut = lm.generate(net, PROMPT, options=lm.GenerationOptions(max_new_tokens=8, stop=never))
    assert (cut.text, cut.finish) == (free.text, "length")  # was cut at its first character


@pytest.mark.parametrize("kw, says", [({"max_new_tokens": 5}, "GenerationOptions(max_new_tokens"),
                                      ({"temperature": 0.7}, "GenerationOptions(temperature"),
                                      ({"do_sample": True}, "GenerationOptions(temperature"),
                                      ({"attention_mask": None}, "from the prompt")])
def test_a_keyword_the_options_own_is_refused_in_one_line(net, kw, says):
    """transformers' spelling of an option: was a TypeError (max_new_tokens=, do_sample=, attention_mask=) or, for
    temperature=, silently replaced by the options' greedy decoding."""
    with pytest.raises(ConfigError, match=re.escape(says)) as e:
        lm.generate(net, PROMPT, **kw)
    assert "\n" not in str(e.value)
    assert len(lm.generate(net, PROMPT, options=lm.GenerationOptions(max_new_tokens=2), top_k=5).tokens) == 2  # others pass


def test_the_models_own_end_of_text_ids_end_a_row_as_the_tokenizers_does():
    """A model's config may name end-of-text ids the tokenizer's eos is not (Llama 3.2 Instruct: three): generation
    stops there, so that is a "stop", and a batch's padding after it is not among the row's tokens."""
    net = tiny_lm()
    opts = lm.GenerationOptions(max_new_tokens=6)
    first = lm.generate(net, "a", options=opts).tokens[0]
    assert first != net.tokenizer.eos_token_id
    for p in net.anchors:
        p.config.eos_token_id = [first, net.tokenizer.eos_token_id]
    alone = lm.generate(net, "a", options=opts)
    batch = lm.generate(net, ["a", PROMPT], options=opts)
    assert (alone.tokens, alone.finish) == ((first,), "stop")  # was "length"
    assert (batch[0].tokens, batch[0].finish) == ((first,), "stop")  # was (first, pad)


def test_another_tokenizers_ids_beyond_the_vocabulary_are_refused_in_one_line(net):
    from pathlib import Path

    from snnet.families.lm_tiny import tiny_tokenizer

    big = tiny_tokenizer(Path(lm.__file__).with_name("text.py").read_text(), vocab_size=2 * net.vocab_size)
    text = "def token_blocks(files, tokenizer, block_size): return"
    assert max(big(text)["input_ids"]) >= net.vocab_size
    with pytest.raises(SnnetError, match="outside the network's") as e:  # was an IndexError from the embedding
        lm.generate(net, text, tokenizer=big, options=lm.GenerationOptions(max_new_tokens=2))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("seed", [2 ** 64, -2 ** 63 - 1, 1.5, "7", True])
def test_a_seed_torch_cannot_take_is_refused_in_one_line(seed):
    with pytest.raises(ConfigError, match="seed must be a whole number"):
        lm.GenerationOptions(temperature=1.0, seed=seed)
    assert lm.GenerationOptions(temperature=1.0, seed=2 ** 64 - 1).seed == 2 ** 64 - 1  # the largest torch takes


def test_cli_refuses_a_seed_out_of_range_in_one_line(net, tmp_path, capsys):
    from snnet.cli import main

    net.save_pretrained(tmp_path / "lm")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "lm"), "-p", "def", "-n", "2", "--temperature", "1", "--seed", str(2 ** 64)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "seed must be a whole number" in err and "Traceback" not in err


def test_cli_generates_with_the_largest_anchor_by_default_whatever_stitch_was_saved(net, tmp_path, capsys):
    from snnet.cli import main

    largest = max(net.space.anchor_stitches(), key=lambda s: net.costs()[s.id].flops)
    previous = net.active
    net.select(next(s for s in net.space if not s.is_anchor))  # what training leaves: the stitch its last step sampled
    try:
        net.save_pretrained(tmp_path / "lm")
    finally:
        net.select(previous)
    main(["generate", "--model", str(tmp_path / "lm"), "-p", "def", "-n", "2"])
    assert capsys.readouterr().err.startswith(f"({largest.name}: ")  # what --stitch's help says


def test_a_generation_past_the_positions_is_refused_in_one_line(net):
    n = len(net.tokenizer(PROMPT)["input_ids"])
    most = 65 - n  # the last new token is never read: 64 positions read
    assert len(lm.generate(net, PROMPT, options=lm.GenerationOptions(max_new_tokens=most)).tokens) == most
    with pytest.raises(SnnetError, match="more than the 64 positions"):  # was an IndexError in the position embedding
        lm.generate(net, PROMPT, options=lm.GenerationOptions(max_new_tokens=most + 1))
    with pytest.raises(SnnetError, match="more than the 64 positions"):
        lm.generate(net, [PROMPT, "a"], options=lm.GenerationOptions(max_new_tokens=most + 1))


@pytest.mark.parametrize("budget", ["latency<=30ms", "memory<=200MB"])
def test_cli_latency_budget_of_a_language_model_does_not_send_to_snnet_profile(net, tmp_path, capsys, budget):
    """`snnet profile` refuses a language model: the refusal of a latency or memory budget must not send its
    user there (it did: "run `snnet profile` first"), but say what a language model's budget can be."""
    from snnet.cli import main

    net.save_pretrained(tmp_path / "lm")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "lm"), "-p", "def", "-n", "2", "--budget", budget])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "snnet profile` first" not in err and "flops or params budget" in err


def test_cli_select_takes_a_saved_language_model(net, tmp_path, capsys):
    """`snnet select --model LM`: refused with "LM/config.json is corrupt or not an snnet config" (a sound
    language model folder); now the network within the budget, as `snnet generate --budget` picks it."""
    from snnet.cli import main

    net.save_pretrained(tmp_path / "lm")
    costs = net.costs()
    bound = sorted(c.flops for c in costs)[1]
    main(["select", f"flops<={bound}", "--model", str(tmp_path / "lm")])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == net.select(budget=f"flops<={bound}").name


def test_cli_profile_of_a_language_model_says_so(net, tmp_path, capsys):
    """`snnet profile --model LM` said the sound folder's config.json was "corrupt or not an snnet config"."""
    from snnet.cli import main

    net.save_pretrained(tmp_path / "lm")
    with pytest.raises(SystemExit) as e:
        main(["profile", "--model", str(tmp_path / "lm"), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "language model" in err and "corrupt" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [["--workers", "2"], ["--skip-bad-images"], ["--calib-images", "5"],
                                    ["--zoo-family", "deit"]])
def test_cli_eval_of_a_language_model_refuses_image_options(net, tmp_path, capsys, option):
    """Options of image evaluation had no effect on a language model's and were silently ignored (the run went on
    as without them); refused in one line, as --zoo and --amp were, before any text is read."""
    from snnet.cli import main

    net.save_pretrained(tmp_path / "lm")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tmp_path / "lm"), "--block-size", "16", "--limit", "2", "--no-progress",
              "--out", str(tmp_path / "out"), *option])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and option[0] in err
    assert not (tmp_path / "out").exists()


def test_a_network_with_lora_on_its_anchors_exports_anchors_and_stitches_merged(tmp_path):
    """export_route of a live network with PEFT adapters on its anchors (a causal-lm run's network before saving)
    wrote the adapter layers under names the plain model class does not have: its check refused every export."""
    pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    from snnet.families.lm_lora import add_lora, has_lora

    net = tiny_lm()
    add_lora(net, 4, 8.0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".lora_B." in name:  # zero at injection: adapters that change nothing would hide the bug
                p.normal_(std=0.2)
    ids = torch.randint(0, net.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    for s in (net.stitch(0), net.stitches[-1]):
        folder = lm.export_route(net, s, tmp_path / str(s.id))
        net.select(s)
        want = net(ids)
        got = AutoModelForCausalLM.from_pretrained(str(folder)).eval()(input_ids=ids).logits[..., : net.vocab_size]
        assert torch.allclose(got, want, atol=1e-5)
    assert has_lora(net)  # the network itself keeps its adapters



def test_anchors_in_bfloat16_run_every_stitch(net):
    """create_stitched_lm(..., dtype=torch.bfloat16) (the docs: "passes through") made float32 stitching layers
    between bfloat16 anchors: every stitched route failed in torch ("mat1 and mat2 must have the same dtype")."""
    import copy

    import torch

    models = [copy.deepcopy(a.model).to(torch.bfloat16) for a in net.anchors]
    half = lm.create_stitched_lm(models, labels=list(net.labels), tokenizer=net.tokenizer, context=64).eval()
    ids = torch.randint(0, half.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    half.init_stitching([ids])
    for s in half.stitches:
        half.select(s)
        assert half(ids).dtype == torch.bfloat16
    rows = lm.evaluate_lm(half, [{"input_ids": ids, "bytes": torch.tensor([8, 8])}], progress=False)
    assert len(rows) == len(half.stitches)
    assert lm.generate(half, PROMPT, stitch=half.stitches[-1].id, options=lm.GenerationOptions(max_new_tokens=2)).tokens


def test_cli_results_without_a_budget_is_refused_not_ignored(net, tmp_path, capsys):
    """`snnet generate --results R` without --budget generated with the largest anchor as if R were not given."""
    from snnet.cli import main

    net.save_pretrained(tmp_path / "lm")
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "lm"), "-p", "def", "-n", "2", "--results", str(tmp_path / "results.json")])
    captured = capsys.readouterr()
    assert e.value.code == 2 and len(captured.err.strip().splitlines()) == 1 and "--budget" in captured.err
    assert captured.out == ""


def test_more_than_one_sequence_a_prompt_is_refused_not_paired_with_the_wrong_prompt(net):
    """num_return_sequences=2 (passed on to transformers' generate) gave 2 rows a prompt, zipped with the prompts in
    order: the second prompt was answered with the first prompt's second sample, and the rest dropped."""
    options = lm.GenerationOptions(max_new_tokens=2, temperature=1.0, seed=0)
    with pytest.raises(ConfigError, match="num_return_sequences=2 is not supported"):
        lm.generate(net, [PROMPT, "class"], options=options, num_return_sequences=2)
    one = lm.generate(net, PROMPT, options=options, num_return_sequences=1)
    assert one.tokens == lm.generate(net, PROMPT, options=options).tokens


def test_transformers_dict_output_is_refused_in_one_line(net):
    """return_dict_in_generate=True (passed on to transformers) failed with "tuple indices must be integers"."""
    with pytest.raises(ConfigError, match="return_dict_in_generate=True is not supported here"):
        lm.generate(net, PROMPT, options=lm.GenerationOptions(max_new_tokens=2), return_dict_in_generate=True)


def test_a_damaged_tokenizer_file_of_a_saved_network_is_named_in_one_line(net, tmp_path, capsys):
    """A saved network whose tokenizer.json was cut short failed in json's decoder, a traceback through
    transformers (snnet generate, eval, serve), rather than saying which file of which folder is damaged."""
    from snnet.cli import main
    from snnet.errors import CheckpointError, UnverifiedFileWarning

    net.save_pretrained(tmp_path / "lm")
    (tmp_path / "lm" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(CheckpointError, match=r"lm/tokenizer\.json is damaged"):  # its checksum, in config.json
        lm.StitchedLM.from_pretrained(tmp_path / "lm")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path / "lm"), "-p", "def", "-n", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    config = json.loads((tmp_path / "lm" / "config.json").read_text())  # a save that did not record it
    del config["sha256"]["tokenizer.json"]
    (tmp_path / "lm" / "config.json").write_text(json.dumps(config))
    with pytest.warns(UnverifiedFileWarning), pytest.raises(CheckpointError, match="the tokenizer saved in .* does not load"):
        lm.StitchedLM.from_pretrained(tmp_path / "lm")


def test_costs_at_a_context_no_route_can_run_are_refused(net):
    """net.costs(context) and evaluate_lm(context=) priced any context, past the 64 positions the anchors know
    (rows said "FLOPs per token at a 100000-token context"), while building the network at it is refused."""
    assert net.costs(64) == net.costs()
    with pytest.raises(ConfigError, match="longer than the 64 positions"):
        net.costs(100_000)

    def text():  # the refusal comes before any text is read
        raise AssertionError("the loader was read")
        yield

    with pytest.raises(ConfigError, match="longer than the 64 positions"):
        lm.evaluate_lm(net, text(), progress=False, context=65)


def test_an_anchor_folder_with_a_damaged_tokenizer_is_named_in_one_line(net, tmp_path):
    """An anchor folder whose tokenizer.json holds no tokenizer failed with a bare KeyError('added_tokens')."""
    from snnet.errors import CheckpointError

    folders = []
    for k, part in enumerate(net.anchors):
        folder = tmp_path / f"m{k}"
        part.model.save_pretrained(folder)
        net.tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    (tmp_path / "m1" / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="cannot load the tokenizer of 'm1'"):
        lm.create_stitched_lm(folders, weights=True, load_tokenizers=True)


def test_a_network_trained_from_model_init_states_its_flops_at_the_block_length(net, tmp_path):
    """model.init kept the saved network's context (64): its FLOPs, evaluations and final/ were stated at 64
    tokens, not at the data.block_size trained at, as the docs and a network built from its anchors do."""
    from snnet.config import TrainConfig
    from snnet.families.causal_lm import lm_network_from_config

    net.save_pretrained(tmp_path / "init")
    config = TrainConfig().override(task="causal-lm", init=str(tmp_path / "init"), block_size=16)
    again = lm_network_from_config(config.model, config.space, config.data.block_size)
    assert again.context == 16 and again.costs() == net.costs(16)
    with pytest.raises(ConfigError, match="longer than the 64 positions"):
        lm_network_from_config(config.model, config.space, 65)


@pytest.mark.parametrize("bad", [-1, 10_000])
def test_calibration_ids_outside_the_vocabulary_are_refused_in_one_line(net, bad):
    """init_stitching on text tokenised with another tokenizer failed with torch's "index out of range in self"."""
    import torch

    ids = torch.zeros(2, 8, dtype=torch.long)
    ids[1, 3] = bad
    with pytest.raises(SnnetError, match=f"calibration token id {bad} is outside the network's"):
        net.init_stitching([ids])


def test_calibration_sequences_longer_than_the_positions_are_fitted_on_the_positions_known():
    """init_stitching on blocks longer than the 64 positions GPT-2 knows failed with "index out of range in self"
    (a text loader's blocks hold block_size + 1 ids: the language-model demo's are one past its anchors' positions);
    they are fitted on their first 64 tokens, as the same blocks cut by hand."""
    import torch

    ids = torch.randint(0, tiny_lm().vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    long, cut = tiny_lm(), tiny_lm()  # fitted below: not the module's network
    report = long.init_stitching([ids])
    assert report.sequences == 2 and report.tokens == 128
    cut.init_stitching([ids[:, :64]])
    for a, b in zip(long.stitch_layers.state_dict().values(), cut.stitch_layers.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_stop_none_is_no_stop_and_a_stop_of_another_type_is_refused_in_one_line(net):
    """GenerationOptions(stop=None) (OpenAI's null) failed with "'NoneType' object is not iterable", stop=5 with
    "'int' object is not iterable"."""
    assert lm.GenerationOptions(stop=None).stop == ()
    assert lm.GenerationOptions(stop=["a", "b"]).stop == ("a", "b")
    with pytest.raises(ConfigError, match="stop must be a string or a list of strings, got 5"):
        lm.GenerationOptions(stop=5)


@pytest.mark.parametrize("kw", [{"temperature": True}, {"top_p": True}])
def test_a_boolean_temperature_or_top_p_is_refused_in_one_line(kw):
    """temperature=True sampled at temperature 1 and top_p=True meant 1.0, silently (max_new_tokens and seed refuse
    booleans already)."""
    with pytest.raises(ConfigError, match=f"{next(iter(kw))} must be"):
        lm.GenerationOptions(**kw)
    assert lm.GenerationOptions(temperature=1, top_p=1).sampling

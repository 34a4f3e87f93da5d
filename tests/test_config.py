"""The configuration tree: exact round trips, layering, every recipe, one-line errors, the generated command line."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from snnet.cli import main
from snnet.commands.config_cli import TRAIN_LEGACY
from snnet.commands.demo import DEMO_LEGACY
from snnet.config import SECTIONS, TrainConfig, leaf_paths, setting_path
from snnet.errors import ConfigError, SnnetError
from snnet.recipes import RECIPES_DIR, RecipeError, load_recipe, recipe_config, recipe_names
from snnet.train import NOT_RESULT_SETTINGS, load_run_config

from .conftest import Synthetic, fresh_net

DATA = Path(__file__).parent / "data"


def _printed(capsys, *args: str) -> str:
    main(list(args))
    return capsys.readouterr().out


def _refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err


# ---------------------------------------------------------------------------- the tree


def test_every_setting_round_trips_through_dicts_and_yaml():
    changed = TrainConfig().override(lr=1e-3, betas=[0.8, 0.9], routes=["a", "b"], weights=["x.pt", "y.pt"],
                                     max_steps=7, epochs=None, warmup_lr=None, min_lr_ratio=0.01, amp="bf16")
    for config in (TrainConfig(), changed, *(recipe_config(n) for n in recipe_names())):
        assert TrainConfig.from_dict(config.to_dict()) == config
        assert TrainConfig.from_dict(yaml.safe_load(config.to_yaml())) == config
        assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_settings_are_named_by_path_or_by_their_unique_leaf_name():
    paths = leaf_paths()
    assert len(paths) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values())  # no name in two sections
    config = TrainConfig().override({"optim.lr": 1e-3}, batch_size=32, distill_alpha=0.3)  # the last: an old name
    assert (config.optim.lr, config.data.batch_size, config.distill.alpha) == (1e-3, 32, 0.3)
    assert setting_path("num_workers") == "data.workers" and setting_path("optim.lrr") is None
    with pytest.raises(ConfigError, match=r"unknown setting 'epoch' \(did you mean epochs"):
        TrainConfig().override(epoch=3)
    assert NOT_RESULT_SETTINGS <= {f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)}


@pytest.mark.parametrize("data, says", [
    ({"optim": {"lr": -1}}, "optim.lr must be > 0 and finite, got -1"),  # the value given, not a scaled one
    ({"optim": {"lr": "fast"}}, "optim.lr must be a number, got 'fast'"),
    ({"optim": {"lrr": 1}}, "unknown setting optim.lrr (did you mean optim.lr"),
    ({"data": {"batch_size": 7, "mixup": 0.8}}, "even batch size"),
    ({"sampling": {"sampler": "fancy"}}, "unknown sampler 'fancy'"),
    ({"schedule": {"epochs": None}}, "give schedule.max_steps"),
    ({"data": {"limit": 1.5}}, "data.limit must be a whole number or null, got 1.5"),
    ({"space": {"routes": "a.json"}}, "space.routes must be a list of texts or null"),
    ({"run": {"resume": "auto", "overwrite": True}}, "give one of them"),
    ({"model": {"init": "saved/", "drop_path": 0.1}}, "model.drop_path is set when the anchors are built"),
    # the saved network's own head and weights were trained on, the settings given ignored
    ({"model": {"init": "saved/", "weights": ["a.pt", "b.pt"]}}, "model.weights is set when the anchors are built"),
    ({"task": "translation"}, "unknown task 'translation'"),
    ({"optim": [1, 2]}, "optim must be a mapping of settings"),
    ({"optim": {"optimizer": "sgd", "momentum": 0}}, "optim.nesterov needs optim.momentum > 0"),  # torch refused it at the first step
    # an unknown interpolation failed only when the training transform was built, 3-Augment's in a KeyError traceback
    ({"data": {"interpolation": "bogus"}}, "unknown data.interpolation 'bogus'; use one of nearest, bilinear"),
    ({"data": {"three_augment": True, "interpolation": "random"}}, "data.three_augment resizes with one interpolation"),
])
def test_bad_values_are_one_line_naming_the_setting(data, says):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(data)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_hardware_is_checked_when_a_run_starts_not_when_settings_load(tmp_path):
    """A configuration written on a GPU machine loads on a CPU one; the run refuses the device."""
    from snnet.train import train

    config = TrainConfig().override(device="cuda:7", out_dir=str(tmp_path / "run"), progress=False)
    assert TrainConfig.from_yaml(_write(tmp_path / "gpu.yaml", config.to_yaml())).run.device == "cuda:7"

    with pytest.raises(ConfigError, match="cuda"):
        train(fresh_net(), Synthetic(16), config.override(batch_size=8))
    assert not (tmp_path / "run").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- recipes


def test_every_recipe_loads_sets_only_what_it_needs_and_says_where_each_value_comes_from():
    assert {"deit", "swin", "resnet", "resnet-swin", "levit", "demo", "demo-blocks", "fmnist-family"} <= set(recipe_names())
    for name in recipe_names():
        settings = load_recipe(name)
        assert set(settings) <= {"task", *SECTIONS}, name
        assert len([1 for s in settings.values() for _ in s]) < len(leaf_paths()), name  # partial: the rest defaults
        lines = (RECIPES_DIR / f"{name}.yaml").read_text().splitlines()
        assert lines[0].startswith(f"# {name}:"), name  # what it is, and its source, first
        for k, line in enumerate(lines):
            value = re.match(r"^\s+\w+: \S", line)
            # every value has its source or reason beside it or in the comment lines just above
            assert not value or "#" in line or lines[k - 1].lstrip().startswith("#"), (name, line)
    assert recipe_config("deit").rates(8).lr == pytest.approx(1e-4)  # 5e-5 at 512 -> 8 x 128
    with pytest.raises(RecipeError, match="unknown recipe 'vit'; use one of"):
        recipe_config("vit")


def test_a_new_recipe_is_a_new_file(tmp_path, monkeypatch, capsys):
    import snnet.recipes as recipes

    folder = tmp_path / "recipes"
    shutil.copytree(RECIPES_DIR, folder, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (folder / "mine.yaml").write_text("# mine: a test recipe\noptim:\n  lr: 1.0e-03  # mine\n")
    monkeypatch.setattr(recipes, "RECIPES_DIR", folder)
    assert "mine" in recipe_names() and recipe_config("mine").optim.lr == 1e-3
    assert yaml.safe_load(_printed(capsys, "train", "--recipe", "mine", "--print-config"))["optim"]["lr"] == 1e-3


def test_a_recipe_laid_over_another_sets_only_what_differs(tmp_path, monkeypatch, capsys):
    import snnet.recipes as recipes

    converged, family = recipe_config("fmnist-converged"), recipe_config("fmnist-family")
    assert [p.stem for p in recipes.recipe_layers("fmnist-converged")] == ["fmnist-family", "fmnist-converged"]
    assert not converged.data.augment and converged.schedule.epochs == 24 and family.data.augment
    assert converged.override(augment=True, epochs=12) == family  # nothing else differs
    printed = yaml.safe_load(_printed(capsys, "train", "--recipe", "fmnist-converged", "--print-config"))
    assert printed["data"]["augment"] is False and printed["optim"]["lr"] == 0.002 and "recipe" not in printed
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "a.yaml").write_text("# a: loops\nrecipe: b  # b\n")
    (folder / "b.yaml").write_text("# b: loops\nrecipe: a  # a\n")
    monkeypatch.setattr(recipes, "RECIPES_DIR", folder)
    with pytest.raises(RecipeError, match="builds on itself"):
        recipe_config("a")


# ---------------------------------------------------------------------------- the command line


def test_print_config_gives_back_the_same_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command, extra in (("train", []), ("train", ["--recipe", "swin", "--lr", "1e-3", "--two-way"]),
                           ("demo", ["--quick", "--demo.eval_split", "val"])):
        first = _printed(capsys, command, *extra, "--print-config")
        (tmp_path / "a.yaml").write_text(first)
        again = _printed(capsys, command, "--config", "a.yaml", "--print-config")
        assert again == first, (command, extra)
        assert "# snnet settings" in first and "learning rate" in first.splitlines()[0]  # the rates used, as a comment


def test_print_config_quotes_a_text_setting_that_reads_as_a_number(tmp_path, capsys, monkeypatch):
    """A folder named 1e3 was printed bare (`source: 1e3`, a string to PyYAML), and --config (jsonargparse's
    YAML 1.2 loader) read it back as the number 1000.0: "--data.source: expected a text, got '1000.0'"."""
    monkeypatch.chdir(tmp_path)
    first = _printed(capsys, "train", "--data.source", "1e3", "--run.out_dir", "1.5e3", "--print-config")
    assert "source: '1e3'" in first and "out_dir: '1.5e3'" in first
    (tmp_path / "a.yaml").write_text(first)
    assert _printed(capsys, "train", "--config", "a.yaml", "--print-config") == first
    config = TrainConfig().override(source="1e3")
    assert TrainConfig.from_yaml(_write(tmp_path / "b.yaml", config.to_yaml())) == config


def test_a_file_that_names_its_recipe_is_read_as_the_command_line_reads_it(tmp_path, capsys):
    """`recipe: deit` in a file is `--recipe deit` to `snnet train --config`; TrainConfig.from_yaml refused the
    same file with "unknown setting recipe": it now says which function reads it, and that one does."""
    from snnet.recipes import read_config

    mine = _write(tmp_path / "mine.yaml", "recipe: deit\noptim:\n  lr: 1.0e-03\n")
    with pytest.raises(ConfigError, match="names recipe 'deit': read it with snnet.recipes.read_config"):
        TrainConfig.from_yaml(mine)
    config = read_config(mine)
    assert config == recipe_config("deit").override(lr=1e-3)
    assert config == TrainConfig.from_dict(yaml.safe_load(_printed(capsys, "train", "--config", str(mine),
                                                                   "--print-config")))


def test_layers_apply_in_order_whatever_their_order_on_the_line(tmp_path, capsys):
    mine = _write(tmp_path / "mine.yaml", "optim:\n  lr: 2.0e-03\ndata:\n  batch_size: 32\n")
    printed = _printed(capsys, "train", "--optim.lr", "1e-3", "--config", str(mine), "--recipe", "deit", "--print-config")
    settings = yaml.safe_load(printed)
    assert settings["optim"]["lr"] == 1e-3  # the command line over the file
    assert settings["data"]["batch_size"] == 32  # the file over the recipe
    assert settings["schedule"]["epochs"] == 50  # the recipe over the defaults
    assert settings["run"]["out_dir"] == TrainConfig().run.out_dir  # the defaults under everything
    # dashes and underscores are the same in option names; old options still work
    dashed = yaml.safe_load(_printed(capsys, "train", "--data.batch-size", "16", "--out", "o", "--print-config"))
    assert (dashed["data"]["batch_size"], dashed["run"]["out_dir"]) == (16, "o")


def test_every_old_option_sets_a_real_setting():
    for table in (TRAIN_LEGACY, DEMO_LEGACY):
        for flag, old in table.items():
            section = old.path.partition(".")[0]
            assert old.kind == "set" or section == "demo" or setting_path(old.path) == old.path, flag


@pytest.mark.parametrize("args, says", [
    (["--optim.lr", "fast"], "--optim.lr: expected a number, got 'fast'"),
    (["--lr", "-1"], "optim.lr must be > 0 and finite, got -1"),
    (["--bogus", "1"], "no such option: --bogus"),
    (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
    (["--set", "mixup"], "--set takes FIELD=VALUE"),
    (["--recipe", "vit"], "unknown recipe 'vit'"),
])
def test_bad_command_lines_are_one_line(capsys, tmp_path, args, says):
    assert says in _refused(capsys, "train", *args, "--out", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_a_bad_config_file_is_one_line_naming_it(capsys, tmp_path):
    bad = _write(tmp_path / "bad.yaml", "optim:\n  lrr: 3\n")
    assert "unknown setting optim.lrr in --config" in _refused(capsys, "train", "--config", str(bad))
    # a setting's own name at the top of a file had no hint where it goes
    flat = _write(tmp_path / "flat.yaml", "lr: 1.0e-3\n")
    assert "unknown setting lr in --config" in (says := _refused(capsys, "train", "--config", str(flat)))
    assert "(did you mean optim.lr?)" in says
    with pytest.raises(ConfigError, match=r"unknown setting lr \(did you mean optim.lr\?\)"):
        TrainConfig.from_dict({"lr": 1e-3})
    broken = _write(tmp_path / "broken.yaml", ": : :\n")
    assert "cannot be read as YAML" in _refused(capsys, "train", "--config", str(broken))


def test_help_is_generated_from_the_tree(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    for path in ("--optim.lr", "--data.batch_size", "--schedule.warmup_ratio", "--run.keep_checkpoints"):
        assert path in out
    assert "linear scaling rule" in out  # a field's docstring is its help


# ---------------------------------------------------------------------------- runs written before the tree


def test_a_run_saved_before_the_tree_loads_its_settings():
    config = load_run_config(DATA / "run-v1" / "run")  # train_config.json as fa1757f wrote it
    assert (config.schedule.epochs, config.data.batch_size, config.sampling.sampler) == (2, 8, "flops_bucketed")
    assert (config.optim.lr, config.optim.lr_base_batch, config.schedule.warmup_steps) == (1e-3, None, 2)


def test_the_earlier_recipe_call_form_still_trains(tmp_path):
    """README: ``train_config, optim_config = get_recipe("deit").configs(...); train(net, data, train_config, optim_config)``."""
    from snnet.recipes import get_recipe
    from snnet.train import train

    train_config, optim_config = get_recipe("deit").override(mixup=0, cutmix=0, teacher=None).configs(
        world_size=1, out_dir=str(tmp_path / "run"), batch_size=8, max_steps=2, progress=False, drop_path=0.0)
    assert optim_config == recipe_config("deit").optim
    result = train(fresh_net(), Synthetic(16), train_config, optim_config)
    assert result.finished and result.step == 2


@pytest.mark.parametrize("command, switch", [("train", "--overwrite=false"), ("train", "--augment=false"),
                                             ("train", "--two-way=no"), ("demo", "--distill=false")])
def test_an_old_switch_given_a_value_is_refused_not_turned_on(capsys, tmp_path, command, switch):
    """`--overwrite=false` set run.overwrite to true (deleting the run in --out): the value was dropped."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"kept")
    says = _refused(capsys, command, switch, "--out", str(run), "--print-config")
    assert f"{switch.partition('=')[0]} is a switch and takes no value" in says
    assert (run / "checkpoint.pt").read_bytes() == b"kept"


@pytest.mark.parametrize("command, switch, more", [("demo", "--quick=false", ["--print-config"]),
                                                   ("train", "--print-config=no", []),
                                                   ("train", "--print_config=false", []),
                                                   ("train", "--print-recipe=0", ["--print-config"])])
def test_a_commands_own_switch_given_a_value_is_refused_not_turned_on(capsys, command, switch, more):
    """`snnet demo --quick=false` ran the 20-step smoke demo and `snnet train --print-config=no` printed the settings
    instead of training: the value of the command's own switches was dropped, as that of the old ones had been."""
    says = _refused(capsys, command, switch, *more)
    assert f"{switch.partition('=')[0]} is a switch and takes no value, got {switch!r}" in says


def test_an_empty_or_all_comments_config_file_sets_nothing(capsys, tmp_path):
    """An empty --config file (or one whose settings are all commented out) was refused: `error: Unexpected config:`."""
    default = _printed(capsys, "train", "--print-config")
    for text in ("", "# optim:\n#   lr: 1.0e-03\n"):
        empty = _write(tmp_path / "empty.yaml", text)
        assert _printed(capsys, "train", "--config", str(empty), "--print-config") == default


def test_a_config_file_that_names_a_recipe_is_laid_over_it(capsys, tmp_path):
    """`recipe: deit` in a --config file was accepted and silently ignored (the tree's defaults, or the demo's)."""
    mine = _write(tmp_path / "mine.yaml", "recipe: deit\ndata:\n  batch_size: 32\n")
    settings = yaml.safe_load(_printed(capsys, "train", "--config", str(mine), "--print-config"))
    assert settings["data"]["batch_size"] == 32 and settings["schedule"]["epochs"] == 50  # the file over deit
    assert settings == yaml.safe_load(_printed(capsys, "train", "--recipe", "deit", "--config", str(mine),
                                               "--print-config"))
    blocks = _write(tmp_path / "blocks.yaml", "recipe: demo-blocks\n")  # the demo's own recipe replaced
    demo = yaml.safe_load(_printed(capsys, "demo", "--config", str(blocks), "--print-config"))
    assert demo["schedule"]["max_steps"] == recipe_config("demo-blocks").schedule.max_steps != \
        recipe_config("demo").schedule.max_steps
    assert "name different recipes" in _refused(capsys, "train", "--recipe", "swin", "--config", str(mine))
    assert "unknown recipe 'nope'" in _refused(capsys, "train", "--config", str(_write(tmp_path / "n.yaml", "recipe: nope\n")))


def test_every_list_setting_takes_comma_separated_words_and_demo_weights_a_folder(capsys, tmp_path):
    """docs/configuration.md: lists are YAML or comma-separated words. Only four settings took words: `--demo.weights
    FOLDER` (the documented form of the demo's `--weights FOLDER`) was refused, `expected null or a list`."""
    demo = yaml.safe_load(_printed(capsys, "demo", "--demo.weights", str(tmp_path), "--demo.budgets", "0.1,0.5",
                                   "--print-config"))["demo"]
    assert demo["weights"] == [str(tmp_path)] and demo["budgets"] == [0.1, 0.5]
    assert demo["weights"] == yaml.safe_load(_printed(capsys, "demo", "--weights", str(tmp_path), "--print-config"))[
        "demo"]["weights"]
    train = yaml.safe_load(_printed(capsys, "train", "--model.drop_path", "0.1,0.2", "--sampling.sampler", "weighted",
                                    "--sampling.weighted_stitches", "1,fmnist_vit_s", "--print-config"))
    assert train["model"]["drop_path"] == [0.1, 0.2] and train["sampling"]["weighted_stitches"] == [1, "fmnist_vit_s"]
    assert yaml.safe_load(_printed(capsys, "train", "--model.drop_path=0.1", "--print-config"))["model"]["drop_path"] == 0.1


def _help(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_defaults_of_the_recipe_the_command_starts_from(capsys):
    """`snnet demo --help` said `--optim.lr ... (default: 0.0004)` and `--schedule.max_steps ... (default: null)`: the
    tree's defaults, while the demo trains at the demo recipe's 0.012 for 5000 steps."""
    demo = recipe_config("demo")
    out = _help(capsys, "demo", "--help")
    assert re.search(r"--optim\.lr LR .*?\(type: float, default: ([^)]*)\)", out)[1] == f"{demo.optim.lr:g}"
    assert re.search(r"--schedule\.max_steps MAX_STEPS .*?default: ([^)]*)\)", out)[1] == str(demo.schedule.max_steps)
    deit = _help(capsys, "train", "--recipe", "deit", "--help")
    assert re.search(r"--optim\.lr LR .*?default: ([^)]*)\)", deit)[1] == f"{recipe_config('deit').optim.lr:g}"
    plain = _help(capsys, "train", "--help")
    assert re.search(r"--optim\.lr LR .*?default: ([^)]*)\)", plain)[1] == f"{TrainConfig().optim.lr:g}"


@pytest.mark.parametrize("args, says", [
    (["--rec", "deit"], "no such option: --rec (did you mean --recipe"),
    (["--data.batch", "8"], "no such option: --data.batch (did you mean --data.batch_size"),
])
def test_an_option_is_named_in_full_not_by_a_prefix(capsys, args, says):
    """argparse took prefixes: `--rec deit` matched --recipe, which the parse then dropped, so the recipe was
    silently ignored (the tree's defaults trained)."""
    assert says in _refused(capsys, "train", *args, "--print-config")


def test_the_routes_file_whose_cut_is_checked(tmp_path) -> None:
    """Which routes file space.routes comes from, whichever option gave it (the last one that sets the routes wins),
    and the check of the cut it records (`snnet stitches --select klas --json`'s) against the run's space.cut."""
    from snnet.commands.config_cli import _check_routes_cut, _lists, _translate

    names = ["snnet_tiny_vit_ti[:3]+snnet_tiny_vit_s[3:]"]
    klas, plain = tmp_path / "klas.json", tmp_path / "plain.json"
    klas.write_text(json.dumps({"routes": names, "cut": "sublayer"}))
    plain.write_text(json.dumps(names))

    def source(*argv: str):
        file = _translate(list(argv), TRAIN_LEGACY, {}, _lists())[4]
        return file and (Path(file.path).name, file.cut)

    for given in (["--routes", str(klas)], ["--space.routes", str(klas)], [f"--space.routes={klas}"],
                  ["--set", f"routes={klas}"], ["--routes", str(plain), "--routes", str(klas)]):
        assert source(*given) == ("klas.json", "sublayer"), given
    assert source("--routes", str(plain)) == ("plain.json", None)  # a plain list: read with the run's own cut
    assert source("--routes", str(klas), "--space.routes", json.dumps(names)) is None  # replaced by a later list
    assert source("--lr", "0.1") is None
    file = _translate(["--routes", str(klas)], TRAIN_LEGACY, {}, _lists())[4]
    _check_routes_cut(file, "sublayer")
    with pytest.raises(ConfigError, match="add --space.cut sublayer"):
        _check_routes_cut(file, "block")
    _check_routes_cut(_translate(["--routes", str(plain)], TRAIN_LEGACY, {}, _lists())[4], "block")


def test_a_refused_resume_from_another_runs_checkpoint_prints_a_command_that_resumes_from_it(capsys, tmp_path):
    """`--resume a/checkpoint.pt --out b` with a change was refused with a command ending `--resume auto`, which finds
    no checkpoint in b and trains a fresh run there instead of continuing a's."""
    import shlex

    from snnet.commands.config_cli import parse
    from snnet.runlock import check_run_folder
    from snnet.train import train

    from .conftest import TINY_VITS, _image_folder, cfg

    first = train(fresh_net(), Synthetic(16), cfg(tmp_path, max_steps=2, init_images=0))
    checkpoint = first.checkpoint
    says = _refused(capsys, "train", "--anchors", ",".join(TINY_VITS[:2]), "--data", str(_image_folder(tmp_path / "i")),
                    "--device", "cpu", "--out", str(tmp_path / "b"), "--resume", str(checkpoint), "--max-steps", "4")
    command = shlex.split(says.split("(the command: ")[1].rstrip().rstrip(")"))
    assert command[:2] == ["snnet", "train"] and command[-1] == "--resume-with-changes"
    run = parse(command[2:], "snnet train").config.run
    # the printed command continues the checkpoint it was refused for, not a fresh run in --out
    assert check_run_folder(run.out_dir, run.resume, run.overwrite) == Path(checkpoint)


@pytest.mark.parametrize("args, option", [(["demo", "--epochs", "3"], "--epochs"), (["demo", "--set", "seed=1"], "--set"),
                                          (["demo", "--lm", "--weights", "w"], "--weights")])
def test_an_unknown_option_is_never_answered_with_itself(capsys, args, option):
    """`snnet demo --epochs 3` said "no such option: --epochs (did you mean --epochs or ...?)": the hints came from
    `snnet train`'s old options, which the demo does not take."""
    says = _refused(capsys, *args, "--print-config")
    assert f"no such option: {option}" in says and option not in says.partition("did you mean")[2]


def test_the_language_model_demos_settings_file_runs_the_language_model_demo(capsys, tmp_path):
    """`snnet demo --lm --print-config > lm.yaml; snnet demo --config lm.yaml` was refused ("unknown setting
    demo.eval_blocks"), and `snnet demo --recipe lm-demo` ran the image demo on 'stdlib-lm' ("neither a family"):
    only `--lm` and `--task causal-lm` on the line asked for the language-model demo, not the task a file set."""
    pytest.importorskip("transformers")
    first = _printed(capsys, "demo", "--lm", "--print-config")
    lm = _write(tmp_path / "lm.yaml", first)
    assert _printed(capsys, "demo", "--config", str(lm), "--print-config") == first
    assert _printed(capsys, "demo", "--recipe", "lm-demo", "--print-config") == first
    assert "eval_blocks" not in _printed(capsys, "demo", "--print-config")  # the image demo still by default


@pytest.mark.parametrize("words", [["--routes", "R"], ["--space.routes", "R"], ["--set", "routes=R"]])
def test_a_routes_file_that_is_not_text_is_one_line(capsys, tmp_path, words):
    """`--routes model.safetensors` (a binary file given by mistake) ended in a UnicodeDecodeError traceback."""
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    says = _refused(capsys, "train", *[w.replace("R", str(binary)) for w in words], "--print-config")
    assert f"--routes {binary} is not a text file" in says


def test_a_resume_refused_for_an_overwrite_the_recipe_set_says_how_to_resume(capsys):
    """`snnet train --recipe demo --resume auto` was refused with "--overwrite deletes the run that --resume would
    continue: give one of them", an --overwrite nobody gave (the demo recipe sets run.overwrite), and no way on."""
    says = _refused(capsys, "train", "--recipe", "demo", "--resume", "auto", "--print-config")
    assert "give one of them" in says and "add --run.overwrite false" in says
    resumed = yaml.safe_load(_printed(capsys, "train", "--recipe", "demo", "--resume", "auto", "--run.overwrite", "false",
                                      "--print-config"))["run"]
    assert (resumed["resume"], resumed["overwrite"]) == ("auto", False)  # the way it names works


def test_a_config_file_section_with_every_setting_commented_out_sets_nothing(capsys, tmp_path):
    """`data:` with the settings under it commented out set the whole section to null ("error: data must be a
    mapping of settings, got None"), the recipe's values of it included; an empty file already set nothing."""
    mine = _write(tmp_path / "mine.yaml", "recipe: deit\ndata:\n#  batch_size: 32\noptim:\n  lr: 1.0e-03\n")
    settings = yaml.safe_load(_printed(capsys, "train", "--config", str(mine), "--print-config"))
    assert settings == yaml.safe_load(_printed(capsys, "train", "--recipe", "deit", "--optim.lr", "1e-3",
                                               "--print-config"))
    assert settings["data"]["batch_size"] == recipe_config("deit").data.batch_size
    demo = _write(tmp_path / "demo.yaml", "demo:\n#  zoo: false\n")  # a command's own section: a traceback
    assert _printed(capsys, "demo", "--config", str(demo), "--print-config") == _printed(capsys, "demo", "--print-config")


def test_a_section_with_every_setting_commented_out_sets_nothing_through_the_python_api(tmp_path):
    """The same file read by TrainConfig.from_yaml or snnet.recipes.read_config (the command line's reader) was
    refused: "data must be a mapping of settings, got None" (found by review); the section sets nothing there too."""
    from snnet.recipes import read_config

    plain = _write(tmp_path / "plain.yaml", "data:\n#  batch_size: 32\noptim:\n  lr: 1.0e-03\n")
    assert TrainConfig.from_yaml(plain) == read_config(plain) == TrainConfig().override(lr=1e-3)
    mine = _write(tmp_path / "mine.yaml", "recipe: deit\ndata:\n#  batch_size: 32\n")
    assert read_config(mine) == recipe_config("deit")  # the recipe's data section kept, not its defaults

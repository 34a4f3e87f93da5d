"""The command line of the configuration tree: ``snnet train`` and ``snnet demo`` parse it here.

The parser is generated from :class:`snnet.config.TrainConfig` by jsonargparse (one option per
setting, named by its path: ``--optim.lr``, ``--data.batch_size``; help from each field's
docstring), so no command declares a setting of its own. What this module adds around it:

* layering: the tree's defaults < ``--recipe NAME`` (or a command's own default recipe) <
  ``--config FILE`` (repeatable) < the other options, whatever their order on the line;
* ``-`` and ``_`` are the same in option names (``--data.batch-size`` = ``--data.batch_size``);
* the options of earlier snnet versions (``--batch-size``, ``--lr``, ``--out``, ``--set``...),
  translated to the tree's (each command's table below; docs/configuration.md lists them);
* ``--print-config``: the resolved settings as YAML, with the learning rates used as a comment,
  which ``--config`` takes back unchanged;
* errors as one line (:class:`~snnet.errors.ConfigError`), never argparse's usage block.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ..config import SECTIONS, TrainConfig, dump_yaml_text, read_yaml
from ..errors import ConfigError

if TYPE_CHECKING:
    from .options import RoutesFile

__all__ = ["Legacy", "Parsed", "TRAIN_LEGACY", "dump_yaml", "normalise", "parse", "resume_command"]


__all__ = ["Legacy", "Parsed", "TRAIN_LEGACY", "dump_yaml", "given_task", "normalise", "parse", "resume_command"]


@dataclass(frozen=True)
class Legacy:
    """An option of an earlier snnet: the setting it sets, and how its value is read.

    ``const``: a flag without a value that sets the setting to this (``"true"``, ``"largest"``...);
    otherwise ``kind`` reads the next word: ``value`` as it is, ``list`` a comma-separated list,
    ``routes`` a routes file, read now (snnet.commands.options.read_routes), ``set`` ``FIELD=VALUE``
    for any setting named as before the tree; ``words`` reads every following word up to the next
    option, as a list (``--models a b c``)."""

    path: str
    const: str | None = None
    kind: str = "value"


# `snnet train`'s options before the configuration tree -> the settings they set
TRAIN_LEGACY: dict[str, Legacy] = {
    "--anchors": Legacy("model.anchors"), "-a": Legacy("model.anchors"),
    "--data": Legacy("data.source"), "--data-dir": Legacy("data.root"), "--limit-train": Legacy("data.limit"),
    "--batch-size": Legacy("data.batch_size"), "-b": Legacy("data.batch_size"), "--workers": Legacy("data.workers"),
    "--augment": Legacy("data.augment", "true"), "--no-augment": Legacy("data.augment", "false"),
    "--epochs": Legacy("schedule.epochs"), "--max-steps": Legacy("schedule.max_steps"),
    "--warmup-steps": Legacy("schedule.warmup_steps"), "--warmup-epochs": Legacy("schedule.warmup_epochs"),
    "--lr": Legacy("optim.lr"), "--anchor-lr-scale": Legacy("optim.anchor_lr_scale"),
    "--weight-decay": Legacy("optim.weight_decay"),
    "--sampler": Legacy("sampling.sampler"), "--num-buckets": Legacy("sampling.num_buckets"),
    "--ros-gap": Legacy("sampling.ros_gap"), "--ros-ramp": Legacy("sampling.ros_ramp"),
    "--stitch-sync": Legacy("sampling.stitch_sync"), "--ddp-grads": Legacy("sampling.ddp_grads"),
    "--two-way": Legacy("space.two_way", "true"), "--routes": Legacy("space.routes", kind="routes"),
    "--lora-rank": Legacy("space.lora_rank"), "--lora-alpha": Legacy("space.lora_alpha"),
    "--distill": Legacy("distill.teacher"), "--distill-type": Legacy("distill.type"),
    "--pretrained": Legacy("model.pretrained", "true"), "--no-pretrained": Legacy("model.pretrained", "false"),
    "--weights": Legacy("model.weights", kind="list"), "--init": Legacy("model.init"),
    "--num-classes": Legacy("model.num_classes"), "--init-images": Legacy("model.init_images"),
    "--drop-path": Legacy("model.drop_path"),
    "--out": Legacy("run.out_dir"), "-o": Legacy("run.out_dir"), "--seed": Legacy("run.seed"),
    "--device": Legacy("run.device"), "--amp": Legacy("run.amp"), "--ckpt-every": Legacy("run.ckpt_every"),
    "--resume": Legacy("run.resume"), "--overwrite": Legacy("run.overwrite", "true"),
    "--resume-with-changes": Legacy("run.resume_with_changes", "true"),
    "--progress": Legacy("run.progress", "true"), "--no-progress": Legacy("run.progress", "false"),
    "--set": Legacy("", kind="set"),
}


def _lists(extra: Mapping[str, type] | None = None) -> dict[str, bool]:
    """Every setting (of the tree, and of ``extra`` sections) that takes a list, which the command line may
    give as comma-separated words as well as a YAML list -> whether one word may also be a single value
    (``model.drop_path 0.1``: one rate, or one per anchor)."""
    import types
    import typing

    out: dict[str, bool] = {}
    for section, cls in {**SECTIONS, **(extra or {})}.items():
        for name, kind in typing.get_type_hints(cls).items():
            union = typing.get_origin(kind) in (typing.Union, types.UnionType)
            kinds = [k for k in (typing.get_args(kind) if union else (kind,)) if k is not type(None)]
            if any(typing.get_origin(k) is tuple for k in kinds):
                out[f"{section}.{name}"] = any(typing.get_origin(k) is not tuple for k in kinds)
    return out


@dataclass(frozen=True)
class Parsed:
    """A parsed command line: the configuration, any extra sections' dataclasses, and the command's own flags."""

    config: TrainConfig
    extra: dict[str, Any]
    flags: dict[str, bool]
    recipe: str | None
    argv: tuple[str, ...]  # the line as given (for the printed resume command)


def parse(argv: Sequence[str], prog: str, *, legacy: Mapping[str, Legacy] = TRAIN_LEGACY,
          extra: Mapping[str, type] | None = None, flags: Mapping[str, str] | None = None,
          default_recipe: str | None = None, description: str = "") -> Parsed:
    """Parse ``argv`` into a :class:`TrainConfig` (and ``extra`` sections), layered as the module says.

    ``flags`` are the command's own switches (``--print-config``...: name -> help), which take no
    value and are not settings. ``--help`` prints the generated help and exits."""
    from ..recipes import recipe_layers

    extra, flags = dict(extra or {}), {"--print-config": "Print the resolved settings as YAML (the learning "
                                       "rates used as a comment) and exit; --config takes the file back.",
                                       **(flags or {})}
    words, recipe, configs, given, routes = _translate(list(argv), legacy, flags, _lists(extra))
    # a missing or unreadable file is one line naming it; an empty one (or all comments) sets nothing
    # (jsonargparse refuses it: "Unexpected config")
    read = {path: read_yaml(path) for path in configs}
    filled = [path for path in configs if read[path]]
    recipe = _file_recipe(recipe, read)
    layers = recipe_layers(recipe or default_recipe) if (recipe or default_recipe) else []
    parser = _parser(prog, extra, flags, description)
    if layers and "--help" in words:  # the help's defaults are the recipe's values where it sets them
        from ..config import flatten
        from ..recipes import load_recipe

        parser.set_defaults(flatten(load_recipe(recipe or default_recipe)))  # type: ignore[arg-type]
    named = {*SECTIONS, *extra}
    args = [a for path in (*layers, *filled) for a in ("--config", _as_given(path, read.get(path), named))] + words
    try:
        ns = parser.parse_args(args)
    except SystemExit:
        raise
    except Exception as e:  # jsonargparse's ArgumentError, and what its loaders raise on a bad file
        raise ConfigError(_one_line(e, configs, legacy)) from None
    values = ns.clone(with_meta=False).as_dict()
    for key in ("config", "recipe", "print_config", *(f[2:].replace("-", "_") for f in flags)):
        values.pop(key, None)  # the command's own options, not settings
    sections = {name: values.pop(name) for name in extra}
    config = TrainConfig.from_dict(values)
    _check_routes_cut(routes, config.space.cut)
    built = {name: _build_extra(cls, sections[name], name) for name, cls in extra.items()}
    return Parsed(config, built, {f: f in given for f in flags}, recipe, tuple(argv))


def _check_routes_cut(routes: "RoutesFile | None", cut: str) -> None:
    """A routes file chosen with one cut (``snnet stitches --select klas --cut``) in a run of another: refused.

    A route's indices count blocks or sublayers, so ``a[:3]+b[3:]`` names another network under the other
    cut, most often one that exists: the run trained networks nobody chose. Refused, not the file's cut
    applied: space.cut may come from a recipe (the demo's is 'sublayer'), a --config file or an option,
    and which of those a file should silently override has no clean answer; naming the cut is one option."""
    if routes is None or routes.cut is None or routes.cut == cut:
        return
    units = {"block": "blocks", "sublayer": "sublayers (two a block)"}
    raise ConfigError(f"--routes {routes.path}: its routes were chosen with `snnet stitches --cut {routes.cut}`, whose "
                      f"indices count {units.get(routes.cut, routes.cut)}, but this run's space.cut is {cut!r}, where "
                      f"the same names are other networks: add --space.cut {routes.cut}")


def given_task(argv: Sequence[str], legacy: Mapping[str, Legacy] = TRAIN_LEGACY) -> str | None:
    """The task a command line sets in any of its layers (an option, else the last ``--config`` file that names
    one, else the recipe), or None: what a command that runs another program per task must know before it parses."""
    from ..recipes import load_recipe

    words, recipe, configs, _, _ = _translate(list(argv), legacy, {}, {})
    given = [value for word, value in zip(words, words[1:]) if word == "--task"]
    if given:
        return given[-1]
    read = {path: read_yaml(path) for path in configs}
    named = [data["task"] for data in read.values() if data.get("task") is not None]
    if named:
        return str(named[-1])
    recipe = _file_recipe(recipe, read)
    return None if recipe is None else load_recipe(recipe).get("task")


def _as_given(path: str | os.PathLike[str], data: Mapping[str, Any] | None, sections: set[str]) -> str:
    """A --config file for jsonargparse: its path, or, when a section of it is empty (``data:`` with every setting
    under it commented out), its settings without that section as YAML text: jsonargparse set the whole section
    to null, the recipe's and the tree's values of it included ("data must be a mapping of settings, got None")."""
    if data is None or all(value is not None or key not in sections for key, value in data.items()):
        return str(path)
    return json.dumps({key: value for key, value in data.items() if not (value is None and key in sections)})


def _file_recipe(recipe: str | None, files: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The recipe of the command line, or the one a ``--config`` file names (``recipe: NAME``, as a recipe names
    its base): laid under the files. Two different ones are refused in one line."""
    from ..recipes import BASE_KEY, recipe_path

    named = {path: str(data[BASE_KEY]) for path, data in files.items() if data.get(BASE_KEY) is not None}
    given = [("--recipe", recipe)] if recipe is not None else []
    given += [(f"--config {path} (recipe: {name})", name) for path, name in named.items()]
    if len({recipe_path(name) for _, name in given}) > 1:
        raise ConfigError(f"{' and '.join(where for where, _ in given)} name different recipes: give one")
    return given[0][1] if given else None


def normalise(option: str) -> str:
    """``--data.batch-size`` -> ``--data.batch_size``: dashes and underscores are the same in option names."""
    name, eq, value = option.partition("=")
    return "--" + name[2:].replace("-", "_") + eq + value


def _translate(argv: list[str], legacy: Mapping[str, Legacy], flags: Mapping[str, str],
               lists: Mapping[str, bool]) -> tuple[list[str], str | None, list[str], set[str], "RoutesFile | None"]:
    """The words jsonargparse reads (old options translated, names normalised), the recipe, the config
    files (in order), the command's flags that were given, and the routes file space.routes was read
    from (None: no file, or a later option gave the routes)."""
    words: list[str] = []
    recipe, configs, given = None, [], set()
    known_flags = {normalise(f): f for f in flags}
    routes: dict[str, RoutesFile | None] = {}  # "space.routes": the file of the last option that set them
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if not word.startswith("-") or word == "-":
            words.append(word)
            continue
        name, eq, inline = word.partition("=")

        def value() -> str:
            nonlocal i
            if eq:
                return inline
            if i >= len(argv):
                raise ConfigError(f"{name} needs a value")
            i += 1
            return argv[i - 1]

        if name in legacy and legacy[name].kind == "words":
            items = [inline] if eq else []
            while i < len(argv) and not argv[i].startswith("-"):
                items.append(argv[i])
                i += 1
            words += [f"--{legacy[name].path}", json.dumps(items)]
            continue
        if name in legacy:
            if eq and legacy[name].const is not None:  # a switch: `--overwrite=false` must not turn it on
                raise ConfigError(f"{name} is a switch and takes no value, got {word!r}: give {name} alone, or "
                                  f"--{legacy[name].path} VALUE")
            words += _legacy_words(name, legacy[name], value, routes)
            continue
        key = normalise(name) if name.startswith("--") else name
        if key in known_flags:
            if eq:  # `--quick=false` turned the switch on: the value was dropped
                raise ConfigError(f"{name} is a switch and takes no value, got {word!r}: give {known_flags[key]} alone, "
                                  "or leave it out")
            given.add(known_flags[key])
        elif key == "--recipe":
            recipe = value()
        elif key == "--config":
            configs.append(value())
        elif key in ("--help", "-h"):
            words.append("--help")
        else:
            words.append(key)
            if eq:
                words.append(inline)
            path = key[2:]
            if path in lists and i < len(argv) and not eq:
                words.append(_as_list(path, argv[i], lists[path], routes))
                i += 1
            elif path in lists and eq:
                words[-1] = _as_list(path, inline, lists[path], routes)
    return words, recipe, configs, given, routes.get("space.routes")


def _legacy_words(name: str, old: Legacy, value: Callable[[], str],
                  routes: dict[str, RoutesFile | None] | None = None) -> list[str]:
    if old.const is not None:
        return [f"--{old.path}", old.const]
    if old.kind == "set":
        field, sep, text = value().partition("=")
        from ..config import setting_path

        path = setting_path(field.strip().replace("-", "_"))
        if not sep or not field.strip():
            raise ConfigError(f"--set takes FIELD=VALUE, got {field + sep + text!r}")
        if path is None:
            raise ConfigError(f"--set {field}={text}: unknown setting {field.strip()!r}; `snnet train --help` lists them")
        text = "null" if text.strip().lower() in ("none", "null") else text.strip()
        lists = _lists()
        return [f"--{path}", _as_list(path, text, lists[path], routes) if path in lists else text]
    text = value()
    if old.kind == "routes":
        from .options import read_routes_file

        file = read_routes_file(text)
        if routes is not None:
            routes[old.path] = file
        return [f"--{old.path}", json.dumps(list(file.routes))]
    if old.kind == "list":
        return [f"--{old.path}", _as_list(old.path, text)]
    return [f"--{old.path}", text]


def _as_list(path: str, text: str, or_single: bool = False, routes: dict[str, RoutesFile | None] | None = None) -> str:
    """A list value as YAML: ``[...]`` as it is, ``a,b`` as ``["a", "b"]``; a routes file read (space.routes).
    ``or_single``: a word without a comma is one value, not a list of one. ``routes``: where the routes
    file read is kept (None when the routes are not a file), for the check of its cut."""
    stripped = text.strip()
    if path == "space.routes" and routes is not None:
        routes[path] = None  # routes given here replace an earlier option's file
    if stripped.startswith("[") or stripped.lower() in ("null", "none") or (or_single and "," not in stripped):
        return "null" if stripped.lower() == "none" else stripped
    if path == "space.routes" and os.path.exists(stripped):
        from .options import read_routes_file

        file = read_routes_file(stripped)
        if routes is not None:
            routes[path] = file
        return json.dumps(list(file.routes))
    items = [w.strip() for w in stripped.split(",") if w.strip()]
    if path in ("optim.betas", "space.stages"):
        return "[" + ", ".join(items) + "]"
    return json.dumps(items)


def _parser(prog: str, extra: Mapping[str, type], flags: Mapping[str, str], description: str) -> Any:
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from ..recipes import recipe_names

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # each setting's help is its docstring
    parser = ArgumentParser(prog=prog, usage=f"{prog} [--recipe NAME] [--config FILE] [--SECTION.SETTING VALUE ...]",
                            description=description, exit_on_error=False,
                            # no prefixes: `--rec deit` matched --recipe, which the parse drops (the recipe ignored)
                            allow_abbrev=False,
                            epilog="Options of earlier snnet versions (--batch-size, --lr, --out, --set FIELD=VALUE, "
                                   "...) still work: docs/configuration.md lists them with the settings they set.")
    parser.add_argument("--config", action=ActionConfigFile,
                        help="A YAML file of settings (repeatable; later files and other options win).")
    parser.add_argument("--recipe", type=str, default=None,
                        help=f"A recipe (snnet/recipes/NAME.yaml: {', '.join(recipe_names())}): laid under --config "
                             "files and options.")
    for flag, text in flags.items():
        parser.add_argument(flag, action="store_true", help=text)
    for action in parser._actions:  # jsonargparse's own --print_config is --print-config's other spelling
        if "--print_config" in action.option_strings:
            action.help = "The same as --print-config."
    parser.add_class_arguments(TrainConfig, as_group=False, skip=set(SECTIONS))
    for name, cls in {**SECTIONS, **extra}.items():
        group = parser.add_argument_group(f"{name}: {(cls.__doc__ or '').strip().splitlines()[0].rstrip('.')}")
        group.add_class_arguments(cls, name, as_group=False)
    return parser


def _build_extra(cls: type, values: Mapping[str, Any], name: str) -> Any:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields})


def _one_line(e: BaseException, configs: Sequence[str], legacy: Mapping[str, Legacy] = TRAIN_LEGACY) -> str:
    """jsonargparse's error (several lines) as one: which option, what it expected, what it got. ``legacy``:
    the command's own old options, the only ones a hint may name (`snnet demo --epochs` was told "did you mean
    --epochs?", which the demo refuses)."""
    text = str(e).strip()
    m = re.search(r'Parser key "([^"]+)":', text)
    given = re.search(r"(?:Given value|Got value): (.*)$", text, re.M)
    kinds = re.findall(r"<class '(\w+)'>", re.sub(r"Given value type: .*", "", text))  # the kinds wanted, not given
    if m and given:
        names = {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "a text",
                 "tuple": "a list", "NoneType": "null"}
        wanted = " or ".join(dict.fromkeys(names.get(k, k) for k in kinds)) or "another value"
        return f"--{m.group(1)}: expected {wanted}, got {given.group(1).strip()!r}"
    m = re.search(r"Option '([^']+)' is not accepted", text)
    if m:
        import difflib

        from ..config import setting_path

        # a setting's own name at the top of a file (lr: 1e-3) is its path's leaf, which difflib does not match
        leaf = setting_path(m.group(1)) if "." not in m.group(1) else None
        close = [leaf] if leaf and leaf != m.group(1) else difflib.get_close_matches(m.group(1), _all_paths(), n=2)
        where = f" in --config {', '.join(configs)}" if configs else ""
        return f"unknown setting {m.group(1)}{where}" + (f" (did you mean {' or '.join(close)}?)" if close else "")
    m = re.search(r"[Uu]nrecognized arguments: (.*)", text)
    if m:
        import difflib

        bad = m.group(1).split()[0]
        options = [normalise(f"--{p}") for p in _all_paths()] + list(legacy) + ["--recipe", "--config"]
        close = difflib.get_close_matches(normalise(bad) if bad.startswith("--") else bad, options, n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return f"no such option: {bad}{hint}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _all_paths() -> list[str]:
    from ..config import leaf_paths

    return list(leaf_paths().values())


# ---------------------------------------------------------------------------- writing settings back


def dump_yaml(config: TrainConfig, extra: Mapping[str, Any] | None = None, world_size: int = 1) -> str:
    """The settings as YAML for ``--print-config``: every value, the learning rates used as a comment.

    Only the values decide the text, so printing the file's own settings gives the file back."""
    from ..model import expand_family

    lines = [f"# snnet settings (--config FILE takes this back); {config.describe_rates(world_size)}"]
    try:
        members = expand_family(config.model.anchors)
    except Exception:  # noqa: BLE001 - a comment only; the anchors are checked when the run starts
        members = []
    if members and "," not in config.model.anchors:
        lines.append(f"# model.anchors {config.model.anchors}: {', '.join(members)}")
    data = config.to_dict()
    for name, section in (extra or {}).items():
        data[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
    return "\n".join(lines) + "\n" + dump_yaml_text(data)


def resume_command(argv: Sequence[str], command: str, overwrite_set: bool, resume: str = "auto") -> str:
    """The command line that continues this run: the same words without ``--resume``, ``--overwrite`` and
    ``--resume-with-changes``, then ``--resume RESUME`` (under torchrun, torchrun's own launcher around it).
    ``overwrite_set``: the settings ask for ``run.overwrite`` from a file, which the command must turn off.
    ``resume``: ``auto`` once the run has checkpointed into its folder; the checkpoint it was given before
    (which may be another run's: ``--resume a/checkpoint.pt --out b``)."""
    import shlex

    dropped = {"--resume": True, "--run.resume": True, "--overwrite": False, "--resume-with-changes": False,
               "--run.overwrite": True, "--run.resume_with_changes": True}
    words: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        name, eq, _ = word.partition("=")
        key = normalise(name) if name.startswith("--") and "." in name else name
        takes_value = dropped.get(key, dropped.get(name))
        if takes_value is None:
            words.append(word)
        elif takes_value and not eq:
            i += 1  # its value goes too
        i += 1
    if overwrite_set:
        words += ["--run.overwrite", "false"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = ["torchrun", "--nproc_per_node", str(world), "-m", "snnet"] if world > 1 else ["snnet"]
    if world > 1 and os.environ.get("SNNET_LAUNCHER"):  # started by python -m snnet.launch (snnet.launch)
        launcher = shlex.split(os.environ["SNNET_LAUNCHER"])
    return shlex.join([*launcher, command, *words, "--resume", resume])

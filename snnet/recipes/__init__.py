"""Training recipes as data: ``snnet/recipes/<name>.yaml``, each a partial :class:`~snnet.config.TrainConfig`.

A recipe sets only what it needs (the rest keeps the tree's defaults) and says in YAML comments
where every value comes from and what of its source snnet does not reproduce. The paper's
recipes (``deit``, ``swin``, ``resnet``, ``resnet-swin``, ``levit``) hold the authors' released
code's values (ziplab/SN-Net at commit c2dcf30); ``demo`` is ``snnet demo``'s training
(laid over ``demo-blocks``, the demo's training before it cut inside blocks),
``fmnist-family`` how the shipped Fashion-MNIST family and zoo were trained and
``fmnist-converged`` the recipe chosen on the validation split that trains them until they stop
improving. Adding a recipe is adding a YAML file here; a recipe that is another one with a few
changes says so with a top-level ``recipe: BASE`` and sets only what differs.

Settings are layered, each over the one before: the tree's defaults < a recipe < config files <
the command line (``snnet train --recipe deit --config mine.yaml --optim.lr 1e-4``).

Learning rates follow the linear scaling rule (:meth:`~snnet.config.TrainConfig.rates`):
``optim.lr`` is the rate at a global batch of ``optim.lr_base_batch`` (512 in the paper's code),
so 5e-5 becomes 1e-4 on 8 processes of 128 images.

    from snnet.recipes import recipe_config
    config = recipe_config("deit").override(epochs=30, out_dir="runs/deit")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TrainConfig, merge, read_yaml
from ..errors import SnnetError

__all__ = ["BASE_KEY", "RECIPES_DIR", "Recipe", "RecipeError", "get_recipe", "load_recipe", "recipe_config", "recipe_layers",
           "recipe_names", "recipe_path", "read_config"]

RECIPES_DIR = Path(__file__).parent
BASE_KEY = "recipe"
"""A recipe's top-level key naming the recipe it is laid over (the command line's ``--recipe``, in the file)."""


class RecipeError(SnnetError, ValueError):
    """A recipe that does not exist, or whose settings do not fit the configuration tree."""


def recipe_names() -> list[str]:
    """The shipped recipes' names (their files' stems)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The file of recipe ``name`` (case and ``_``/``-`` do not matter)."""
    key = name.strip().lower().replace("_", "-")
    path = RECIPES_DIR / f"{key}.yaml"
    if not path.is_file():
        raise RecipeError(f"unknown recipe {name!r}; use one of {', '.join(recipe_names())}")
    return path


def recipe_layers(name: str) -> list[Path]:
    """The files recipe ``name`` is made of, each laid over the one before: its base's (``recipe: BASE``,
    recursively) first, its own last."""
    chain = [recipe_path(name)]
    while (base := read_yaml(chain[0]).get(BASE_KEY)) is not None:
        path = recipe_path(str(base))
        if path in chain:
            raise RecipeError(f"recipe {name!r} builds on itself ({' <- '.join(p.stem for p in [path, *chain])})")
        chain.insert(0, path)
    return chain


def load_recipe(name: str) -> dict[str, Any]:
    """Recipe ``name``'s settings (its base's with its own laid over) as a partial nested dict, checked against the tree."""
    settings: dict[str, Any] = {}
    for path in recipe_layers(name):
        settings = merge(settings, {k: v for k, v in read_yaml(path).items() if k != BASE_KEY})
    try:
        TrainConfig().merged(settings)
    except SnnetError as e:
        raise RecipeError(f"recipe {name!r} ({recipe_path(name)}): {e}") from e
    return settings


def recipe_config(name: str | None, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the tree's defaults) with recipe ``name`` laid over it (None: ``base`` itself)."""
    base = base if base is not None else TrainConfig()
    return base if name is None else base.merged(load_recipe(name))


def read_config(path: str | Path) -> TrainConfig:
    """A configuration file laid over the recipe it names (``recipe: NAME``), if it names one, else over the
    tree's defaults: the file as ``snnet train --config`` reads it."""
    data = read_yaml(path)
    base = data.pop(BASE_KEY, None)
    return recipe_config(None if base is None else str(base)).merged(data)


class Recipe:
    """A recipe in the earlier call form (``get_recipe("deit").configs(...)``); today's is :func:`recipe_config`.

    ``configs`` returns the configuration and its optimizer section, which :func:`snnet.train.train`
    takes as ``train(net, data, config, optim)``; the linear scaling rule is applied when the run
    starts, on its real number of processes (``world_size`` is accepted and not needed)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config

    def override(self, **changes: Any) -> "Recipe":
        """A copy with settings changed by name (``epochs=30``; names before the tree work too)."""
        return Recipe(self.config.override(**changes))

    def configs(self, *, world_size: int = 1, **run: Any) -> tuple[TrainConfig, Any]:
        config = self.config.override(**run)
        return config, config.optim


def get_recipe(name: str | None) -> Recipe:
    """Recipe ``name`` (None: the tree's defaults) in the earlier call form; see :class:`Recipe`."""
    return Recipe(recipe_config(name))

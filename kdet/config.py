"""Recipes: plain Python files that define ``recipe``, a nested dict.

A recipe reuses a base by importing it (the recipe's folder is on ``sys.path``
while it runs) and merging with :func:`merge`::

    from _base_ssd import recipe as base
    recipe = merge(base, dict(model=dict(width_multiplier=0.25)))

Data sources are Python calls (``voc(...)``, ``shapes(...)``); a source given as
a callable of one argument, e.g. ``partial(voc, split="trainval")``, is called
with ``data["root"]``, so ``--set data.root=/my/VOCdevkit`` re-roots a recipe.
"""

import ast
import copy
import os
import runpy
import sys


class RecipeError(ValueError):
    """A recipe that cannot be read or a bad override; the message is one line."""


def merge(base, override):
    """Deep-merge dict ``override`` into a copy of ``base`` (dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(path, overrides=()):
    """Run the recipe file at ``path`` and return its ``recipe`` dict with ``overrides`` applied."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise RecipeError(f"recipe not found: {path}")
    folder = os.path.dirname(path)
    sys.path.insert(0, folder)
    try:
        namespace = runpy.run_path(path)
    except Exception as err:  # a recipe is user code: report it in one line
        raise RecipeError(f"recipe {path} failed to run: {type(err).__name__}: {err}") from err
    finally:
        sys.path.remove(folder)
    if not isinstance(namespace.get("recipe"), dict):
        raise RecipeError(f"recipe {path} defines no dict named 'recipe'")
    recipe = copy.deepcopy(namespace["recipe"])
    recipe.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    for item in overrides:
        apply_override(recipe, item)
    return recipe


def apply_override(recipe, item):
    """Apply one ``key.sub=value`` override; the key must already exist in the recipe."""
    if "=" not in item:
        raise RecipeError(f"bad --set {item!r}: expected key=value, e.g. train.epochs=10")
    key, raw = item.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = recipe
    for i, part in enumerate(parents):
        if not isinstance(node.get(part), dict):
            raise RecipeError(f"bad --set key {key!r}: recipe has no section {'.'.join(parents[:i + 1])!r}")
        node = node[part]
    if leaf not in node:
        known = ", ".join(sorted(node))
        raise RecipeError(f"bad --set key {key!r}: no such key (known here: {known})")
    node[leaf] = parse_value(raw)


def parse_value(raw):
    """Python literal when it parses (numbers, lists, None, True), else the plain string."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def resolve_source(source, root, data=None):
    """A data source from a recipe entry: a source object, or a callable of the data root.

    Factories marked ``reads_recipe_data`` (``kdet.data.sources.auto``) also get
    the recipe's data section ``data`` (its ``val_fraction``, ``split_seed``, ...).
    """
    if source is None or hasattr(source, "records"):
        return source
    if callable(source):
        if root is None:
            raise RecipeError("the recipe's data sources need data.root (set it with --set data.root=PATH)")
        if getattr(getattr(source, "func", source), "reads_recipe_data", False):
            return source(os.path.expanduser(str(root)), data=data)
        return source(os.path.expanduser(str(root)))
    raise RecipeError(f"data source {source!r} is neither a source nor a callable of the data root")

"""Recipes: plain Python files that define ``recipe``, a nested dict.

A recipe reuses a base by importing it (the recipe's folder is on ``sys.path``
while it runs) and merging with :func:`merge`::

    from _base_ssd import recipe as base
    recipe = merge(base, dict(model=dict(width_multiplier=0.25)))

Every key of a loaded recipe (after ``--set``) must be one of kdet's default recipe
(:func:`kdet.defaults.default_recipe`, the schema; ``recipes/_base_ssd.py`` is that
recipe): a misspelled key raises :class:`RecipeError` naming the key, its section and
the closest known key. A recipe keeps keys of its own under the top-level ``custom``
section, which is not checked. A recipe need not merge the base: a partial recipe
(``dict(data=dict(train=...))``) is checked the same way.

``merge`` merges dicts; a dict carrying ``"_delete_": True`` (MMDetection's marker)
replaces the base's value instead::

    merge(base, dict(train=dict(unfreeze_schedule={"_delete_": True, 0: 0, 3: "all"})))

Data sources are Python calls (``voc(...)``, ``shapes(...)``); a source given as
a callable of one argument, e.g. ``partial(voc, split="trainval")``, is called
with ``data["root"]``, so ``--set data.root=/my/VOCdevkit`` re-roots a recipe.
"""

import ast
import copy
import difflib
import os
import runpy
import sys

from kdet.errors import RecipeError  # defined in the leaf module kdet.errors, importable from here too


def bad_model_section(err):
    """The ``RecipeError`` for a model section the SSD constructor refuses (``err``: its TypeError / ValueError)."""
    return RecipeError(f"bad model section in the recipe: {err}")


DELETE = "_delete_"  # merge marker: {"_delete_": True, ...} replaces the base's value


def merge(base, override):
    """Deep-merge dict ``override`` into a copy of ``base`` (dicts merge, other values replace).

    A dict value carrying ``"_delete_": True`` replaces the base's value whole (the marker
    itself is dropped), so a recipe can replace a subtree such as a schedule dict.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not value.get(DELETE):
            out[key] = merge(out[key], value)
        else:
            out[key] = _without_markers(value)
    return out


def _without_markers(value):
    if not isinstance(value, dict):
        return copy.deepcopy(value)
    return {k: _without_markers(v) for k, v in value.items() if k != DELETE}


def check_recipe(recipe, where="recipe"):
    """Raise `RecipeError` for a key that kdet's schema (the default recipe) does not have.

    Sections (keys whose default is a dict) are checked recursively; the ``custom``
    section and values that are dicts where the default is not (e.g. a class-weight
    table) are not.
    """
    from kdet.defaults import CUSTOM_SECTION, recipe_schema

    _check_keys(recipe, recipe_schema(), [], where, skip=CUSTOM_SECTION)


def _check_keys(node, schema, path, where, skip=None):
    for key, value in node.items():
        if key == skip:
            continue
        if key not in schema:
            raise RecipeError(f"{where}: {_unknown_key(key, path, schema)}")
        if isinstance(schema[key], dict) and isinstance(value, dict):
            _check_keys(value, schema[key], path + [key], where)


def _unknown_key(key, path, schema):
    """``unknown key 'lr_step' in section 'train' (did you mean 'lr_steps'?)``, one line."""
    section = f"section {'.'.join(path)!r}" if path else "the top level"
    known = sorted(str(k) for k in schema)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else "known: " + ", ".join(known)
    return f"unknown key {key!r} in {section} ({hint}; own keys go under 'custom')"


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
    if recipe.get("name") is None:
        recipe["name"] = os.path.splitext(os.path.basename(path))[0]
    check_recipe(recipe, f"recipe {path}")
    for item in overrides:
        apply_override(recipe, item)
        _set_wins_over_conditional_sections(recipe, item)
    return recipe


CONDITIONAL_SECTIONS = ("small_data", "pretrained")  # merged in at the start of training when the data or weights say


def _set_wins_over_conditional_sections(recipe, item):
    """An explicit ``--set a.b=v`` is the user's word: the conditional sections no longer change ``a.b``."""
    *parents, leaf = item.split("=", 1)[0].strip().split(".")
    for name in CONDITIONAL_SECTIONS:
        node = recipe.get(name)
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)


def apply_override(recipe, item):
    """Apply one ``key.sub=value`` override.

    The key must exist in the recipe or in kdet's schema (then a missing section is
    created, so a partial recipe takes ``--set eval.score_threshold=0.1`` too).
    """
    from kdet.defaults import recipe_schema

    if "=" not in item:
        raise RecipeError(f"bad --set {item!r}: expected key=value, e.g. train.epochs=10")
    key, raw = item.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node, schema = recipe, recipe_schema()
    for i, part in enumerate(parents):
        schema = schema.get(part) if isinstance(schema, dict) else None
        if not isinstance(node.get(part), dict):
            if not isinstance(schema, dict) or part in node:
                raise RecipeError(f"bad --set key {key!r}: recipe has no section {'.'.join(parents[:i + 1])!r}")
            node[part] = {}
        node = node[part]
    if leaf not in node and not (isinstance(schema, dict) and leaf in schema):
        known = sorted(set(map(str, node)) | set(map(str, schema if isinstance(schema, dict) else ())))
        close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
        hint = f"did you mean {'.'.join(parents + [close[0]])!r}?" if close else "known here: " + ", ".join(known)
        raise RecipeError(f"bad --set key {key!r}: no such key ({hint})")
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
    the recipe's data section ``data`` (its ``val_fraction``, ``split_seed``, ...); those marked
    ``root_may_be_none`` (``voc_or_tfds``, ``coco_or_tfds``) are called with a None root too.
    """
    if source is None or hasattr(source, "records"):
        return source
    if callable(source):
        if root is None and getattr(getattr(source, "func", source), "root_may_be_none", False):
            return source(None)  # e.g. voc_or_tfds: None is TFDS's default data_dir
        if root is None:
            raise RecipeError("the recipe's data sources need data.root (set it with --set data.root=PATH)")
        if getattr(getattr(source, "func", source), "reads_recipe_data", False):
            return source(os.path.expanduser(str(root)), data=data)
        return source(os.path.expanduser(str(root)))
    raise RecipeError(f"data source {source!r} is neither a source nor a callable of the data root")

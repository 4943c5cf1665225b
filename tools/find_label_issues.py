"""Rank the training annotations that are probably wrong (model-assisted label review).

    python tools/find_label_issues.py RECIPE --out DIR [--set k=v ...] [--folds K] [--model M ...]

Every training image is predicted by a model that did not see it (K-fold
cross-prediction, default K=3: K trainings of the recipe, time estimate after
the first epoch), then each label is scored as missing / spurious /
wrong_class / bad_box (kdet/analysis/label_issues.py has the formulas), and the
audit's degenerate / out-of-image / duplicate boxes join the same ranking.

--model M: one trained model predicts every image (it must not have seen
them); K models are the K folds' models (model k predicts fold k, the folds
this tool draws with the recipe's seed; a run writes them as DIR/fold{k}.keras).
--predictions FILE rescores a run's DIR/cross_predictions.json without training.

Writes DIR/label_issues.json (sorted by score, highest first), label_issues.txt
(summary and the top 50) and label_issues.png (contact sheet of the top suspects).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe file; its data.train split is reviewed")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe entry, e.g. --set train.epochs=20 (repeatable)")
    p.add_argument("--folds", type=int, default=3, help="cross-prediction folds (default 3)")
    p.add_argument("--model", nargs="+", default=None, metavar="M", help="trained .keras model(s) instead of training")
    p.add_argument("--predictions", default=None, help="a previous run's cross_predictions.json (no training)")
    p.add_argument("--resume", action="store_true", help="reuse the fold models already in --out (DIR/fold{k}.keras)")
    p.add_argument("--seed", type=int, default=None, help="fold seed (default: the recipe's train.seed)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from kdet.analysis.label_issues import find_label_issues
    from kdet.config import RecipeError, load_recipe
    from kdet.data.base import DatasetError
    from kdet.engine import UserError

    try:
        if args.folds < 2:
            raise UserError(f"--folds must be at least 2, got {args.folds}")
        for path in args.model or ():
            if not os.path.isfile(path):
                raise UserError(f"{path}: model file not found")
        recipe = load_recipe(args.recipe, args.overrides)
        entries, paths = find_label_issues(recipe, args.out, folds=args.folds, models=args.model,
                                           predictions_file=args.predictions, seed=args.seed,
                                           resume=args.resume)
    except (UserError, RecipeError, DatasetError, FloatingPointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(paths["text"].read_text().split("\n\n")[0])
    print(f"{len(entries)} entries; written: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

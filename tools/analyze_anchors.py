"""Anchor coverage of a recipe's training boxes, and anchors fitted to them.

    python tools/analyze_anchors.py RECIPE [--k N] [--out DIR] [--split train] [--feature-maps 38,19,...]

Prints the share of training ground truths whose best default box has IoU >= 0.5
and their mean best IoU (overall, per class, per COCO size at the model input),
for the recipe's anchors and for anchors fitted by k-means (1 - IoU distance)
to the boxes, and a ``model=dict(anchor_scales=..., aspect_ratios=...)``
snippet to paste into the recipe. The feature-map sizes come from building the
recipe's SSD model (no weights), or from --feature-maps. Writes anchors.txt,
anchor_fit.json and anchor_sizes.png into --out (default anchors-<recipe>).
"""

import argparse
import inspect
import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from kdet.analysis.anchors import fit_anchors  # noqa: E402
from kdet.cli import ToolError, tool_main  # noqa: E402
from kdet.data.audit import load_recipe, recipe_sources  # noqa: E402


def anchor_setup(model_cfg, num_classes, feature_maps=None):
    """``(image_size, feature_map_sizes, scales, aspect_ratios, clip, steps)`` of a recipe's model."""
    from kdet.models.anchors import ssd_scales

    image_size = model_cfg.get("image_size", 300)
    clip = model_cfg.get("clip_anchors", True)
    steps = model_cfg.get("anchor_steps")
    if feature_maps:
        from kdet.models.ssd import default_aspect_ratios

        scales = model_cfg.get("anchor_scales") or ssd_scales(len(feature_maps))
        ratios = model_cfg.get("aspect_ratios") or default_aspect_ratios(len(feature_maps))
        return image_size, list(feature_maps), list(scales), ratios, clip, steps
    from kdet.models.ssd import SSD

    accepted = inspect.signature(SSD.__init__).parameters
    kwargs = {k: v for k, v in model_cfg.items() if k in accepted}
    kwargs.update(num_classes=num_classes, backbone_weights=None)   # never download for this
    model = SSD(**kwargs)
    layer = model.get_layer("anchors")
    return image_size, list(model.feature_map_sizes), layer.scales, layer.aspect_ratios, layer.clip, layer.steps


def plot_sizes(path, records, fit):
    """Box (w, h) at the model input, k-means centroids and the before/after anchor shapes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kdet.analysis.anchors import training_boxes

    boxes, _ = training_boxes(records)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.scatter(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], s=3, alpha=0.3, label="boxes")
    ax.scatter(fit.centroids[:, 0], fit.centroids[:, 1], marker="x", s=80, c="k", label="k-means")
    for name, scales, ratios, marker, colour in (("before", *fit.before_params, "o", "tab:red"),
                                                 ("after", fit.scales, fit.aspect_ratios, "s", "tab:green")):
        wh = [(s * np.sqrt(r), s / np.sqrt(r)) for k, s in enumerate(scales[:-1])
              for r in [1.0] + [x for q in ratios[k] for x in (q, 1 / q)]]
        wh += [(np.sqrt(a * b),) * 2 for a, b in zip(scales[:-1], scales[1:])]
        wh = np.array(wh)
        ax.scatter(wh[:, 0], wh[:, 1], marker=marker, facecolors="none", edgecolors=colour, s=50, label=f"anchors {name}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("width (normalised)")
    ax.set_ylabel("height (normalised)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@tool_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe .py file")
    parser.add_argument("--k", type=int, default=None, help="k-means clusters (default: number of feature maps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", help="recipe data source to analyse (default train)")
    parser.add_argument("--feature-maps", default=None,
                        help="comma-separated square feature-map sizes, e.g. 38,19,10,5,3,1 (skips building the model)")
    parser.add_argument("--out", default=None, help="output folder (default anchors-<recipe>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, e.g. data.root=/data/BCCD (repeatable)")
    args = parser.parse_args(argv)

    recipe = load_recipe(args.recipe, args.set)
    sources = recipe_sources(recipe, (args.split,))
    if args.split not in sources:
        raise ToolError(f"{args.recipe}: recipe['data'][{args.split!r}] is not set")
    source = sources[args.split]
    records = source.records()
    class_names = list(recipe.get("data", {}).get("class_names") or source.class_names)
    feature_maps = [int(v) for v in args.feature_maps.split(",")] if args.feature_maps else None
    image_size, maps, scales, ratios, clip, steps = anchor_setup(recipe.get("model", {}), len(class_names),
                                                                 feature_maps)
    from kdet.models.anchors import default_boxes

    fit = fit_anchors(records, image_size, maps, scales, ratios, class_names, k=args.k, seed=args.seed,
                      clip=clip, anchor_fn=partial(default_boxes, steps=steps),
                      match_iou=float(recipe.get("loss", {}).get("iou_threshold", 0.5)))
    fit.before_params = (list(scales), [list(r) for r in ratios])
    if recipe.get("loss", {}).get("assigner", "max_iou") != "max_iou":
        fit.notes.append(f"the recipe's loss uses assigner={recipe['loss']['assigner']!r}; the pos@ columns "
                         "count anchors at its loss.iou_threshold, which that assigner does not use")
    text = (f"recipe {args.recipe}, split {args.split}: {len(records)} images, input {image_size}, "
            f"feature maps {maps}\ncurrent: anchor_scales={list(scales)}, aspect_ratios={ratios}\n\n"
            + fit.to_text())
    print(text)
    out = Path(args.out or f"anchors-{Path(args.recipe).stem}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "anchors.txt").write_text(text + "\n")
    strip = lambda cov: {k: v for k, v in cov.items() if k != "best_iou"}
    (out / "anchor_fit.json").write_text(json.dumps(dict(
        feature_map_sizes=[list(m) if isinstance(m, (tuple, list)) else m for m in maps],
        image_size=image_size, before=dict(anchor_scales=list(scales), aspect_ratios=ratios, **strip(fit.before)),
        after=dict(anchor_scales=fit.scales, aspect_ratios=fit.aspect_ratios, **strip(fit.after)),
        centroids=fit.centroids.tolist(), cluster_iou=fit.cluster_iou, notes=fit.notes,
        snippet=fit.snippet()), indent=1))
    plot_sizes(out / "anchor_sizes.png", records, fit)
    print(f"\nwritten: {out / 'anchors.txt'}, {out / 'anchor_fit.json'}, {out / 'anchor_sizes.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

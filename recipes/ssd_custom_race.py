"""Your own data with the race engine: for long training budgets, not the default.

    python tools/train.py recipes/ssd_custom_race.py --set data.root=/path/to/my/data --set train.time_budget=60

`ssd_custom.py` with the levers that beat YOLOv8n on BCCD in 23 minutes (recipes/ssd_bccd_race.py):
keras-cv's CSPDarkNet-Tiny at half width with YOLOv8's PAN neck, YOLOv8's task-aligned assigner
and class loss, mosaic off for the last epochs. On kdet's benchmark suite at 4 minutes per dataset
(val splits, docs/experiments.md) it lost to ssd_custom.py on all four datasets (mean AP 0.043 vs
0.088): it starts slower. A training split of at most `small_data.max_images` images gets
ssd_custom.py's ten-image set-up.
"""

from ssd_custom import recipe as custom

from kdet.config import merge
from kdet.data.augment import mosaic, ssd_augmentation

recipe = merge(custom, dict(
    model=dict(
        backbone="cspdarknet_tiny_fpn",  # keras-cv's CSPDarkNet-Tiny, from scratch
        width_multiplier=0.5,
        fpn_channels=128,                # x 0.5: 64-channel maps P3..P7
        neck="pan",                      # YOLOv8's path aggregation
    ),
    data=dict(
        # mosaic tiles 4 images at half scale: it replaces the zoom-out, which would shrink them again
        augment=[mosaic(p=0.8)] + ssd_augmentation(expand_p=0.0),
        close_mosaic=10,                 # of the planned epochs; re-paced with the time budget
    ),
    loss=dict(
        assigner="tal", tal_top_k=10, tal_alpha=0.5,  # YOLOv8's task-aligned assigner and settings
        cls_loss="quality_bce",          # YOLOv8's class loss: cross-entropy on the soft target
        alpha=2.0,                       # the box term doubled against it
    ),
    train=dict(auto_steps=20000, auto_steps_per_image=8),  # about 64 epochs of batch 8
    eval=dict(pre_nms_top_k=1000),
    # Tiny training sets: ssd_custom.py's set-up (tools/benchmark_tiny.py: ten images, AP50 0.907, 3 seeds).
    small_data=dict(
        max_images=50,
        model={k: custom["model"][k] for k in ("backbone", "width_multiplier", "neck")},
        data=dict(augment=custom["data"]["augment"], close_mosaic=0),
        loss=dict(assigner="atss", cls_loss="softmax", alpha=1.0),
        train={k: custom["train"][k] for k in ("auto_steps", "auto_steps_per_image")},
        eval=dict(pre_nms_top_k=400),
    ),
    pretrained=dict(
        model=dict(neck="fpn"),
        loss=dict(assigner="max_iou", cls_loss="softmax", alpha=1.0),
    ),
))

"""Your own data with the race engine: for long training budgets, not the default.

    python tools/train.py recipes/ssd_custom_race.py --set data.root=/path/to/my/data --set train.time_budget=60

`ssd_custom.py` with the levers that beat YOLOv8n on BCCD in 23 minutes (recipes/ssd_bccd_race.py):
keras-cv's CSPDarkNet-Tiny at half width with YOLOv8's PAN neck, YOLOv8's task-aligned assigner
and class loss, mosaic off for the last epochs. On kdet's benchmark suite at 4 minutes per dataset
(val splits, docs/experiments.md) it lost to ssd_custom.py on all four datasets (mean AP 0.043 vs
0.088): it starts slower. A training split of at most `small_data.max_images` images gets
ssd_custom.py's ten-image set-up.
"""

from functools import partial

from _base_ssd import recipe as base

from kdet.config import merge
from kdet.data.augment import copy_paste, hflip, min_iou_crop, mosaic, photometric, resize, ssd_augmentation
from kdet.data.sources import auto

recipe = merge(base, dict(
    model=dict(
        backbone="cspdarknet_tiny_fpn",  # keras-cv's CSPDarkNet-Tiny, from scratch
        image_size=300,
        width_multiplier=0.5,
        fpn_channels=128,                # x 0.5: 64-channel maps P3..P7
        neck="pan",                      # YOLOv8's path aggregation
        backbone_weights="auto",         # ImageNet when it can be fetched (then `pretrained` applies), else None
        anchor_scales="auto",            # k-means (1 - IoU) on the training boxes at the start, printed with
        aspect_ratios="auto",            # the coverage before/after, saved as numbers in the model config
    ),
    data=dict(
        root=None,                       # --set data.root=/path/to/my/data
        train=partial(auto, split="train"),
        val=partial(auto, split="val"),
        test=partial(auto, split="test"),
        # mosaic tiles 4 images at half scale: it replaces the zoom-out, which would shrink them again
        augment=[mosaic(p=0.8)] + ssd_augmentation(expand_p=0.0),
        close_mosaic=10,                 # of the planned epochs; re-paced with the time budget
        batch_size=8,
        eval_batch_size=16,
        max_boxes=100,
        cache_images="auto",             # decoded images kept in memory when they fit in 2 GiB
        min_images_per_epoch=256,        # tiny sets: whole copies per epoch
        min_val_images=10,               # under 50 images (20% < 10): no val split, every image trains
    ),
    loss=dict(
        class_weights="auto",
        iou_threshold=0.3,               # pre-flight's coverage figures; the assigner below picks the positives
        assigner="tal", tal_top_k=10, tal_alpha=0.5,  # YOLOv8's task-aligned assigner and settings
        cls_loss="quality_bce",          # YOLOv8's class loss: cross-entropy on the soft target
        alpha=2.0,                       # the box term doubled against it
    ),
    train=dict(
        epochs="auto",
        auto_steps=20000,
        auto_steps_per_image=8,          # 8 steps of 8 images per training image: about 64 epochs
        optimizer="adamw",
        learning_rate=5e-3,
        weight_decay=1e-4,
        lr_schedule="cosine",
        warmup_epochs=1,
        early_stopping_patience=10,
    ),
    eval=dict(every_n_epochs=1, pre_nms_top_k=1000),
    # Tiny training sets (tools/benchmark_tiny.py: ten images, AP50 0.907 mean of 3 seeds).
    small_data=dict(
        max_images=50,
        model=dict(backbone="vgg16_bn", width_multiplier=0.125, neck="fpn"),
        data=dict(augment=[copy_paste(p=0.5, scale_range=(0.5, 1.5)), photometric(p=0.5), min_iou_crop(p=0.5),
                           resize(), hflip()], close_mosaic=0),
        loss=dict(assigner="atss", atss_forced_match=True, cls_loss="softmax", alpha=1.0),
        train=dict(auto_steps=3000, auto_steps_per_image=32),
        eval=dict(pre_nms_top_k=400),
    ),
    # Merged in when model.backbone_weights="auto" finds ImageNet weights (SSD300-VGG16 fine-tuning,
    # as recipes/ssd300_bccd.py). Not measured here (no internet on the reference machine).
    pretrained=dict(
        model=dict(backbone="vgg16", width_multiplier=1.0, neck="fpn"),
        loss=dict(assigner="max_iou", cls_loss="softmax", alpha=1.0),
        train=dict(optimizer="sgd", learning_rate=1e-3, weight_decay=5e-4),
    ),
))

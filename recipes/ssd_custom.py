"""Your own data, in whichever layout it comes: YOLO txt, PASCAL VOC (with or without ImageSets), COCO json.

    python tools/train.py recipes/ssd_custom.py --set data.root=/path/to/my/data [--set train.time_budget=15]

kdet.data.sources.auto detects the layout under data.root (and prints it) and reads the class
names from the data; without a validation split it holds out a seeded, stratified 20%
(data.val_fraction), when that is at least data.min_val_images images.

Chosen on kdet's benchmark suite (tools/benchmark_suite.py: four real datasets, val splits, the
same budget each; docs/experiments.md): this set-up beat the race engine (recipes/ssd_custom_race.py)
on every dataset. A width-0.125 VGG16-BN from scratch (ImageNet VGG16 when the weights can be
fetched: the `pretrained` section), anchors fitted to the training boxes, ATSS matching with a
forced match for objects smaller than the anchor spacing, copy-paste augmentation, AdamW 5e-3
with a cosine schedule, batch 8.

Without train.time_budget, train.epochs="auto" plans about train.auto_steps optimizer steps, at
most train.auto_steps_per_image per training image. Early stopping never stops a run whose best
val_AP is still at noise level, nor before half of its plan (train.early_stopping_min_*).
"""

from functools import partial

from _base_ssd import recipe as base

from kdet.config import merge
from kdet.data.augment import copy_paste, hflip, min_iou_crop, photometric, resize
from kdet.data.sources import auto

recipe = merge(base, dict(
    model=dict(
        backbone="vgg16_bn",         # offline: BatchNorm VGG16 from scratch (ScratchDet)
        image_size=300,
        width_multiplier=0.125,
        backbone_weights="auto",     # ImageNet when it can be fetched (then `pretrained` applies), else None
        anchor_scales="auto",        # k-means (1 - IoU) on the training boxes at the start, printed with
        aspect_ratios="auto",        # the coverage before/after, saved as numbers in the model config
    ),
    data=dict(
        root=None,                   # --set data.root=/path/to/my/data
        train=partial(auto, split="train"),
        val=partial(auto, split="val"),
        test=partial(auto, split="test"),
        # copy-paste puts objects on the other images' backgrounds; zoom-in crops and flips multiply a
        # small set; no zoom-out (expand), which shrinks small objects
        augment=[copy_paste(p=0.5, scale_range=(0.5, 1.5)), photometric(p=0.5), min_iou_crop(p=0.5), resize(), hflip()],
        batch_size=8,
        eval_batch_size=16,
        max_boxes=100,
        cache_images="auto",         # decoded images kept in memory when they fit in 2 GiB
        min_images_per_epoch=256,    # tiny sets: whole copies per epoch, so evaluation runs every 32 steps
        min_val_images=10,           # under 50 images (20% < 10): no val split, every image trains, last weights
    ),
    loss=dict(
        class_weights="auto",
        iou_threshold=0.3,           # pre-flight's coverage figures; the assigner below picks the positives
        assigner="atss",             # per-object threshold from its nearest anchors
        atss_forced_match=True,      # ...and one smaller than the anchor spacing takes its best-IoU anchor
    ),
    train=dict(
        epochs="auto",
        auto_steps=3000,
        auto_steps_per_image=32,     # tiny sets: at most 32 steps per training image (ten images: 320 steps)
        optimizer="adamw",
        learning_rate=5e-3,
        weight_decay=1e-4,
        lr_schedule="cosine",
        warmup_epochs=1,
        early_stopping_patience=10,
    ),
    eval=dict(every_n_epochs=1),
    # Merged in when model.backbone_weights="auto" finds ImageNet weights (SSD300-VGG16 fine-tuning,
    # as recipes/ssd300_bccd.py). Not measured here (no internet on the reference machine).
    pretrained=dict(
        model=dict(backbone="vgg16", width_multiplier=1.0),
        train=dict(optimizer="sgd", learning_rate=1e-3, weight_decay=5e-4),
    ),
))

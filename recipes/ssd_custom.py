"""Your own data, in whichever layout it comes: YOLO txt, PASCAL VOC (with or without ImageSets), COCO json.

    python tools/train.py recipes/ssd_custom.py --set data.root=/path/to/my/data

kdet.data.sources.auto detects the layout under data.root (and prints it), reads
the class names from the data, and, when the data has no validation split, holds
out a seeded, stratified 20% (data.val_fraction, data.split_seed), but only when
that is at least 10 images (data.min_val_images): a smaller set (under 50 images)
trains on every image, since val_AP on 2-9 images is noise; it then has no val_AP,
no early stopping, and keeps the last weights. Without a test split the final
figures are on the validation split (none without one either).

Defaults for small datasets (tens to hundreds of images):
* ImageNet VGG16 when the weights can be fetched (the `pretrained` section below);
  offline, a width-0.125 VGG16-BN from scratch (a printed note says so).
  model.backbone_weights=None skips the download attempt.
* anchors fitted to the training boxes (model.anchor_scales / aspect_ratios = "auto").
* ATSS matching (loss.assigner="atss"): each object's IoU threshold is the mean + std
  of its nearest anchors' IoUs, so small and large objects alike get positives. On a
  generated ten-image set (tools/benchmark_tiny.py) it beat the fixed IoU 0.3 (val AP50
  on 50 held-out images 0.50 vs 0.37 after 140 steps, 0.63 after 320). The fixed IoU 0.3
  (loss.assigner="max_iou") had given BCCD platelets AP50 0.603 -> 0.738 against 0.5.
  loss.atss_forced_match: an object smaller than the anchor spacing, with no anchor
  centre inside it (ATSS then gives it no positive: 4 of 10 objects under 8 px in a
  generated set), takes its best-IoU anchor, as SSD's matching does (AP50 0.911 with it,
  0.909 without on that set: neutral there; it gives every object a target).
* copy-paste (kdet.data.augment.copy_paste, p=0.5): objects of two other training
  images, cut with a feathered margin, scaled by 0.5-1.5 (log-uniform), pasted at free
  spots, so each object is seen on every background and at sizes the set lacks. The
  generated ten-image set (tools/benchmark_tiny.py, seed 1) scores AP50 0.911 with it
  (unscaled), 0.815 without; over seeds 0-2: 0.894 +- 0.032 unscaled, 0.907 +- 0.022
  with the scale range (0.655 before these defaults); README "Tiny datasets".
* a fixed budget of optimizer steps (train.epochs="auto", train.auto_steps), at most
  32 per training image (train.auto_steps_per_image: a ten-image set gets 320 steps, about
  4.3 CPU-minutes in all, instead of 3000 steps, ~28 extrapolated, that overfit it further; measured in
  tools/benchmark_tiny.py), tiny sets repeated to 256 images per epoch; with a validation
  split, val_AP every epoch, early stopping after 10 evaluations without improvement, and
  the best weights kept.
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
        # Copy-paste puts objects on the other images' backgrounds; zoom-in crops and flips multiply a
        # small set; no zoom-out (expand), which shrinks small objects.
        augment=[copy_paste(p=0.5, scale_range=(0.5, 1.5)), photometric(p=0.5), min_iou_crop(p=0.5), resize(), hflip()],
        batch_size=8,
        eval_batch_size=16,
        max_boxes=100,
        min_images_per_epoch=256,    # tiny sets: whole copies per epoch, so evaluation runs every 32 steps
        min_val_images=10,           # under 50 images (20% < 10): no val split, every image trains, last weights
    ),
    loss=dict(
        class_weights="auto",
        iou_threshold=0.3,           # pre-flight's coverage figures; the assigner below picks the positives
        assigner="atss",             # per-object threshold from its nearest anchors: every object, small or
                                     # large, gets positives (tiny set: val AP50 0.50 vs 0.37 at 140 steps)
        atss_forced_match=True,      # ...and one smaller than the anchor spacing takes its best-IoU anchor
    ),
    train=dict(
        epochs="auto",
        auto_steps=3000,
        auto_steps_per_image=32,     # tiny sets: at most 32 steps per training image (8 images: 256 steps)
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

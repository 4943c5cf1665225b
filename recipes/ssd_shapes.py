"""Reduced-width SSD on kdet's synthetic shapes dataset: the quick-start recipe.

    python tools/train.py recipes/ssd_shapes.py

Generates the dataset on first use (VOC layout, in ~/.cache/kdet or $KDET_CACHE),
trains from scratch on a CPU in minutes, prints mAP@0.5 on the held-out split
and exports a SavedModel into work_dirs/ssd_shapes/saved_model.
"""

from _base_ssd import recipe as base

from kdet.config import merge
from kdet.data.augment import hflip, photometric, resize
from kdet.data.shapes import SHAPES_CLASSES
from kdet.data.sources import shapes

IMAGE_SIZE = 128
# Synthetic data is cheap: 4,000 training images keep a from-scratch model from memorising.
SHAPES = dict(image_size=IMAGE_SIZE, num_train=4000, num_test=200)

recipe = merge(base, dict(
    model=dict(
        backbone="vgg16_bn",         # BatchNorm makes training from scratch fast (ScratchDet)
        image_size=IMAGE_SIZE,
        width_multiplier=0.125,
        backbone_weights=None,
        # Maps 16, 8, 4, 2, 1, 1 at 128 px; the first scale fits the 8-px objects.
        anchor_scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
    ),
    data=dict(
        class_names=list(SHAPES_CLASSES),
        train=shapes(split="train", **SHAPES),
        val=shapes(split="test", **SHAPES),
        test=shapes(split="test", **SHAPES),
        augment=[photometric(p=0.5), hflip(), resize()],
        batch_size=16,
        eval_batch_size=50,
        max_boxes=16,
    ),
    loss=dict(class_weights="auto"),  # the rare classes (ring 8%) learn faster
    train=dict(
        epochs=5,
        optimizer="adamw",
        learning_rate=3e-3,
        weight_decay=1e-4,
        warmup_epochs=0.1,
        lr_schedule="cosine",
    ),
    eval=dict(every_n_epochs=5),
))

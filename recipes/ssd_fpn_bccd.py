"""SSD over a MobileNetV2 feature pyramid for BCCD: train+val, tested on test.

    python tools/train.py recipes/ssd_fpn_bccd.py --set data.root=/path/to/BCCD

With ImageNet weights (online) the backbone is frozen for 3 epochs and then
unfrozen top-down at a lower learning rate; offline use
--set model.backbone_weights=None --set train.unfreeze_schedule=None.
"""

from ssd300_bccd import recipe as bccd

from kdet.config import merge

recipe = merge(bccd, dict(
    model=dict(backbone="mobilenetv2_fpn", image_size=320, fpn_channels=128, width_multiplier=1.0,
               backbone_weights="imagenet", anchor_scales=None, aspect_ratios=None),
    train=dict(optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, lr_schedule="cosine",
               unfreeze_schedule={0: 0, 3: 2, 6: "all"}, unfreeze_lr_factor=0.3),
))

"""SSD head over a ResNet50 feature pyramid (P3-P7), PASCAL VOC 2007+2012, tested on VOC 2007 test.

    python tools/train.py recipes/ssd300_fpn_voc.py --set data.root=/data/VOCdevkit

Same data (a local VOCdevkit or TFDS, see ssd300_voc.py) and schedule as ssd300_voc.py; the
backbone is ResNet50 + FPN with ImageNet weights (downloaded by keras.applications), frozen for the
first 2 epochs and then unfrozen top-down.
"""

from ssd300_voc import recipe as voc

from kdet.config import merge

recipe = merge(voc, dict(
    model=dict(backbone="resnet50_fpn", image_size=320, fpn_channels=256, anchor_scales=None,
               aspect_ratios=None),
    train=dict(optimizer="sgd", learning_rate=2e-3, unfreeze_schedule={0: 0, 2: 2, 4: "all"}),
))

"""BCCD from scratch on a CPU: a width-0.125 VGG16-BN SSD at 300 px (no ImageNet weights needed).

    python tools/train.py recipes/ssd_bccd_scratch.py [--set data.root=/path/to/BCCD]

The offline baseline of the README's figures table (about an hour on 2 cores).
With internet access, recipes/ssd300_bccd.py (ImageNet VGG16) is the better start.
"""

from ssd300_bccd import recipe as bccd

from kdet.config import merge

recipe = merge(bccd, dict(
    model=dict(
        backbone="vgg16_bn",         # BatchNorm: trains from scratch
        backbone_weights=None,
        width_multiplier=0.125,
        # Fitted by `python tools/analyze_anchors.py recipes/ssd300_bccd.py`: Platelets whose best
        # anchor has IoU >= 0.5: 64.4% -> 98.3%, with 4,000 instead of 8,732 anchors.
        anchor_scales=[0.0713, 0.1842, 0.3721, 0.54, 0.71, 0.88, 1.05],
        aspect_ratios=[[], [], [], [2, 3], [2], [2]],
    ),
    data=dict(cache_images=True),
    # Platelets have 2.5 anchors with IoU >= 0.5 each (RBC 6.6, WBC 13.2: analyze_anchors' pos@0.5);
    # matching at 0.3: Platelets AP50 0.603 -> 0.738, all classes 0.727 -> 0.789 (README).
    loss=dict(iou_threshold=0.3),
    train=dict(epochs=72, optimizer="adamw", learning_rate=5e-3, weight_decay=1e-4,
               lr_schedule="cosine", warmup_epochs=1),
    eval=dict(every_n_epochs=72),
))

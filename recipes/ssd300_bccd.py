"""SSD-300 on VGG16 for BCCD (blood cells, PASCAL VOC layout): train+val, tested on test.

    python tools/train.py recipes/ssd300_bccd.py --set data.root=/path/to/BCCD

data.root defaults to $KDET_BCCD or ../shared/datasets/BCCD beside the project.
BCCD has a few degenerate boxes: skip_invalid=True drops them with a counted warning.
The val entry (the test split) only monitors val_AP during training; the final
figures come from the last epoch's weights on the test split.
"""

import os
from functools import partial

from _base_ssd import recipe as base

from kdet.config import merge
from kdet.data.sources import voc

CLASSES = ["RBC", "WBC", "Platelets"]
DEFAULT_ROOT = os.environ.get(
    "KDET_BCCD", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "datasets", "BCCD"))

recipe = merge(base, dict(
    model=dict(backbone="vgg16", image_size=300, backbone_weights="imagenet"),
    data=dict(
        root=DEFAULT_ROOT,
        class_names=CLASSES,
        train=partial(voc, split="trainval", class_names=CLASSES, skip_invalid=True),
        val=partial(voc, split="test", class_names=CLASSES, skip_invalid=True),
        test=partial(voc, split="test", class_names=CLASSES, skip_invalid=True),
        batch_size=16,
        max_boxes=64,
    ),
    loss=dict(class_weights="auto"),
    train=dict(epochs=120, lr_steps=(80, 100), warmup_epochs=2),
    eval=dict(every_n_epochs=10),
))

"""SSD-300 on VGG16, PASCAL VOC 2007+2012 trainval, tested on VOC 2007 test (the SSD paper).

    python tools/train.py recipes/ssd300_voc.py [--set data.root=~/tensorflow_datasets]

Data come through tensorflow-datasets (voc/2007, voc/2012), downloaded and
prepared by TFDS on first use (data.root is TFDS's data_dir; None = its default).
Schedule: SGD momentum 0.9, weight decay 5e-4, lr 1e-3 with warm-up, batch 32,
120k iterations with x0.1 steps at 80k and 100k. VOC07+12 trainval has 16,551
images = 517 iterations per epoch, so 120k iterations = 232 epochs, steps at
epochs 155 and 193.
"""

from functools import partial

from _base_ssd import recipe as base

from kdet.config import merge
from kdet.data.sources import concat, tfds


def voc0712_trainval(data_dir):
    return concat(tfds("voc/2007", "train+validation", data_dir=data_dir),
                  tfds("voc/2012", "train+validation", data_dir=data_dir))


recipe = merge(base, dict(
    model=dict(backbone="vgg16", image_size=300, backbone_weights="imagenet"),
    data=dict(
        root="~/tensorflow_datasets",
        train=voc0712_trainval,
        val=partial(tfds, "voc/2007", "test"),
        test=partial(tfds, "voc/2007", "test"),
        batch_size=32,
    ),
    train=dict(epochs=232, lr_steps=(155, 193), warmup_epochs=1, learning_rate=1e-3),
    eval=dict(every_n_epochs=10),
))

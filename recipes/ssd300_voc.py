"""SSD-300 on VGG16, PASCAL VOC 2007+2012 trainval, tested on VOC 2007 test (the SSD paper).

    python tools/train.py recipes/ssd300_voc.py --set data.root=/data/VOCdevkit
    python tools/train.py recipes/ssd300_voc.py [--set data.root=DIR]      # TFDS, downloads on first use

Data (kdet.data.sources.voc_or_tfds decides by what is on disk under data.root):
* a local VOCdevkit: the folder holding VOC2007/ and VOC2012/ as VOCtrainval_06-Nov-2007.tar,
  VOCtest_06-Nov-2007.tar and VOCtrainval_11-May-2012.tar extract them (or the folder above
  VOCdevkit/). Trains on VOC2007 + VOC2012 trainval (5,011 + 11,540 = 16,551 images), validates
  and tests on VOC2007/ImageSets/Main/test.txt (4,952 images);
* otherwise tensorflow-datasets voc/2007 + voc/2012 in data.root as TFDS's data_dir (default
  ~/tensorflow_datasets), downloaded and prepared by TFDS on first use.
Both give the same classes (VOC's 20, alphabetical) and boxes. `difficult` objects are ignored by the
evaluation (pycocotools' crowd rule, VOC's devkit rule for VOC_mAP50) and are neither positives nor
negatives in training (the Caffe SSD trained on them, `train_on_diff_gt`; kdet ignores them).

Schedule: SGD momentum 0.9, weight decay 5e-4, lr 1e-3 with warm-up, batch 32, 120k iterations
with x0.1 steps at 80k and 100k (the paper's 07+12 set-up; its SSD300* figure, 77.2 mAP on VOC2007
test, also uses the "zoom out" expansion that kdet's default augmentation includes). 16,551 images
= 517 iterations per epoch, so 120k iterations = 232 epochs, steps at epochs 155 and 193.
The final evaluation reports VOC07_mAP50 (the paper's 11-point VOC07 metric) and VOC_mAP50.
"""

from functools import partial

from _base_ssd import recipe as base

from kdet.config import merge
from kdet.data.sources import voc_or_tfds

recipe = merge(base, dict(
    model=dict(backbone="vgg16", image_size=300, backbone_weights="imagenet"),
    data=dict(
        root="~/tensorflow_datasets",  # a VOCdevkit, or a TFDS data_dir
        train=partial(voc_or_tfds, sets="2007:trainval+2012:trainval"),
        val=partial(voc_or_tfds, sets="2007:test"),
        test=partial(voc_or_tfds, sets="2007:test"),
        batch_size=32,
    ),
    train=dict(epochs=232, lr_steps=(155, 193), warmup_epochs=1, learning_rate=1e-3),
    eval=dict(every_n_epochs=10),
))

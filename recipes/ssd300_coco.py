"""SSD-300 on VGG16, COCO 2017: trained on train2017, evaluated on val2017 (the SSD paper's COCO set-up).

    python tools/train.py recipes/ssd300_coco.py --set data.root=/data/coco
    python tools/train.py recipes/ssd300_coco.py [--set data.root=DIR]      # TFDS coco/2017

Data (kdet.data.sources.coco_or_tfds decides by what is on disk under data.root):
* a local COCO 2017 folder: annotations/instances_train2017.json, annotations/instances_val2017.json,
  train2017/ and val2017/ as train2017.zip, val2017.zip and annotations_trainval2017.zip extract
  them (118,287 training and 5,000 validation images, 80 categories);
* otherwise tensorflow-datasets coco/2017 in data.root as TFDS's data_dir (default
  ~/tensorflow_datasets). TFDS's source holds a split's encoded images in memory (about 19 GB for
  train2017): use the local folder unless the machine has that much to spare.
`iscrowd` objects are ignore regions: no training targets, and kdet's exact COCO evaluator treats
them as pycocotools does (a detection on a crowd region is neither a true nor a false positive).
The final evaluation is on val2017 (the paper reports test-dev, which has no public labels;
val2017 = the old minival, the usual figure).

Model and schedule, from the SSD paper (Liu et al., ECCV 2016, sec. 3.4 "COCO") and its Caffe
`ssd_coco.py`: smaller default boxes than for VOC, conv4_3 at scale 0.07 and the other maps from
0.15 in steps of 0.18, i.e. anchor_scales [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05] (the Caffe
min_sizes 21, 45, 99, 153, 207, 261 and max_size 315 on 300 px; torchvision's ssd300_vgg16 uses
the same), the VOC aspect ratios [[2], [2, 3], [2, 3], [2, 3], [2], [2]]. SGD momentum 0.9,
weight decay 5e-4, batch 32, lr 1e-3 for 160k iterations, then 1e-4 for 40k and 1e-5 for 40k
(240k in all). train2017's 118,287 images give 3,696 iterations per epoch, so: 65 epochs
(240,240 iterations), x0.1 steps at epochs 43 (158,928) and 54 (199,584). Plus kdet's one epoch of
linear warm-up (as in ssd300_voc.py). The paper's SSD300 figure on test-dev: 23.2 AP, 41.2 AP50
(SSD300*, with the "zoom out" expansion that kdet's default augmentation includes: 25.1 / 43.1).
"""

from functools import partial

from _base_ssd import recipe as base

from kdet.config import merge
from kdet.data.sources import coco_or_tfds

COCO_ANCHOR_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]  # = kdet.models.anchors.ssd_scales(6, 0.15, 0.9, 0.07)

recipe = merge(base, dict(
    model=dict(backbone="vgg16", image_size=300, backbone_weights="imagenet", anchor_scales=COCO_ANCHOR_SCALES,
               aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]]),
    data=dict(
        root="~/tensorflow_datasets",  # a COCO 2017 folder, or a TFDS data_dir
        train=partial(coco_or_tfds, split="train2017"),
        val=partial(coco_or_tfds, split="val2017"),
        test=partial(coco_or_tfds, split="val2017"),
        batch_size=32,
        max_boxes=100,
    ),
    train=dict(epochs=65, lr_steps=(43, 54), warmup_epochs=1, learning_rate=1e-3),
    eval=dict(every_n_epochs=5),
))

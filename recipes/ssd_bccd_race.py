"""BCCD from scratch under a 23-minute training budget: the candidate for the race against YOLOv8n.

    python tools/train.py recipes/ssd_bccd_race.py
    python tools/benchmark_race.py --recipe recipes/ssd_bccd_race.py --budget 23 --ultralytics-python PY

`ssd_bccd_scratch.py` with the levers that won the ablations (README, "Training to a time
budget"; BCCD train -> val at 224 px, one seed each, never the test split):
* GFL's quality focal loss (sigmoid scores, the IoU of the predicted box as the target) in place
  of softmax with hard negative mining: val AP 0.216 -> 0.282 (40 epochs);
* batch 8 instead of 16 (twice the optimizer steps in the same time): 0.254 -> 0.331 (3-minute budget);
* mosaic in place of SSD's zoom-out (expand), off for the last 10 planned epochs (Ultralytics'
  close_mosaic): on half the images 0.254 -> 0.338 (batch 16), 0.386 (batch 8); at 40 fixed
  epochs with batch 8: p=0.5 0.416, p=0.8 0.440, p=1.0 0.384.
* keras-cv's CSPDarkNet-Tiny at width 0.5 with kdet's FPN (P3-P7, 64 channels) in place of the
  width-0.125 VGG16-BN, at 300 px: val AP 0.406 -> 0.456, AP50 0.713 -> 0.783 at a 6-minute
  budget (43 epochs instead of 35; 0.423 -> 0.456 at 40 fixed epochs, 224 px). Width 1.0 fits
  22 epochs in those 6 minutes: 0.264. The same anchors (BCCD-fitted), less the VGG's 1x1 map.
GIoU, ATSS and the task-aligned assigner lost beside the quality focal loss, width 0.25 lost
to the time it costs (0.150), AdamW 2.5e-3 lost to 5e-3 (0.393), weight averaging with a
warm-up (train.ema_momentum=0.99, ema_warmup_epochs=2) made no difference (0.413): none is used.
"""

from ssd_bccd_scratch import recipe as scratch

from kdet.config import merge
from kdet.data.augment import mosaic, ssd_augmentation

recipe = merge(scratch, dict(
    model=dict(
        backbone="cspdarknet_tiny_fpn",  # keras-cv's CSPDarkNet-Tiny (YOLOX-Tiny's trunk), from scratch
        width_multiplier=0.5,            # stack channels 24-48-96-192, FPN 64 channels
        fpn_channels=128,
        # scratch's fitted scales on the same 38-19-10-5-3 maps (the FPN has no 1x1 map)
        anchor_scales=scratch["model"]["anchor_scales"][:6],
        aspect_ratios=scratch["model"]["aspect_ratios"][:5],
    ),
    data=dict(
        batch_size=8,
        # mosaic tiles 4 images at half scale: it replaces the zoom-out, which would shrink them again
        augment=[mosaic(p=0.8)] + ssd_augmentation(expand_p=0.0),
        close_mosaic=10,             # of the 72 planned epochs; re-paced with the time budget
    ),
    loss=dict(cls_loss="quality_focal"),
    train=dict(time_budget=23),      # minutes of training; the 72 planned epochs are fitted into it
))

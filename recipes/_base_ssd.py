"""What kdet's SSD recipes share: the SSD paper's model and training set-up.

Recipes import this and merge their differences (see kdet.config.merge).
Every key here can be overridden from the command line: --set train.epochs=5.
"""

from kdet.data.augment import ssd_augmentation

recipe = dict(
    model=dict(
        backbone="vgg16",            # "vgg16" | "vgg16_bn" (from scratch) | "resnet50_fpn" | "mobilenetv2_fpn"
        image_size=300,
        width_multiplier=1.0,        # < 1 scales every conv of the backbone and extras
        backbone_weights="imagenet", # None trains from scratch (offline machines)
        anchor_scales=None,          # None: 0.1 for conv4_3, then 0.2..0.9 (SSD paper)
        aspect_ratios=None,          # None: [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
        fpn_channels=256,            # FPN backbones only
    ),
    data=dict(
        root=None,                   # passed to sources given as partial(...) callables
        class_names=None,            # None: the training source's classes
        train=None,
        val=None,
        test=None,
        augment=ssd_augmentation(),  # photometric, expand, min-IoU crop, flip, resize; None: resize only
        batch_size=32,
        eval_batch_size=32,
        max_boxes=100,
        repeat_factor_threshold=None,  # e.g. 0.3: images with classes in < 30% of images repeat (LVIS)
        cache_images=False,          # True: keep decoded images in memory after the first epoch
        workers=None,                # input worker processes; None: 0 below 4 CPUs, else min(CPUs, 4)
        find_label_issues=False,     # True: the run report adds a label review (K extra trainings: tools/find_label_issues.py)
    ),
    loss=dict(
        class_weights=None,          # None | list | {name: weight} | "auto" (effective number)
        neg_pos_ratio=3,
        alpha=1.0,
        iou_threshold=0.5,           # an anchor is positive from this IoU with its best ground truth
        negative_iou_threshold=None, # e.g. 0.4: anchors with IoU 0.4..0.5 are ignored, not background
        assigner="max_iou",          # or "atss": a threshold per object from its nearest anchors
        atss_top_k=9,                # ATSS candidates per feature map
    ),
    train=dict(
        epochs=120,
        optimizer="sgd",             # "sgd" (momentum) | "adamw"
        learning_rate=1e-3,
        momentum=0.9,
        weight_decay=5e-4,           # not applied to BatchNorm/normalisation scales and biases
        warmup_epochs=1,
        lr_schedule="step",          # "step" | "cosine" | "constant"
        lr_steps=(80, 100),          # epochs at which the learning rate drops x0.1
        clip_grad_norm=None,         # e.g. 10.0: clip the global gradient norm (steadies high learning rates)
        ema_momentum=None,           # e.g. 0.998: the final model is a moving average of the weights
        seed=0,
        freeze_backbone_epochs=0,    # backbone frozen for the first N epochs
        unfreeze_schedule=None,      # {epoch: number of top backbone stages trainable}
        unfreeze_lr_factor=1.0,
        mixed_precision="float32",   # "mixed_float16" | "mixed_bfloat16"
        jit_compile=False,
        strategy="default",          # "mirrored" | "multiworker" | "tpu"
        early_stopping_patience=None,  # epochs without val_AP improvement
    ),
    eval=dict(
        every_n_epochs=5,
        score_threshold=0.01,
        iou_threshold=0.45,
        max_detections=200,
        monitor="val_AP",
    ),
)

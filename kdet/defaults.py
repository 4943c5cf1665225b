"""kdet's defaults, each stated once: the NMS settings and the default recipe (the recipe schema).

* :data:`NMS_DEFAULTS` - what ``decode_detections``, ``SSD.detect``, the SavedModel export,
  the engine and the tools use when nothing else is said.
* :func:`default_recipe` - every recipe key kdet reads, with its default and a short comment.
  ``recipes/_base_ssd.py`` is this recipe; :func:`kdet.config.load_recipe` rejects a key
  that is not here (a typo), naming the closest known key.

A recipe adds keys of its own on purpose under the top-level ``custom`` section, which is
never checked (``custom=dict(my_flag=True)``).

A NEW recipe key goes into :func:`default_recipe`, with a short comment.
"""

from types import MappingProxyType

# Decoding + NMS of detections (kdet.postprocess.decode_detections).
NMS_DEFAULTS = MappingProxyType(dict(
    score_threshold=0.01,   # candidates need a class score above this
    iou_threshold=0.45,     # greedy NMS suppresses IoU above this (same class unless class_agnostic)
    max_detections=200,     # detections kept per image
    pre_nms_top_k=400,      # candidates entering NMS (per image; per class with per_class_top_k)
    class_agnostic=False,   # True: boxes of any class suppress each other
    per_class_top_k=False,  # True: pre_nms_top_k candidates of each class (torchvision's rule)
))

WEIGHT_DECAY = 5e-4  # the SSD paper's; not applied to BatchNorm scales and biases

# The top-level section a recipe may fill freely (never checked against the schema).
CUSTOM_SECTION = "custom"


def default_recipe():
    """A fresh copy of kdet's default recipe: the SSD paper's model and training set-up."""
    from kdet.data.augment import ssd_augmentation

    return dict(
        name=None,                       # None: the recipe file's name (work_dirs/NAME)
        verbose=1,                       # Keras fit verbosity
        custom=dict(),                   # the recipe's own keys: never checked
        model=dict(
            backbone="vgg16",            # "vgg16" | "vgg16_bn" (from scratch) | "resnet50_fpn" | "mobilenetv2_fpn"
                                         # | "mobilenetv3_large_ssdlite" (SSDLite320, keras-cv trunk, its own anchors)
                                         # | "resnet50v2_fpn" | "cspdarknet_tiny_fpn" | "efficientnetv2_b0_fpn"
                                         # (FPN on keras-cv trunks; ImageNet = keras-cv presets, width 1 only)
            image_size=300,
            width_multiplier=1.0,        # < 1 scales every conv of the backbone and extras
            backbone_weights="imagenet", # None trains from scratch (offline machines); "auto": ImageNet when the
                                         # weights can be fetched (then the `pretrained` section applies), else None;
                                         # or the path of a keras.applications weight file (e.g. ..._notop.h5)
            init_from=None,              # a kdet .keras model to start from: layers whose name and shapes match
                                         # load (class heads only with the same class count); backbone_weights is
                                         # then not used; --resume wins over it
            anchor_scales=None,          # None: 0.1 for conv4_3, then 0.2..0.9 (SSD paper); "auto": k-means
                                         # (1 - IoU) on the training boxes at the start of training, saved
                                         # as numbers in the model config (reload and export reuse them)
            aspect_ratios=None,          # None: [[2], [2, 3], [2, 3], [2, 3], [2], [2]]; "auto": fitted as above
            fpn_channels=256,            # FPN backbones only (scaled by width_multiplier, min 8)
            neck="fpn",                  # *_fpn backbones: "fpn" (linear top-down) | "pan" (YOLOv8's PAN, C2f blocks)
            head_convs=0,                # 3x3 conv-BN-SiLU layers before each box / class predictor (YOLOv8: 2)
            fine_map=False,              # VGG16 bases only: a stride-4 source (conv3_3 + upsampled conv4_3)
                                         # before conv4_3, for objects under ~12 px; 7 maps, so 8 anchor scales
        ),
        data=dict(
            root=None,                   # passed to sources given as partial(...) callables
            class_names=None,            # None: the training source's classes
            train=None,
            val=None,
            test=None,
            augment=ssd_augmentation(),  # photometric, expand, min-IoU crop, flip, resize; None: resize only;
                                         # or a list of keras-cv layers (bounding_box_format="xyxy"), run in the graph
            augment_backend="albumentations",  # "keras_cv": the default augment becomes the keras-cv SSD preset
                                         # (kdet.data.kerascv_augment.ssd_augmentation_kerascv), in the tf.data graph
            close_mosaic=0,              # mosaic() off for the last N epochs (Ultralytics' close_mosaic; scaled
                                         # with train.time_budget); needs train.seed
            batch_size=32,
            eval_batch_size=32,
            max_boxes=100,
            repeat_factor_threshold=None,  # e.g. 0.3: images with classes in < 30% of images repeat (LVIS)
            cache_images=False,          # True: keep decoded images in memory after the first epoch; "auto": when
                                         # a split's decoded images fit in 2 GiB (kdet.build.AUTO_CACHE_BYTES)
            workers=None,                # input worker processes; None: 0 below 4 CPUs, else min(CPUs, 4)
            min_images_per_epoch=None,   # e.g. 256: a smaller training set is repeated (whole copies) per epoch
            # read by sources.auto only (data in any layout, kdet/data/detect.py):
            val_fraction=0.2,            # share of the training images in the seeded validation split, when the data has none
            split_seed=0,                # seed of that split
            min_val_images=None,         # e.g. 10: no seeded split when val_fraction gives fewer images (their val_AP
                                         # is noise): every image trains, no early stopping, the last weights are kept
            skip_invalid=False,          # True: drop bad boxes/images with a counted warning instead of stopping
            find_label_issues=False,     # True: the run report adds a label review (3 extra trainings: tools/find_label_issues.py)
        ),
        loss=dict(
            class_weights=None,          # None | list | {name: weight} | "auto" (effective number)
            neg_pos_ratio=3,
            alpha=1.0,
            iou_threshold=0.5,           # an anchor is positive from this IoU with its best ground truth
            negative_iou_threshold=None, # e.g. 0.4: anchors with IoU 0.4..0.5 are ignored, not background
            assigner="max_iou",          # or "atss": a threshold per object from its nearest anchors
            atss_top_k=9,                # ATSS candidates per feature map
            atss_forced_match=False,     # True: an object ATSS leaves without a positive (smaller than the anchor
                                         # spacing, no anchor centre inside it) takes its best-IoU anchor (SSD's rule)
                                         # or assigner="tal": task-aligned (TOOD / YOLOv8): score^tal_alpha * IoU^tal_beta
                                         # of the predicted box, top tal_top_k anchors per object (centre inside)
            tal_top_k=13,                # task-aligned candidates per object
            tal_alpha=1.0,               # exponent of the class score in the alignment
            tal_beta=6.0,                # exponent of the predicted box's IoU in the alignment
            box_weighting="equal",       # "equal": every positive's box loss counts once | "alignment" (assigner="tal",
                                         # YOLOv8's): weighted by its soft target, so well-aligned anchors dominate
            box_loss="smooth_l1",        # "smooth_l1" (encoded offsets) | "giou" | "diou" | "ciou" (decoded boxes)
                                         # | "smooth_l1+giou" | "smooth_l1+diou" | "smooth_l1+ciou" (both)
            box_weight=None,             # times alpha on the box loss; None: 1 for smooth_l1 and the sums,
                                         # 2 for the IoU family alone
            iou_weight=2.0,              # the IoU term's weight inside "smooth_l1+<iou>"
            cls_loss="softmax",          # "softmax" (+ hard negative mining) | "quality_softmax" (the same, positives'
                                         # target split: predicted box's IoU on the class, the rest on background)
                                         # | "focal" | "quality_focal" | "varifocal" | "quality_bce" (YOLOv8's)
                                         # (sigmoid losses: no mining, the model then scores with sigmoid)
        ),
        train=dict(
            epochs=120,                  # or "auto": about auto_steps optimizer steps, whatever the dataset size
            auto_steps=3000,             # optimizer steps for epochs="auto"
            auto_steps_per_image=None,   # e.g. 40: epochs="auto" gives at most this many steps per training image
            optimizer="sgd",             # "sgd" (momentum) | "adamw"
            learning_rate=1e-3,
            momentum=0.9,
            weight_decay=WEIGHT_DECAY,   # not applied to BatchNorm/normalisation scales and biases
            warmup_epochs=1,
            lr_schedule="step",          # "step" | "cosine" | "constant"
            lr_steps=(80, 100),          # epochs at which the learning rate drops x0.1
            clip_grad_norm=None,         # e.g. 10.0: clip the global gradient norm (steadies high learning rates)
            ema_momentum=None,           # e.g. 0.998: the final model is a moving average of the weights
            ema_warmup_epochs=0,         # the average's warm-up (Ultralytics'): momentum * (1 - exp(-step / these
                                         # epochs' steps)); 0: Keras' fixed momentum from the first step
            seed=0,
            freeze_backbone_epochs=0,    # backbone frozen for the first N epochs
            unfreeze_schedule=None,      # {epoch: number of top backbone stages trainable}
            unfreeze_lr_factor=1.0,
            mixed_precision="float32",   # "mixed_float16" | "mixed_bfloat16"
            jit_compile=False,
            strategy="default",          # "mirrored" | "multiworker" | "tpu"
            checkpoint_every_minutes=10,  # also a mid-epoch checkpoint (last.keras + state.json) after this many
                                         # minutes, so a kill -9 loses at most that much; 0/None: epoch ends only.
                                         # A save (fsynced) measured 0.5-0.9 s / 12 MB for the race model and
                                         # 0.5-1.3 s / 210 MB for SSD300-VGG16 (2-core VM): <= 0.2% of 10 minutes
            early_stopping_patience=None,  # evaluations without val_AP improvement; a stop is held while...
            early_stopping_min_value=0.01,  # ...the best val_AP is below this (noise: a run that learnt nothing
                                         # scores 0.000-0.003; docs/experiments.md) and...
            early_stopping_min_fraction=0.5,  # ...before this share of the planned (or time-budget) epochs
            time_budget=None,            # minutes of training (Ultralytics' time=): epochs are measured and as many
                                         # run as fit; the LR schedule and close_mosaic, planned over `epochs`,
                                         # are re-paced to them, so is eval.every_n_epochs, and the last epoch
                                         # is always evaluated (kdet/training/time_budget.py)
        ),
        small_data=None,                 # dict(max_images=N, model=..., loss=...): recipe settings merged in when the
                                         # training split has at most N images (decided and printed at the start)
        pretrained=None,                 # with model.backbone_weights="auto": recipe settings merged in when ImageNet
                                         # weights can be fetched, e.g. dict(model=dict(backbone="vgg16"), train=...)
        eval=dict(
            every_n_epochs=5,
            monitor="val_AP",
            report_score_threshold=0.25, # the run report's P/R/F1, confusion matrix and gallery threshold
            report_train_images=200,     # training images evaluated for the report's train/held-out gap; 0: none
            **NMS_DEFAULTS,              # score_threshold, iou_threshold, max_detections, pre_nms_top_k,
                                         # class_agnostic, per_class_top_k: used by training's val_AP, the
                                         # final evaluation, the SavedModel export and tools/infer.py alike
        ),
    )


def nms_settings(eval_section=None):
    """The NMS settings of a recipe's ``eval`` section, :data:`NMS_DEFAULTS` where it says nothing."""
    eval_section = eval_section or {}
    return {key: eval_section.get(key, default) for key, default in NMS_DEFAULTS.items()}


_SCHEMA = None


def recipe_schema():
    """The default recipe built once, for reading keys and defaults (do not modify it)."""
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = default_recipe()
    return _SCHEMA


def default_of(section, key):
    """The default of ``recipe[section][key]`` (``KeyError`` for a key kdet does not know)."""
    return recipe_schema()[section][key]

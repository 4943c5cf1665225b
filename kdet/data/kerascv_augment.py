"""Box-aware augmentation with keras-cv layers, run as TensorFlow ops inside the tf.data graph.

A recipe lists keras-cv layers in ``data.augment``, each with the ``bounding_box_format`` it
likes (kdet converts its pixel ``xyxy`` boxes, docs/CONVENTIONS.md, to that format before the layer
and back after it; ``"rel_xyxy"`` is safest: see :func:`check_layers`), for example::

    augment=[keras_cv.layers.RandomFlip(mode="horizontal", bounding_box_format="xyxy"),
             keras_cv.layers.JitteredResize(target_size=(300, 300), scale_factor=(0.5, 2.0),
                                            bounding_box_format="xyxy")]

or sets ``data.augment_backend="keras_cv"`` for :func:`ssd_augmentation_kerascv`. The input
pipeline (:func:`kdet.data.pipeline.make_dataset`) decodes each image, runs the layers on one
element at a time (``dataset.map``: no Python, no GIL), resizes to the model's size and pads
the targets. One list holds one kind: albumentations and keras-cv entries mixed are a
``RecipeError`` naming both (their boxes and randomness live in different worlds: numpy in a
Python step, tensors in the graph).

* **Ignore flags** (difficult | iscrowd) travel in the class value: the layers see
  ``class * 2 + ignore`` and carry it untouched; a box a layer drops (cropped away, zero area)
  loses its class and flag with it. After the layers, boxes are clipped to the image and those
  with no area left are dropped. (No ``min_visibility`` here: keras-cv keeps a box while any
  of it remains in the image.)
* **Seeds**: each layer's random draws come from ``(seed, pass key, record index)`` through
  stateless ops (:class:`StatelessDraws` replaces the layers' ``tf.random.Generator``), so a
  seeded run repeats whatever the parallelism, and the pipeline's per-(seed, epoch) passes hold.
  keras-cv's uniform and normal factor samplers are switched to stateless draws the same way;
  a layer drawing through other means (``tf.random`` calls of its own: RandomCutout, CutMix) is not.
"""

import tensorflow as tf

KERAS_CV_BOX_FORMAT = "xyxy"


def is_kerascv_layer(entry):
    """True for a keras-cv preprocessing layer (checked by module: keras-cv is imported only when used)."""
    return type(entry).__module__.split(".")[0] == "keras_cv"


def uses_kerascv(entries):
    """True when ``entries`` (a ``data.augment`` list) are keras-cv layers; a mixed list is a ``RecipeError``."""
    entries = list(entries or [])
    kerascv = [e for e in entries if is_kerascv_layer(e)]
    if not kerascv:
        return False
    others = [e for e in entries if not is_kerascv_layer(e)]
    if others:
        from kdet.config import RecipeError

        raise RecipeError(f"data.augment mixes keras-cv layers ({type(kerascv[0]).__name__}) with other entries "
                          f"({type(others[0]).__name__}, albumentations or kdet.data.augment): use one kind per list "
                          "(keras-cv runs in the tf.data graph, albumentations in a Python step)")
    return True


def ssd_augmentation_kerascv(image_size, seed=None):
    """The SSD augmentation as closely as keras-cv's box-aware layers allow.

    SSD (kdet.data.augment.ssd_augmentation): photometric distortion, expand (zoom out up to 4x
    on a mean-filled canvas, p=0.5), min-IoU random crop (0.3..1 of each side, aspect 0.5..2),
    horizontal flip, resize. Here, a :class:`KerasCVAugmenter` that first resizes to the model size
    (as SSD's final resize, aspect not kept; keras-cv's ``Resizing`` takes boxes only when it pads),
    then runs ``RandomColorJitter`` (brightness +-32/255, contrast and saturation 0.5..1.5, hue
    +-18 degrees; always, not each with p=0.5, no channel swap), then ``JitteredResize`` with a
    scale of 0.25..2 (below 1 it zooms out onto a black, not mean, canvas, as expand up to 4x;
    above 1 it crops a model-size window, without the min-IoU constraint or aspect change), then
    ``RandomFlip``.
    """
    import keras_cv

    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    fmt = KERAS_CV_BOX_FORMAT
    return KerasCVAugmenter([
        keras_cv.layers.RandomColorJitter(value_range=(0, 255), brightness_factor=32 / 255,
                                          contrast_factor=0.5, saturation_factor=0.5, hue_factor=18 / 180,
                                          seed=seed),
        keras_cv.layers.JitteredResize(target_size=(height, width), scale_factor=(0.25, 2.0),
                                       bounding_box_format=fmt, seed=seed),
        keras_cv.layers.RandomFlip(mode="horizontal", bounding_box_format=fmt, seed=seed),
    ], resize_first=(height, width))


def recipe_augment(data, image_size):
    """The augmentation list of a recipe's ``data`` section, after ``data.augment_backend``."""
    from kdet.config import RecipeError
    from kdet.data.augment import ssd_augmentation

    backend = data.get("augment_backend", "albumentations")
    augment = data.get("augment")
    if backend == "albumentations" or augment is None:
        if backend not in ("albumentations", "keras_cv"):
            raise RecipeError(f"data.augment_backend must be 'albumentations' or 'keras_cv', got {backend!r}")
        return augment
    if backend != "keras_cv":
        raise RecipeError(f"data.augment_backend must be 'albumentations' or 'keras_cv', got {backend!r}")
    if uses_kerascv(augment):
        return augment
    if repr(list(augment)) != repr(ssd_augmentation()):
        raise RecipeError("data.augment_backend='keras_cv' replaces the default data.augment by the keras-cv SSD "
                          "preset, but data.augment lists albumentations entries of its own: list keras-cv layers "
                          "in data.augment instead, or drop augment_backend")
    return ssd_augmentation_kerascv(image_size)


class StatelessDraws:
    """Stands in for a keras-cv layer's ``tf.random.Generator``: stateless draws from a per-element seed.

    :meth:`set_seed` takes the element's ``[2]`` int64 seed while the map function is traced; each
    draw folds in its own count (fixed at trace time), so draws differ from one another and repeat
    from one run to the next.
    """

    def __init__(self):
        self.seed = None
        self.count = 0

    def set_seed(self, seed):
        self.seed, self.count = seed, 0

    def _next(self):
        self.count += 1
        return tf.random.experimental.stateless_fold_in(self.seed, self.count)

    def uniform(self, shape, minval=0, maxval=None, dtype=tf.float32, name=None):
        if maxval is None and dtype.is_floating:
            maxval = 1
        return tf.random.stateless_uniform(shape, self._next(), minval=minval, maxval=maxval, dtype=dtype)

    def normal(self, shape, mean=0.0, stddev=1.0, dtype=tf.float32, name=None):
        return tf.random.stateless_normal(shape, self._next(), mean=mean, stddev=stddev, dtype=dtype)

    random_normal = normal


class StatelessFactor:
    """A keras-cv ``UniformFactorSampler`` / ``NormalFactorSampler`` drawing through :class:`StatelessDraws`."""

    def __init__(self, sampler, draws):
        self.sampler, self.draws = sampler, draws

    def __call__(self, shape=(), dtype="float32"):
        s, dtype = self.sampler, tf.as_dtype(dtype)
        if hasattr(s, "lower"):  # uniform
            return self.draws.uniform(shape, minval=s.lower, maxval=s.upper, dtype=dtype)
        value = self.draws.normal(shape, mean=s.mean, stddev=s.stddev, dtype=dtype)
        return tf.clip_by_value(value, s.min_value, s.max_value)

    def get_config(self):
        return self.sampler.get_config()


def _make_stateless(layer, draws):
    """Points every random source of ``layer`` and its sublayers at ``draws`` (generators and factor samplers)."""
    from keras_cv.src.core.factor_sampler.normal_factor_sampler import NormalFactorSampler
    from keras_cv.src.core.factor_sampler.uniform_factor_sampler import UniformFactorSampler

    for sub in layer._flatten_layers(include_self=True, recursive=True):
        if hasattr(sub, "_random_generator"):
            sub._random_generator = draws
        for name, value in list(vars(sub).items()):
            if isinstance(value, StatelessFactor):
                value = value.sampler
            if isinstance(value, (UniformFactorSampler, NormalFactorSampler)):
                setattr(sub, name, StatelessFactor(value, draws))


class KerasCVAugmenter:
    """Runs keras-cv layers on one element ``(image uint8 HxWx3, boxes [N,4] pixels, classes [N], ignore [N])``.

    Graph code: call it inside ``dataset.map`` with the element's ``seed`` (``[2]`` int64).
    ``resize_first``: ``(h, w)`` the image (and boxes) are resized to before the layers.
    Returns the augmented image (uint8, any size), boxes (pixel ``xyxy``, clipped, non-empty),
    classes (int32) and ignore (float32).
    """

    def __init__(self, layers, resize_first=None):
        self.layers = list(layers)
        self.resize_first = None if resize_first is None else tuple(resize_first)
        check_layers(self.layers)
        self.draws = StatelessDraws()
        for layer in self.layers:
            _make_stateless(layer, self.draws)

    def __call__(self, image, boxes, classes, ignore, seed):
        self.draws.set_seed(seed)
        if self.resize_first is not None:
            image, boxes = resize_with_boxes(image, tf.cast(boxes, tf.float32), self.resize_first)
        coded = tf.cast(classes, tf.float32) * 2 + tf.cast(ignore > 0, tf.float32)
        data = {"images": tf.cast(image, tf.float32),
                "bounding_boxes": {"boxes": tf.cast(boxes, tf.float32), "classes": coded}}
        for layer in self.layers:
            data = _run_in_format(layer, data)
        image = tf.cast(tf.clip_by_value(tf.round(data["images"]), 0, 255), tf.uint8)
        boxes, coded = data["bounding_boxes"]["boxes"], data["bounding_boxes"]["classes"]
        boxes, coded = clip_and_drop(boxes, coded, tf.shape(image)[:2])
        coded = tf.cast(tf.round(coded), tf.int32)
        return image, boxes, coded // 2, tf.cast(coded % 2, tf.float32)


def _run_in_format(layer, data):
    """``layer`` on ``data`` (pixel ``xyxy`` boxes), its boxes converted to the layer's own format and back."""
    from keras_cv import bounding_box

    fmt = getattr(layer, "bounding_box_format", None)
    boxes = data["bounding_boxes"]["boxes"]
    if fmt and fmt != KERAS_CV_BOX_FORMAT:
        boxes = bounding_box.convert_format(boxes, source=KERAS_CV_BOX_FORMAT, target=fmt, images=data["images"])
    out = layer({"images": data["images"], "bounding_boxes": {"boxes": boxes,
                                                              "classes": data["bounding_boxes"]["classes"]}})
    image = _dense(out["images"])
    boxes = tf.reshape(_dense(out["bounding_boxes"]["boxes"]), [-1, 4])
    if fmt and fmt != KERAS_CV_BOX_FORMAT:
        boxes = bounding_box.convert_format(boxes, source=fmt, target=KERAS_CV_BOX_FORMAT, images=image)
    return {"images": image, "bounding_boxes": {
        "boxes": boxes, "classes": tf.reshape(_dense(out["bounding_boxes"]["classes"], -1), [-1])}}


def check_layers(layers):
    """A ``RecipeError`` for a layer known to misplace boxes: keras-cv 0.9's RandomCropAndResize in pixels.

    Its boxes come back scaled to the input image, not the output (measured: tests/test_kerascv_augment.py);
    in a relative format (``"rel_xyxy"``) they are right.
    """
    from kdet.config import RecipeError

    for layer in layers:
        fmt = getattr(layer, "bounding_box_format", None)
        if type(layer).__name__ == "RandomCropAndResize" and fmt and not fmt.startswith("rel_"):
            raise RecipeError(f"data.augment: keras_cv.layers.RandomCropAndResize(bounding_box_format={fmt!r}) "
                              "returns boxes scaled to the input image, not its output (a keras-cv 0.9 bug): "
                              "use bounding_box_format='rel_xyxy' (kdet converts at the edge)")


def _dense(tensor, pad=0):
    return tensor.to_tensor(default_value=pad) if isinstance(tensor, tf.RaggedTensor) else tensor


def clip_and_drop(boxes, values, image_hw):
    """Boxes clipped to the image; those with no area left, or padding (value < 0), dropped with their values."""
    hw = tf.cast(image_hw, tf.float32)
    limit = tf.stack([hw[1], hw[0], hw[1], hw[0]])
    boxes = tf.clip_by_value(boxes, 0.0, limit)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (values >= 0)
    return tf.boolean_mask(boxes, keep), tf.boolean_mask(values, keep)


def resize_with_boxes(image, boxes, size):
    """``image`` bilinearly resized to ``size`` (h, w), uint8, with pixel boxes scaled alike."""
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.stack([size[1] / hw[1], size[0] / hw[0], size[1] / hw[1], size[0] / hw[0]])
    resized = tf.image.resize(image, size, method="bilinear")
    image = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
    return image, boxes * scale

"""Training-step cost of SSD300-VGG16 next to the bare VGG16 forward+backward at the same batch.

    python tools/benchmark_train_step.py [--batch-size 8] [--steps 5] [--size 300] [--breakdown]
                                         [--jit auto|on|off] [--compare BACKBONE:WIDTH:SIZE[:FPN[:NECK[:HEAD_CONVS]]],...]

The difference is what SSD adds on top of its backbone: the extra layers and
heads, the anchors, the vectorised matching and the MultiBox loss.
``--breakdown`` times one forward+backward (no optimizer) of each cumulative
stage with the same ``tf.function`` step, interleaved, best of ``--steps``:
bare VGG16, SSD's VGG16 trunk (conv5_3), + fc6 (dilated) / fc7, + extras and
heads, + the MultiBox loss (matching, hard negative mining).
``--jit``: XLA for the fit steps (``compile(jit_compile=...)``; Keras'
default "auto" means XLA where the model allows it) and the breakdown steps
(``tf.function(jit_compile=...)``; "auto" there means no XLA).
``--compare`` times full SSD train steps of several models and prints, beside the wall seconds, the
process CPU seconds per step (all threads; on a shared machine the steadier figure) and the load average.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def time_fit(model, x, y, steps, batch_size, cpu=False):
    """Seconds per optimizer step, after one warm-up pass (tracing, compilation); with ``cpu``:
    ``(wall, process CPU)`` seconds per step."""
    model.fit(x[:batch_size], y[:batch_size], batch_size=batch_size, epochs=1, verbose=0)
    start, start_cpu = time.perf_counter(), time.process_time()
    model.fit(x, y, batch_size=batch_size, epochs=1, verbose=0)
    wall = (time.perf_counter() - start) / steps
    return (wall, (time.process_time() - start_cpu) / steps) if cpu else wall


def random_targets(rng, n, num_classes, boxes_per_image=5, max_boxes=20):
    """``[n, max_boxes, 6]`` targets (docs/CONVENTIONS.md) with random boxes, the rest padding."""
    y = np.zeros((n, max_boxes, 6), "float32")
    y[..., 4] = -1
    corners = np.sort(rng.uniform(0, 1, (n, boxes_per_image, 2, 2)), axis=2)
    y[:, :boxes_per_image, :4] = corners.transpose(0, 1, 3, 2).reshape(n, boxes_per_image, 4)[..., [0, 2, 1, 3]]
    y[:, :boxes_per_image, 4] = rng.integers(0, num_classes, (n, boxes_per_image))
    return y


JIT = {"auto": "auto", "on": True, "off": False}


def ssd_step(batch_size, steps, size, num_classes=20, jit="auto"):
    import keras

    from kdet.losses import MultiBoxLoss
    from kdet.models.ssd import SSD

    model = SSD(num_classes=num_classes, image_size=size, backbone="vgg16", backbone_weights=None)
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss=MultiBoxLoss(num_classes=num_classes),
                  jit_compile=JIT[jit])
    rng = np.random.default_rng(0)
    n = batch_size * steps
    x = rng.uniform(0, 255, (n, size, size, 3)).astype("float32")
    y = random_targets(rng, n, num_classes)
    return time_fit(model, x, y, steps, batch_size), model.anchors.shape[0]


def vgg16_step(batch_size, steps, size, jit="auto"):
    import keras

    backbone = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    model = keras.Model(backbone.input, keras.layers.GlobalAveragePooling2D()(backbone.output))
    model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9), loss="mse", jit_compile=JIT[jit])
    n = batch_size * steps
    x = np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype("float32")
    return time_fit(model, x, np.zeros((n, 512), "float32"), steps, batch_size)


def breakdown(batch_size, steps, size, num_classes=20, jit="auto"):
    """``{stage: seconds}`` for one forward+backward of each cumulative SSD stage."""
    import keras
    import tensorflow as tf

    from kdet.losses import MultiBoxLoss
    from kdet.models.ssd import SSD

    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (batch_size, size, size, 3)).astype("float32"))
    y = tf.constant(random_targets(rng, batch_size, num_classes))

    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(size, size, 3))
    ssd = SSD(num_classes=num_classes, image_size=size, backbone="vgg16", backbone_weights=None)
    upto = lambda name: keras.Model(ssd.input, ssd.get_layer(name).output)
    mean_square = lambda _, out: tf.reduce_mean(tf.square(out))
    stages = {
        "bare VGG16 (keras.applications)": (vgg, mean_square),
        "SSD's VGG16 trunk to conv5_3": (upto("block5_conv3"), mean_square),
        "+ fc6 (3x3, dilation 6) and fc7": (upto("fc7"), mean_square),
        "+ extras, heads, anchors": (ssd, lambda _, out: tf.reduce_mean(tf.square(out[..., :-4]))),
        "+ MultiBox loss (matching, mining)": (ssd, MultiBoxLoss(num_classes=num_classes)),
    }

    def step_fn(model, loss):
        variables = model.trainable_variables

        @tf.function(jit_compile=JIT[jit] if jit != "auto" else None)
        def step():
            with tf.GradientTape() as tape:
                value = loss(y, model(x, training=True))
            return [value] + tape.gradient(value, variables)
        return step

    steps_by_stage = {name: step_fn(*spec) for name, spec in stages.items()}
    for step in steps_by_stage.values():
        [t.numpy() for t in step()]  # trace
    best = {name: float("inf") for name in stages}
    for _ in range(steps):
        for name, step in steps_by_stage.items():
            start = time.perf_counter()
            [t.numpy() for t in step()]
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def compare_models(specs, batch_size, steps, num_classes=20, jit="auto"):
    """``[(spec, parameters, s/step, CPU s/step)]`` of full SSD train steps, one model per
    ``backbone:width:size[:fpn_channels[:neck[:head_convs]]]`` spec (FPN backbones only: fpn_channels,
    default 256, and the neck, default "fpn"; head_convs default 0)."""
    import keras

    from kdet.losses import MultiBoxLoss
    from kdet.models.ssd import SSD

    rows = []
    for spec in specs:
        backbone, width, size, *rest = spec.split(":")
        fpn_channels, neck, head_convs = rest + [256, "fpn", 0][len(rest):]
        size = int(size)
        model = SSD(num_classes=num_classes, image_size=size, backbone=backbone, width_multiplier=float(width),
                    fpn_channels=int(fpn_channels), neck=neck, head_convs=int(head_convs))
        model.compile(optimizer=keras.optimizers.SGD(1e-3, momentum=0.9),
                      loss=MultiBoxLoss(num_classes=num_classes), jit_compile=JIT[jit])
        rng = np.random.default_rng(0)
        n = batch_size * steps
        x = rng.uniform(0, 255, (n, size, size, 3)).astype("float32")
        rows.append((spec, model.count_params(),
                     *time_fit(model, x, random_targets(rng, n, num_classes), steps, batch_size, cpu=True)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--breakdown", action="store_true", help="time SSD's stages one by one instead")
    p.add_argument("--jit", choices=sorted(JIT), default="auto", help="XLA compilation (see above)")
    p.add_argument("--compare", default=None,
                   help="comma-separated backbone:width:size[:fpn_channels[:neck[:head_convs]]] specs to time as full SSD train "
                        "steps, e.g. mobilenetv3_large_ssdlite:1.0:320,vgg16_bn:0.125:300,mobilenetv2_fpn:1.0:320:128")
    args = p.parse_args(argv)
    if args.compare:
        b = args.batch_size
        print(f"batch {b}, {args.steps} timed steps, float32 on CPU, jit {args.jit}, 20 classes")
        for spec, params, seconds, cpu in compare_models(args.compare.split(","), b, args.steps, jit=args.jit):
            print(f"{spec:36s} {params / 1e6:7.2f} M params {seconds:7.2f} s/step  {b / seconds:6.2f} images/s  "
                  f"{cpu:7.2f} CPU s/step", flush=True)
        if hasattr(os, "getloadavg"):
            print("load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
        return
    if args.breakdown:
        times = breakdown(args.batch_size, args.steps, args.size, jit=args.jit)
        print(f"batch {args.batch_size}, {args.size}x{args.size}, forward+backward, best of {args.steps}, "
              f"float32 on CPU, jit {args.jit}")
        base = next(iter(times.values()))
        for name, seconds in times.items():
            print(f"{name:38s} {seconds:7.2f} s/step  {args.batch_size / seconds:6.2f} images/s  {seconds / base:5.2f}x")
        return
    vgg = vgg16_step(args.batch_size, args.steps, args.size, jit=args.jit)
    ssd, anchors = ssd_step(args.batch_size, args.steps, args.size, jit=args.jit)
    b = args.batch_size
    print(f"batch {b}, {args.size}x{args.size}, {args.steps} timed steps, float32 on CPU, jit {args.jit}")
    print(f"bare VGG16 forward+backward: {vgg:7.2f} s/step  {b / vgg:6.2f} images/s")
    print(f"SSD300-VGG16 train step:     {ssd:7.2f} s/step  {b / ssd:6.2f} images/s  ({anchors} anchors)")
    print(f"SSD overhead over the backbone: {ssd / vgg:.2f}x the step time")


if __name__ == "__main__":
    main()

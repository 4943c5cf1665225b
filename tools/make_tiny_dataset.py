"""Write a tiny synthetic detection set (YOLO layout) to try kdet's small-data defaults on.

    python tools/make_tiny_dataset.py /tmp/tiny10 --train 10 --classes 1 --min-size 6 --max-size 60
    python tools/train.py recipes/ssd_custom.py --set data.root=/tmp/tiny10

10 training images and 100 held-out test images by default, no validation split (kdet
holds one out of the training images, as for a user's own ten images). See kdet/data/tiny.py.
"""

import argparse

from kdet.data.tiny import generate_tiny_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="output folder (created; an existing tiny set with other parameters needs --overwrite)")
    parser.add_argument("--train", type=int, default=10, help="training images (default 10)")
    parser.add_argument("--test", type=int, default=100, help="held-out test images (default 100)")
    parser.add_argument("--val", type=int, default=0, help="validation images (default 0: kdet holds some out)")
    parser.add_argument("--classes", type=int, default=1, help="classes: circle, square, triangle, cross, ring (default 1)")
    parser.add_argument("--image-size", type=int, default=300, help="image side in pixels (default 300)")
    parser.add_argument("--min-size", type=int, default=6, help="smallest object side in pixels (default 6)")
    parser.add_argument("--max-size", type=int, default=60, help="largest object side in pixels (default 60)")
    parser.add_argument("--max-objects", type=int, default=6, help="objects per image, 1..this (default 6)")
    parser.add_argument("--colors", choices=("class", "random"), default="class",
                        help="class: one colour per class (default); random: any colour, the shape alone is the class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    root = generate_tiny_dataset(args.root, num_train=args.train, num_test=args.test, num_val=args.val,
                                 num_classes=args.classes, image_size=args.image_size, min_size=args.min_size,
                                 max_size=args.max_size, max_objects=args.max_objects, colors=args.colors, seed=args.seed,
                                 overwrite=args.overwrite)
    print(f"wrote {root}")


if __name__ == "__main__":
    main()

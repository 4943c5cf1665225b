"""Train a detector from a recipe: python tools/train.py RECIPE [--work-dir DIR] [--set k=v ...]."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdet.cli import tool_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("recipe", help="path to a recipe file, e.g. recipes/ssd_shapes.py")
    p.add_argument("--work-dir", help="output folder (default work_dirs/<recipe name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe entry, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
    p.add_argument("--resume", action="store_true", help="continue from the work dir's last checkpoint")
    p.add_argument("--strategy", default=None, choices=["default", "mirrored", "multiworker", "tpu"],
                   help="tf.distribute strategy (default: the recipe's)")
    return p.parse_args(argv)


@tool_main
def main(argv=None):
    args = parse_args(argv)
    from kdet.engine import train_from_recipe_file

    overrides = list(args.overrides)
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.strategy is not None:
        overrides.append(f"train.strategy={args.strategy}")
    train_from_recipe_file(args.recipe, overrides, work_dir=args.work_dir, resume=args.resume)
    return 0


def run_stoppable():
    """``main()``, with SIGTERM / SIGINT ending in one line and status 128 + the signal, from the first moment.

    Before training (TensorFlow's import, the data, the model) a signal stops at once; during ``fit`` it
    stops after the current step, with a checkpoint (kdet.training.preemption; the engine's handlers).
    """
    from kdet.training.signals import Interrupted, SignalStop

    SignalStop().install()
    try:
        status = main()
        SignalStop.ignore()   # done and written: a signal during the interpreter's shutdown changes nothing
        return status
    except Interrupted as stop:
        from kdet.cli import _exit_now

        print(stop.line, file=sys.stderr)
        _exit_now(stop.status)


if __name__ == "__main__":
    sys.exit(run_stoppable())

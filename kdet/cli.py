"""What every ``tools/*.py`` shares: quiet TensorFlow start-up and one way to report bad input.

Use it as::

    from kdet.cli import tool_main

    @tool_main                    # or @tool_main(needs_tensorflow=False) for numpy-only tools
    def main(argv=None):
        ...

    if __name__ == "__main__":
        sys.exit(main())

``tool_main`` makes ``main`` return 2 after printing one line ``error: <message>`` on
stderr when kdet raises one of its user-facing errors (`user_errors`: a bad recipe,
dataset, results file or checkpoint, a missing file), instead of a traceback. Anything
else is a bug and keeps its traceback.

TensorFlow's C++ start-up lines (``cudart_stub`` "Could not find cuda drivers", the
``cuInit`` "CUDA error" on machines without a GPU, oneDNN and CPU-feature notes) are
dropped: ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 (the C++ core's info and warning lines
off, its errors kept) and the lines printed while TensorFlow loads and finds its
devices are filtered against :data:`STARTUP_NOISE`; every other line is passed through.
A user who sets ``TF_CPP_MIN_LOG_LEVEL`` keeps full control: then nothing is filtered.
Python warnings (e.g. tf.function retracing) are not touched.
"""

import functools
import logging
import os
import re
import sys
import tempfile
import warnings

from kdet.errors import ToolError  # defined in the leaf module kdet.errors, importable from here too
from kdet.log import console

#: Lines TensorFlow/XLA print at start-up that say nothing about the user's run.
STARTUP_NOISE = re.compile("|".join([
    r"cudart_stub\.cc", r"cuda_platform\.cc.*cuInit", r"cuda_driver\.cc.*cuInit", r"cpu_feature_guard\.cc",
    r"^To enable the following instructions", r"^WARNING: All log messages before absl::InitializeLog",
    r"oneDNN custom operations are on", r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"computation placer already registered", r"TF-TRT Warning",
]))


# Set beside TF_CPP_MIN_LOG_LEVEL when kdet chose that level, so that child processes (which inherit
# both) do not mistake kdet's default for the user's own setting.
DEFAULTED_BY_KDET = "KDET_DEFAULTED_TF_LOG_LEVEL"


def user_errors():
    """kdet's user-facing error classes that are loaded (a class never imported cannot have been raised)."""
    found = [ToolError, OSError]
    for module, name in (("kdet.engine", "UserError"), ("kdet.config", "RecipeError"),
                         ("kdet.data.base", "DatasetError"), ("kdet.metrics.coco", "CocoInputError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def error_line(err):
    """The one line ``error: ...`` printed for ``err``."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        message = f"{err.filename}: {err.strerror or err}"
    else:
        message = str(err) or type(err).__name__
    return "error: " + " ".join(part.strip() for part in message.splitlines() if part.strip())


def quiet_tensorflow_logs():
    """Default ``TF_CPP_MIN_LOG_LEVEL`` to 2 (before TensorFlow is imported); True when kdet may filter."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ and DEFAULTED_BY_KDET not in os.environ:
        return False
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    os.environ[DEFAULTED_BY_KDET] = "1"
    return True


def import_tensorflow():
    """``import tensorflow`` (and its device discovery) with the start-up noise filtered out of stderr."""
    if "tensorflow" in sys.modules or not quiet_tensorflow_logs():
        import tensorflow as tf

        return tf
    with _filtered_stderr(STARTUP_NOISE):
        import tensorflow as tf

        tf.config.list_physical_devices()   # cuInit and the driver probe print here, not at first use
    return tf


class _filtered_stderr:
    """Redirect file descriptor 2 into a temporary file; on exit, write back the lines not matching ``noise``."""

    def __init__(self, noise):
        self.noise = noise

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.capture = tempfile.TemporaryFile(mode="w+b")
        os.dup2(self.capture.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.capture.seek(0)
        for line in self.capture.read().decode(errors="replace").splitlines(keepends=True):
            if not self.noise.search(line):
                sys.stderr.write(line)
        sys.stderr.flush()
        self.capture.close()
        return False


def load_keras_model(path, compile=True):
    """A ``.keras`` file through kdet's loader (kdet's classes registered); a bad file is a `ToolError` naming it."""
    if not os.path.exists(path):
        raise ToolError(f"{path}: no such model file")
    if os.path.isdir(path):
        raise ToolError(f"{path}: a folder, not a .keras model file")
    import zipfile

    if str(path).endswith(".keras") and not zipfile.is_zipfile(path):
        raise ToolError(f"{path}: not a .keras model file (not a complete zip archive: cut off mid-write, "
                        "or another format)")
    from kdet.models.ssd import load_model

    try:
        return load_model(path, compile=compile)
    except Exception as err:  # any failure to load means the file is unusable; say which file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ToolError(f"{path}: cannot load the model ({type(err).__name__}: {reason}); "
                        "it is damaged or not a kdet .keras model") from err


def _show_kdet_warnings_as_lines():
    """kdet's own warnings as one ``warning: ...`` line each (no source line echoed); others unchanged."""
    original = warnings.showwarning
    if getattr(original, "kdet", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("kdet") or f"{os.sep}kdet{os.sep}" in str(filename):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    show.kdet = True
    warnings.showwarning = show


def _exit_now(status):
    """End the process here, output flushed, without the interpreter's shutdown.

    After a run stopped by bad input, TensorFlow threads (the tf.data iterator the error
    came through) can still be running; tearing the runtime down under them aborts the
    process ("terminate called without an active exception", status -6 instead of 2) or
    hangs it. What the run writes at each epoch's end (checkpoints, ``state.json``, ``log.csv``)
    is on disk by then.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def tool_main(func=None, *, needs_tensorflow=True):
    """Decorator for a tool's ``main(argv=None)``: quiet TensorFlow start-up, user errors -> one line, exit 2."""
    if func is None:
        return functools.partial(tool_main, needs_tensorflow=needs_tensorflow)

    @functools.wraps(func)
    def wrapper(argv=None, *args, **kwargs):
        words = sys.argv[1:] if argv is None else list(argv)
        console()  # kdet's log lines on stdout, as they always were printed (kdet.log)
        quiet_tensorflow_logs()
        _show_kdet_warnings_as_lines()
        if needs_tensorflow and not {"-h", "--help"} & set(words):
            import_tensorflow()
        try:
            return func(argv, *args, **kwargs)
        except user_errors() as err:
            print(error_line(err), file=sys.stderr)
            if argv is None and "tensorflow" in sys.modules:  # the command line, after TensorFlow ran
                _exit_now(2)
            return 2

    return wrapper

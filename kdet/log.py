"""kdet's messages go through :mod:`logging`: the ``kdet`` logger and its children (``kdet.engine``, ...).

Unless a program configured the ``kdet`` logger before kdet's first module that logs was
imported, the ``kdet`` logger gets :class:`ConsoleHandler`: each message as it is, one line, on
the ``sys.stdout`` of the moment (the wording the tools always printed), at level INFO, not
passed on to the root logger (so a ``logging.basicConfig`` does not print it twice). A program
embedding kdet silences or redirects it as any library's::

    import logging
    logging.getLogger("kdet").setLevel(logging.WARNING)   # only kdet's warnings
    kdet.log.use_handler(my_handler)                      # its own handler instead of the console
    kdet.log.use_handler(None)                            # no handler of kdet's: on to the root logger

Notes are logged at INFO, lines that start with ``warning:`` at WARNING. ``tools/*.py``
install the console handler explicitly (:func:`console`, through ``kdet.cli.tool_main``).

Keras' own progress output is not a logger's; :func:`fit_verbose` makes it one line per
epoch when stdout is not a terminal (a log file).

This module imports nothing of kdet's.
"""

import logging
import sys

LOGGER_NAME = "kdet"


class ConsoleHandler(logging.StreamHandler):
    """The message as is on the current ``sys.stdout``, looked up at each message (pytest's capture and
    ``contextlib.redirect_stdout`` replace ``sys.stdout`` after kdet is imported)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # set by StreamHandler.__init__; the stream is looked up at each message instead
        pass


def kdet_logger():
    """The ``kdet`` logger, every kdet logger's parent."""
    return logging.getLogger(LOGGER_NAME)


def get_logger(name):
    """The logger of kdet module ``name`` (``__name__``): a child of ``kdet``."""
    return logging.getLogger(name if name == LOGGER_NAME or name.startswith(LOGGER_NAME + ".")
                             else f"{LOGGER_NAME}.{name}")


def use_handler(handler, level=None):
    """``handler`` as the ``kdet`` logger's only handler, not passed on to the root logger; None: no
    handler of kdet's, the messages go on to the root logger's (the program's logging set-up)."""
    logger = kdet_logger()
    for old in list(logger.handlers):
        logger.removeHandler(old)
    if handler is None:
        logger.propagate = True
    else:
        logger.addHandler(handler)
        logger.propagate = False
    if level is not None:
        logger.setLevel(level)
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def console():
    """The console handler (what the tools print), unless the ``kdet`` logger already has one."""
    if not any(isinstance(h, ConsoleHandler) for h in kdet_logger().handlers):
        use_handler(ConsoleHandler())


def _default_set_up():
    """The console handler unless the program configured the ``kdet`` logger first."""
    if not kdet_logger().handlers:
        use_handler(ConsoleHandler())


def fit_verbose(verbose):
    """Keras' ``verbose`` for ``fit``: 1 (a progress bar redrawn at each step) becomes 2 (one line per
    epoch) when stdout is not a terminal, where each redraw would be a new line of the log file."""
    if verbose == 1 and not _is_terminal(sys.stdout):
        return 2
    return verbose


def _is_terminal(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


_default_set_up()

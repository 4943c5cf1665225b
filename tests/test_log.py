"""kdet's messages go through the ``kdet`` logger: printed as they always were by default, and a
program embedding kdet can silence or redirect them."""

import io
import logging
import types

import pytest

import kdet.log as klog


@pytest.fixture
def kdet_logger_state():
    """The ``kdet`` logger's handlers, level and propagation, restored after the test."""
    logger = klog.kdet_logger()
    saved = list(logger.handlers), logger.level, logger.propagate
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_messages_print_as_they_are_on_the_current_stdout(capsys, kdet_logger_state):
    klog.console()
    klog.get_logger("kdet.engine").info("train: 10 images (3 a, 7 b)")
    klog.get_logger("kdet.build").warning("warning: train.ema_momentum=0.999 ...")
    out = capsys.readouterr()
    assert out.out == "train: 10 images (3 a, 7 b)\nwarning: train.ema_momentum=0.999 ...\n" and out.err == ""


def test_a_library_module_logs_through_the_kdet_logger(capsys, kdet_logger_state):
    from kdet.build import resolve_small_data

    klog.console()
    recipe = dict(small_data=dict(max_images=20, train=dict(epochs=5)), train=dict(epochs=50))
    assert resolve_small_data(recipe, 10)["train"]["epochs"] == 5
    assert capsys.readouterr().out == ("small_data: 10 training images <= 20: the recipe's small-data settings "
                                       "apply (train.epochs)\n")


def test_silenced_and_redirected(capsys, kdet_logger_state):
    klog.console()
    kdet_logger_state.setLevel(logging.WARNING)
    klog.get_logger("kdet.engine").info("a note")
    assert capsys.readouterr().out == ""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
    klog.use_handler(handler, level=logging.INFO)
    klog.get_logger("kdet.engine").info("a note")
    assert stream.getvalue() == "[kdet.engine] a note\n" and capsys.readouterr().out == ""
    klog.use_handler(None)  # on to the root logger's handlers
    assert kdet_logger_state.propagate and not kdet_logger_state.handlers


def test_get_logger_names_children_of_kdet():
    assert klog.get_logger("kdet.engine").name == "kdet.engine"
    assert klog.get_logger("kdet").name == "kdet"
    assert klog.get_logger("tools_train").name == "kdet.tools_train"


def test_fit_verbose_is_one_line_per_epoch_off_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stdout", types.SimpleNamespace(isatty=lambda: False, write=print))
    assert klog.fit_verbose(1) == 2 and klog.fit_verbose(0) == 0 and klog.fit_verbose(2) == 2
    monkeypatch.setattr("sys.stdout", types.SimpleNamespace(isatty=lambda: True, write=print))
    assert klog.fit_verbose(1) == 1

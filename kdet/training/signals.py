"""SIGTERM / SIGINT during training: the first is noted (or stops at once outside ``fit``), a second exits.

Kept free of TensorFlow and Keras imports so that ``tools/train.py`` and small scripts can use it
cheaply; the checkpoint a signal leads to is written by ``kdet.training.preemption.MidEpochCheckpoint``.
"""

import os
import signal
import threading

SIGNALS = ("SIGTERM", "SIGINT")


class Interrupted(BaseException):
    """A run stopped by a signal; ``line`` is what to print, ``status`` the exit status (128 + signal).

    A ``BaseException``, as ``KeyboardInterrupt`` is: code that catches ``Exception`` lets it through.
    """

    def __init__(self, signum, where):
        self.signum = int(signum)
        self.name = signal.Signals(self.signum).name
        self.where = where
        self.line = f"stopped by {self.name} {where}; resume with --resume"
        self.status = 128 + self.signum
        super().__init__(self.line)


class SignalStop:
    """SIGTERM / SIGINT handlers: note the first signal (``deferred``) or raise :class:`Interrupted` at once.

    ``phase`` says where a signal that stops at once lands (``where`` of the exception). Installed
    only from the main thread (Python's rule for signal handlers); ``restore`` puts back the
    handlers it replaced.
    """

    def __init__(self):
        self.pending = None
        self.deferred = False
        self.phase = "before training started (nothing to save)"
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in SIGNALS:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        return self

    @staticmethod
    def ignore():
        """Ignore both signals from now on (the run's work is done and written)."""
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                signal.signal(getattr(signal, name), signal.SIG_IGN)

    def restore(self):
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.pending is not None:   # a second signal: exit now, without unwinding anything
            name = signal.Signals(signum).name
            os.write(2, f"stopped by a second {name} at once; the last checkpoint on disk is the resume point "
                        "(--resume)\n".encode())
            os._exit(128 + signum)
        self.pending = signum
        if not self.deferred:
            raise Interrupted(signum, self.phase)

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()
        return False

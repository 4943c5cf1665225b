"""kdet's user-facing error classes, in one leaf module every other module may import.

Each message is the whole story, one line naming the file or the key and the problem
(no traceback needed). The classes are also importable from where they were first
defined (``kdet.config.RecipeError``, ``kdet.data.base.DatasetError``,
``kdet.engine.UserError``, ``kdet.cli.ToolError``): the same classes, re-exported.

This module imports nothing of kdet's.
"""


class RecipeError(ValueError):
    """A recipe that cannot be read or a bad override; the message is one line."""


class DatasetError(ValueError):
    """Bad or missing dataset input; the message names the file and the problem.

    ``reason`` is a short tag (``"degenerate"``, ``"missing file"``, ...) used
    to count what ``skip_invalid=True`` dropped.
    """

    def __init__(self, message, reason=None):
        super().__init__(message)
        self.reason = reason


class UserError(Exception):
    """An error whose message is the whole story (no traceback needed)."""


class ToolError(Exception):
    """A tool's own bad-input error (argument combinations, empty folders); the message is the line."""

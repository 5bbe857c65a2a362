"""The one exception a user's mistake turns into: `UsageError("what is wrong; how to fix it")`.

Raised anywhere (a missing model directory, an unknown task, a data file without the needed field,
a tokenizer that lacks a token the chosen template needs), it reaches `nanoseek.cli.main`, which
prints the message as one line and exits with code 2; `nanoseek --debug ...` shows the traceback.
Code that may be called as a library raises it too: it is a ValueError, so callers can catch it.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A problem with what the user gave (paths, names, files, options), not a bug in nanoseek."""


class MissingPathError(UsageError, FileNotFoundError):
    """A file or directory the user named does not exist (or is not what it should be)."""

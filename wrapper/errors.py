"""Errors a user can act on. The CLI prints `str(err)` as one line and exits with `exit_code`."""


class LfwError(Exception):
    exit_code = 2


class RunFailed(LfwError):
    """The training child (or another LLaMA-Factory command) failed."""

    exit_code = 1

"""One exception hierarchy for everything sfdeploy can tell a user.

Library code raises these; only the CLI turns them into ``click`` errors (exit code 1 with the
message). Each error names the input it is about and the fix, so the message alone is enough to
act on: ``<what went wrong>: <path>`` then ``fix: <what to do>``.
"""

from __future__ import annotations

from pathlib import Path


class SfdeployError(Exception):
    """An error the user can act on: what went wrong, on which input, and how to fix it."""

    def __init__(self, message: str, *, path: str | Path | None = None, fix: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.fix = fix
        super().__init__(self.__str__())

    def __reduce__(self) -> tuple:
        """Pickle message, path and fix (not the joined text): the error survives a trip through
        another process (a Ray worker, a worker pool) as itself."""
        return _rebuild, (type(self), self.message, self.path, self.fix)

    def __str__(self) -> str:
        text = self.message
        if self.path is not None:
            text = f"{text}: {self.path}"
        if self.fix:
            text = f"{text}\n  fix: {self.fix}"
        return text


def _rebuild(cls: type[SfdeployError], message: str, path: str | None, fix: str | None) -> SfdeployError:
    return cls(message, path=path, fix=fix)


class InputError(SfdeployError):
    """Bad user input: a missing, corrupt or inconsistent file, directory or option value."""


class OptionError(InputError):
    """An option value that cannot be used with the others given; ``option`` names it (as the CLI
    spells it), so that the command line can call it a usage error of that option."""

    def __init__(self, message: str, *, option: str | None = None, path: str | Path | None = None,
                 fix: str | None = None):
        self.option = option
        super().__init__(message, path=path, fix=fix)


class EnvironmentProblem(SfdeployError):
    """The installed environment cannot do what was asked (missing package, binary, device)."""


class TrainingError(SfdeployError):
    """Training could not start or did not finish."""


class ExportError(SfdeployError):
    """An artifact could not be built, or does not behave like the model it came from."""


class ServingError(SfdeployError):
    """The Triton server could not be started, reached, or asked for a model."""

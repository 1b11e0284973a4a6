"""Errors the CLI maps to exit codes instead of tracebacks, shared by the build side and the runtime.

Exit codes: 0 ok; 1 a build, verification, parity or generation failure; 2 a user error (a recipe, an
argument, a missing or corrupted file: one clear message naming the place and the fix).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2


class SdkilnError(Exception):
    """Base of the errors the CLI maps to exit codes instead of tracebacks."""

    exit_code = EXIT_FAILURE


class UserError(SdkilnError):
    """Bad input: a recipe, an argument, a missing file. Exit code 2, one clear message."""

    exit_code = EXIT_USER_ERROR


class RecipeError(UserError):
    """A recipe failed validation; carries every problem at once, each with its path."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s)\n{lines}")


class CorruptArtifactError(UserError):
    """A bundle or download does not match its manifest's sha256s; found before anything is loaded.

    Exit code 2: the fix is the user's (rebuild, re-download, or ``sdkiln verify`` to see what changed).
    """


class SchemaError(UserError):
    """A manifest written by another (newer) schema version than this sdkiln reads."""


class InputSpecError(UserError):
    """An input does not match the component's I/O spec (name, dtype or shape)."""


class BuildError(SdkilnError):
    """A stage failed while running. Exit code 1."""

    exit_code = EXIT_FAILURE


class ParityError(BuildError):
    """An artifact's outputs are too far from the PyTorch reference; every failure is listed."""

    def __init__(self, what: str, failures: list[str]):
        self.failures = failures
        lines = "\n".join(f"  {f}" for f in failures)
        super().__init__(f"parity gate failed for {what}:\n{lines}")


class VerifyError(SdkilnError):
    """Files do not match their manifest (missing, extra or changed). Exit code 1."""

    exit_code = EXIT_FAILURE


class GenerationError(SdkilnError):
    """The models ran but produced something unusable (non-finite pixels). Exit code 1."""

    exit_code = EXIT_FAILURE


class HubUnreachableError(SdkilnError):
    """The Hub could not be reached and nothing usable is cached. Exit code 1."""

    exit_code = EXIT_FAILURE

"""User-facing errors: one line, names the file/key/flag and what was expected, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The CLI prints ``error: <message>`` and exits with ``exit_code``."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(UserError):
    """A config file that does not validate; holds one message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Preempted(Exception):  # noqa: N818 - not an error: a run asked to stop
    """Training stopped on a signal (Slurm's ``--signal`` ahead of a time limit or a preemption) after writing a
    checkpoint at a step boundary; the requeued job, or the same command rerun, resumes from it. The CLI prints
    the message and exits with 75, EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry")."""

    exit_code = 75

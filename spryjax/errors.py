"""What a user sees when a command does not finish: one line on stderr and an exit code, never a traceback.

    InputError     bad input (a config field, a path, a file's contents)            exit code 2
    Diverged       a run's loss or parameters turned non-finite                      exit code 3
    Interrupted    Ctrl-C; the message says where the same command resumes           exit code 130

Library functions raise `InputError` with a message that says what is wrong and where (field, file, value);
every command line (spryjax.main, spryjax.launch, spryjax.report, experiments/*.py, scripts/*.py) runs its main
through `run_command`, which turns these, argparse's usage errors (`ArgumentParser`) and a bare Ctrl-C into that
one line. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


class InputError(Exception):
    """Bad input from the user: the message says what is wrong and where (field, file, value)."""
    exit_code = 2


class Diverged(RuntimeError):
    """A non-finite training loss, parameter or evaluation loss; the message names the round and the last good
    checkpoint."""
    exit_code = 3


class Interrupted(Exception):
    """Ctrl-C during a run; the message says where the run stopped and where the same command resumes."""
    exit_code = 130


def one_line(error: object) -> str:
    """The text of an exception (or anything) on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def warn(message: str) -> None:
    """One line on stderr, `spryjax: warning: ...`: something was repaired or taken over, and the run goes on."""
    print(f"spryjax: warning: {one_line(message)}", file=sys.stderr, flush=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are an `InputError` (one line through `run_command`) instead of argparse's
    two lines (usage, then the error) and exit."""

    def error(self, message: str):
        raise InputError(message)


def fail(prog: str, error: BaseException) -> int:
    """Prints `prog: error: <one line>` (or `prog: <one line>` for an interruption) and returns the exit code."""
    if isinstance(error, KeyboardInterrupt):
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return Interrupted.exit_code
    label = "" if isinstance(error, Interrupted) else "error: "
    print(f"{prog}: {label}{one_line(error)}", file=sys.stderr, flush=True)
    return error.exit_code


def run_command(main: Callable[[], int | None], prog: str) -> int:
    """main() with the user-facing failures turned into one line and their exit code; returns the exit code."""
    try:
        return main() or 0
    except (InputError, Diverged, Interrupted, KeyboardInterrupt) as error:
        return fail(prog, error)

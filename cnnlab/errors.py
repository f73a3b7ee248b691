"""One exception type per exit status, the 'did you mean' helper every registry uses, and `note`,
the one way library code tells the user something.

The CLI turns the exceptions into a one-line message and an exit status; library code raises them
and never exits itself. Notes and warnings go through `note`: stderr, so stdout carries results
only (`evaluate --json` stays JSON), and rank 0 only, so a DDP run says each thing once.
"""
import difflib
import os
import sys


class CnnlabError(Exception):
    """A runtime failure the user can fix (bad file, missing data): exit status 1."""

    exit_code = 1


class UsageError(CnnlabError):
    """A bad command line or configuration: exit status 2."""

    exit_code = 2


def closest(name, choices):
    """The valid choice nearest to a misspelt `name`, or None."""
    matches = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown(kind, name, choices):
    """A UsageError for an unknown name that lists the valid ones and suggests the closest."""
    hint = closest(name, choices)
    suggestion = f" Did you mean '{hint}'?" if hint else ""
    return UsageError(f"unknown {kind} '{name}'.{suggestion} Valid: {', '.join(sorted(choices))}.")


def on_main_rank():
    """True in a plain process and on rank 0 under torchrun (which sets RANK): the one that speaks."""
    return os.environ.get("RANK", "0") == "0"


def note(message):
    """A note or warning for the person at the terminal: one line on stderr, from rank 0 only."""
    if on_main_rank():
        print(message, file=sys.stderr, flush=True)


def printable(text):
    """`text` with control characters (a newline, an escape sequence) written as Python escapes
    (\\n, \\x1b): a file or folder name taken from the data can then neither split a one-line
    message nor drive the terminal. Printable text, accents included, is left as it is, so
    escaping twice changes nothing."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))

"""One exception type per exit status, and the 'did you mean' helper every registry uses.

The CLI turns these into a one-line message and an exit status; library code raises them and
never prints or exits itself.
"""
import difflib


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

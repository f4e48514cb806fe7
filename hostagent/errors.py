"""The error types every part of hostagent raises for bad input.

Each message names what was wrong: the file (or field, or request key) and the bad value,
so that the CLI can print it as is and exit non-zero.
"""

from __future__ import annotations


class HostagentError(Exception):
    """Base of every error hostagent reports to a user (CLI exit code 2)."""


class ProbeError(HostagentError):
    """A sysfs or resctrl file could not be read or holds a value we cannot parse."""

    def __init__(self, path: object, problem: str, value: object = None) -> None:
        self.path = str(path)
        self.problem = problem
        self.value = value
        text = f"{self.path}: {problem}"
        if value is not None:
            text += f" (read {value!r})"
        super().__init__(text)


class ConfigError(HostagentError):
    """The configuration file is missing, unparsable or inconsistent."""


class RequestError(HostagentError):
    """A fit request, reservation spec or other user request is invalid."""

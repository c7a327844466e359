from __future__ import annotations


class StudyError(ValueError):
    """A study that cannot run as asked; the message names the problem and the fix."""

"""The tasks a model can run: what a request asks for, and what a pipeline call does."""

from __future__ import annotations

import enum


class Task(enum.Enum):
    """What a request asks for."""

    GENERATE = "generate"
    EDIT = "edit"
    INPAINT = "inpaint"

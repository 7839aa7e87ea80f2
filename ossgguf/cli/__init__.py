"""The `ossgguf` command: a thin click shell over the library functions (base: the group, the error
boundary and option types; options: option groups; files and models: the commands)."""

from . import files, models  # noqa: F401 (importing them registers the commands)
from .base import cli, main

__all__ = ["cli", "main"]

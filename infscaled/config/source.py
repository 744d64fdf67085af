"""Static checks of `model.source`: which of the four forms it is, and whether it is well formed.

Whether a builtin name or a python: factory really exists is decided later (by the models
package, or `check_builtin`); here we only check what needs no imports.
"""

from __future__ import annotations

import keyword
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from infscaled.config.messages import config_error

KEY: Final = "model.source"
SOURCE_FORMS: Final = (
    "'builtin:NAME', 'python:MODULE:FACTORY', a model directory "
    "('/abs', './rel', '../rel', '~/dir' or an existing path), or a Hugging Face id ('org/name')"
)
_BUILTIN_NAME = re.compile(r"^[\w.-]+$")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PATH_PREFIXES: Final = ("/", "./", "../", "~")


def _is_dotted_identifier(text: str) -> bool:
    parts = text.split(".")
    return all(part.isidentifier() and not keyword.iskeyword(part) for part in parts)


def under_roots(candidate: Path, roots: Sequence[str]) -> bool:
    """Whether `candidate` lies under one of `roots`, lexically (no file system access)."""
    lexical = os.path.normpath(str(candidate))
    return any(os.path.commonpath([lexical, os.path.normpath(r)]) == os.path.normpath(r) for r in roots)


def roots_problem(roots: Sequence[str]) -> str:
    """The one message for any path outside the roots: it says nothing of what exists there."""
    if not roots:
        return "model directories are not served by this controller (its model_roots is empty)"
    return f"outside the model directories this controller serves (model_roots: {', '.join(roots)})"


def resolve_source(path: str, source: str, base_dir: Path, roots: Sequence[str] | None = None) -> str:
    """Validate `source`; a model directory comes back as an absolute path, anything else unchanged.

    With `roots` (a controller's model_roots), a directory must lie under one of them, checked
    lexically before the file system is touched and again after symlinks are resolved, with one
    message for both, so a job file cannot probe which paths exist elsewhere."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if not _BUILTIN_NAME.match(name):
            raise config_error(
                path,
                KEY,
                source,
                "'builtin:NAME' with NAME of letters, digits, '_', '.', '-'",
                "missing or malformed builtin model name",
            )
        return source
    if source.startswith("python:"):
        module, colon, factory = source.removeprefix("python:").partition(":")
        if not colon or not _is_dotted_identifier(module) or not _is_dotted_identifier(factory):
            raise config_error(
                path,
                KEY,
                source,
                "'python:MODULE:FACTORY' with MODULE a dotted module path and FACTORY a (dotted) "
                "attribute of it, e.g. 'python:mypkg.models:build'",
                "malformed python: source",
            )
        return source
    candidate = base_dir / Path(source).expanduser()
    path_like = source.startswith(_PATH_PREFIXES)
    if roots is not None and not under_roots(candidate, roots):
        if path_like:
            raise config_error(path, KEY, source, SOURCE_FORMS, roots_problem(roots))
        candidate_exists = False  # never probed: read as a Hugging Face id
    else:
        candidate_exists = not path_like and candidate.exists()
    if path_like or candidate_exists:
        resolved = candidate.resolve()
        if roots is not None and not under_roots(resolved, [str(Path(r).resolve()) for r in roots]):
            raise config_error(path, KEY, source, SOURCE_FORMS, roots_problem(roots))
        if not resolved.is_dir():
            problem = "not a directory" if resolved.exists() else "no such model directory"
            raise config_error(
                path,
                KEY,
                source,
                SOURCE_FORMS,
                f"{problem} (resolved to {resolved})",
            )
        return str(resolved)
    if not _HF_ID.match(source):
        raise config_error(path, KEY, source, SOURCE_FORMS, "neither a path nor a valid Hugging Face id")
    return source

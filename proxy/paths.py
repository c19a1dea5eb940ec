"""One rule for relative paths, and file errors that name the path and the reason.

The rule: a path written inside a config file (``storage.path``, ``rules``) resolves
against the directory of that config file; a path given on the command line (``--config``,
``--db``, ``--workdir``, ``rules check FILE``, ``simulate --rules FILE``) resolves against
the current directory. Everything is made absolute once, when it is read, so a later
``chdir`` cannot change what a path means and every error can name the absolute path.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from proxy.errors import FileProblem


def absolute(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> Path:
    """``path`` made absolute against ``base`` (default: the current directory), with ``.``
    and ``..`` folded (symlinks are left alone)."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_absolute():
        p = Path(base if base is not None else os.getcwd()) / p
    return Path(os.path.normpath(p))


def reason(exc: OSError) -> str:
    """A short lower-case reason for an OSError ("does not exist", "permission denied")."""
    known = {errno.ENOENT: "does not exist", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied", errno.ENOTDIR: "a parent is not a directory",
             errno.EISDIR: "is a directory", errno.EROFS: "read-only file system",
             errno.ENOSPC: "no space left on device"}
    if exc.errno in known:
        return known[exc.errno]
    return (exc.strerror or str(exc)).lower()


def check_database(path: Path, *, create_dir: bool) -> None:
    """Raise FileProblem("cannot open database PATH: REASON") when SQLite could not open or
    create ``path``. ``create_dir``: make a missing directory (the server does; operator
    commands do not, so a mistyped path does not leave directories behind)."""
    what = f"cannot open database {path}"
    if path.is_dir():
        raise FileProblem(f"{what}: it is a directory")
    parent = path.parent
    if not parent.exists():
        if not create_dir:
            raise FileProblem(f"{what}: directory {parent} does not exist")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FileProblem(f"{what}: cannot create directory {parent}: {reason(exc)}") \
                from exc
    elif not parent.is_dir():
        raise FileProblem(f"{what}: {parent} is not a directory")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise FileProblem(f"{what}: permission denied (needs read and write)")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise FileProblem(f"{what}: the file does not exist and directory {parent} "
                          "is not writable")


def make_workdir(path: Path) -> None:
    """Create the demo's working directory or raise FileProblem naming it and why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise FileProblem(f"cannot use workdir {path}: it exists and is not a directory") \
            from exc
    except OSError as exc:
        raise FileProblem(f"cannot create workdir {path}: {reason(exc)}") from exc

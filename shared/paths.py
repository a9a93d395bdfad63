"""Where Tenaya's own code lives, and how its processes find it and nothing else.

Tenaya's packages have short, common names (``master``, ``worker``, ``shared``). Python puts
the current directory first on ``sys.path`` for ``python -m``, so a ``worker.py`` or
``shared.py`` of the user's there would be imported instead of Tenaya's. So:

- every process Tenaya starts (workers, a new master, the demo origins, ``check``) runs with
  ``python -P``, which adds no directory of the user's to ``sys.path``;
- the directories an app is imported from (the config file's directory, then the current
  directory) are added explicitly, by the worker, when it loads the app, after Tenaya's own
  packages are imported; and a module there that has the name of one of Tenaya's packages is
  refused with a message that names it, since the app's ``import worker`` would get Tenaya's.
"""

from __future__ import annotations

import os
import site
import sys

#: Tenaya's top-level packages, which nothing of the user's may shadow.
PACKAGES = ("master", "worker", "shared")

#: The directory that holds Tenaya's packages (a source checkout, or site-packages).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_command(module: str, *args: str) -> list[str]:
    """The command that runs ``python -m module args`` with this interpreter, with no
    directory of the user's on ``sys.path`` (``-P``)."""
    return [sys.executable, "-P", "-m", module, *args]


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process of :func:`python_command`: a copy of ``env`` (default:
    this process's), with :data:`ROOT` first on ``PYTHONPATH`` when Tenaya runs from a
    directory that only ``sys.path`` names (a checkout that is not installed). An installed
    Tenaya is found as any installed package is."""
    out = dict(os.environ if env is None else env)
    if _root_needs_path():
        rest = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and p != ROOT]
        out["PYTHONPATH"] = os.pathsep.join([ROOT, *rest])
    return out


def _root_needs_path() -> bool:
    site_dirs = {os.path.abspath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if ROOT in site_dirs:
        return False
    # An editable install maps the packages without naming ROOT on sys.path.
    return ROOT in {os.path.abspath(p) for p in sys.path if p}


def app_dirs(config_source: str | None) -> list[str]:
    """The directories an app is imported from, first first: the directory of the config
    file (when there is one), then the current directory."""
    dirs = []
    if config_source and os.path.isfile(config_source):
        dirs.append(os.path.dirname(os.path.abspath(config_source)))
    cwd = os.getcwd()
    if cwd not in dirs:
        dirs.append(cwd)
    return dirs


def shadowing(dirs: list[str]) -> list[tuple[str, str]]:
    """The files or packages in ``dirs`` that have the name of one of Tenaya's packages and
    are not Tenaya's own, as (path, package name) pairs."""
    found = []
    for d in dirs:
        for name in PACKAGES:
            for candidate in (os.path.join(d, f"{name}.py"), os.path.join(d, name)):
                package = os.path.isdir(candidate)
                if package and not os.path.isfile(os.path.join(candidate, "__init__.py")):
                    continue
                if not package and not os.path.isfile(candidate):
                    continue
                if os.path.realpath(candidate) != os.path.realpath(os.path.join(ROOT, name)):
                    found.append((candidate, name))
    return found


def add_app_dirs(config_source: str | None) -> None:
    """Puts the app's directories (:func:`app_dirs`) first on ``sys.path``. Raises
    :class:`ValueError` naming the file when one of them holds a module with the name of one
    of Tenaya's packages."""
    dirs = app_dirs(config_source)
    clashes = shadowing(dirs)
    if clashes:
        path, name = clashes[0]
        raise ValueError(
            f"{path} has the name of Tenaya's package {name!r}: an 'import {name}' "
            f"in the app would get Tenaya's, so rename it"
            + (
                f" (and {len(clashes) - 1} more: " + ", ".join(p for p, _ in clashes[1:]) + ")"
                if len(clashes) > 1
                else ""
            )
        )
    for d in reversed(dirs):
        if d in sys.path:
            sys.path.remove(d)
        sys.path.insert(0, d)

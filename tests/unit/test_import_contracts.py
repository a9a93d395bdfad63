"""The import contracts in pyproject.toml (``[tool.importlinter]``) hold.

import-linter reads every import of ``master``, ``shared`` and ``worker`` from the source,
those inside functions and under ``TYPE_CHECKING`` included, and checks the worker's layers,
that the master imports neither the worker nor the app API, that ``shared`` imports neither
process, and that no package's modules import each other in a cycle. Run ``lint-imports`` for
the same report.

A static graph does not see one thing the interpreter does: importing ``shared.ipc`` runs
``shared/__init__.py`` first. So the master's contract is checked a second time against the
modules a real import of the master loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: Prints, as JSON, the modules of the project that importing every master module loads.
_LOAD_MASTER = """
import json, pkgutil, importlib, sys
import master
for info in pkgutil.walk_packages(master.__path__, "master."):
    if not info.name.endswith(".__main__"):  # runs the CLI; it imports master.cli
        importlib.import_module(info.name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("shared", "worker"))))
"""


def importlinter_settings() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        settings: dict[str, Any] = tomllib.load(f)["tool"]["importlinter"]
    return settings


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_import_contracts_hold() -> None:
    """``lint-imports`` keeps every contract (its report says which import breaks one)."""
    done = run_python(
        "import sys\n"
        "from importlinter.cli import lint_imports\n"
        "sys.exit(lint_imports(no_cache=True, no_logo=True))\n"
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_type_checking_imports_count() -> None:
    """A layer that imports another only for its annotations still depends on it."""
    assert importlinter_settings().get("exclude_type_checking_imports", False) is False


def test_the_master_loads_neither_the_worker_nor_the_app_api() -> None:
    """Importing every master module loads none of the modules the master's contract
    forbids (the app API is loaded by the worker, and by the master's ``check`` only in a
    ``python -m worker --check`` subprocess)."""
    (contract,) = [
        c for c in importlinter_settings()["contracts"] if c.get("source_modules") == ["master"]
    ]
    forbidden = contract["forbidden_modules"]
    done = run_python(_LOAD_MASTER)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden)]
    assert not bad, f"importing the master loads {bad}"

"""A user's own modules cannot take the place of Tenaya's packages: a ``worker.py``,
``shared.py`` or ``master.py`` beside the config or in the current directory is refused by name
(never run), the built-in load balancer serves whatever the current directory holds, and an
app's helper modules beside its config import as before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from tests.support.client import get
from tests.support.config import config_for, origin_app
from tests.support.master import Master

if TYPE_CHECKING:
    from tests.conftest import Fleet

#: A user's module that, if it ever ran, would leave a mark beside itself.
MARKING_MODULE = """
import pathlib
pathlib.Path(__file__).with_suffix(".ran").write_text("ran")
raise ImportError("the user's module ran")
"""


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "master", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


# (``python -m master`` in a directory with a master.py runs that file before any of Tenaya's
# code can: there the README says to use the ``tenaya`` command.)
@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("worker", "beside_config"),
        ("shared", "beside_config"),
        ("master", "beside_config"),
        ("worker", "current_dir"),
        ("shared", "current_dir"),
    ],
)
def test_check_refuses_a_module_named_like_a_package(tmp_path: Path, name: str, where: str) -> None:
    """``check`` names the clashing file and exits 1; the file never runs."""
    project = tmp_path / "project"
    project.mkdir()
    config = config_for(app="myapp:App", app_options={"origin": "127.0.0.1:9"})
    (project / "tenaya.yaml").write_text(yaml.safe_dump(config))
    (project / "myapp.py").write_text(origin_app())
    clash_dir = project if where == "beside_config" else tmp_path / "cwd"
    clash_dir.mkdir(exist_ok=True)
    (clash_dir / f"{name}.py").write_text(MARKING_MODULE)
    cwd = tmp_path if where == "beside_config" else clash_dir
    result = _run("check", "-c", str(project / "tenaya.yaml"), cwd=cwd)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{clash_dir / name}.py has the name of Tenaya's package '{name}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (clash_dir / f"{name}.ran").exists()


def test_start_refuses_a_module_named_like_a_package(fleet: Fleet) -> None:
    """``start`` stops with the same reason, without respawning the worker in a loop."""
    config = config_for(app="myapp:App", app_options={"origin": "127.0.0.1:9"})
    m = fleet.master(
        config, files={"myapp.py": origin_app(), "worker.py": MARKING_MODULE}, start=False
    )
    proc = m.spawn()
    assert proc.wait(60) == 1
    assert "worker.py has the name of Tenaya's package 'worker'" in m.logs()
    assert not (m.workdir / "worker.ran").exists()


def test_builtin_balancer_serves_beside_a_shared_py(fleet: Fleet) -> None:
    """With no app, modules of the user's in the current directory do not matter."""
    origin = fleet.origin()
    m = fleet.master(
        config_for({"origin": [origin.address]}),
        files={"shared.py": MARKING_MODULE, "worker.py": MARKING_MODULE},
    )
    assert get(m.port, "/x").status == 200
    assert origin.paths() == ["/x"]
    assert not (m.workdir / "shared.ran").exists()


def test_app_imports_its_helper_beside_the_config(fleet: Fleet, tmp_path: Path) -> None:
    """A helper module beside the config imports, whatever the master's current directory."""
    origin = fleet.origin()
    helper = "TAG = 'from-helper'\n"
    app = origin_app("""
    def upstream_request_filter(self, session, upstream_request, ctx):
        import myhelper
        upstream_request.set("X-Tag", myhelper.TAG)
""")
    config = config_for(app="myapp:App", app_options={"origin": origin.address})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    m = Master(
        tmp_path / "project", config, files={"myapp.py": app, "myhelper.py": helper}, cwd=elsewhere
    )
    try:
        m.start()
        assert get(m.port, "/").status == 200
        assert origin.requests[-1].header("x-tag") == "from-helper"
    finally:
        m.stop()

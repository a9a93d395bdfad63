"""shared.config: server.max_connections, server.user and server.group (a name or a numeric
id, which must exist), and settings of more than one type."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from shared.config import load
from tests.unit.test_config import MINIMAL, load_error, reasons, reference_rows, write


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        raise pytest.skip.Exception("this system has no user 'nobody'") from None


def test_max_connections_defaults_to_ten_thousand_and_zero_means_no_limit(tmp_path: Path) -> None:
    assert load(write(tmp_path, MINIMAL)).server.max_connections == 10000
    config = load(write(tmp_path, MINIMAL + "server:\n  max_connections: 0\n"))
    assert config.server.max_connections == 0


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-1", "must be 0 or more"),
        ("lots", "expected an integer, got 'lots'"),
        ("1.5", "expected an integer, got 1.5"),
    ],
)
def test_max_connections_refused(tmp_path: Path, value: str, reason: str) -> None:
    path, error = load_error(tmp_path, MINIMAL + f"server:\n  max_connections: {value}\n")
    assert reasons(path, error) == [f"server.max_connections: {reason}"]


def test_user_and_group_unset_by_default(tmp_path: Path) -> None:
    server = load(write(tmp_path, MINIMAL)).server
    assert (server.user, server.group) == (None, None)


@pytest.mark.parametrize("user", ["nobody", "NOBODY_UID", "'NOBODY_UID'"])
def test_user_as_name_or_numeric_id(tmp_path: Path, user: str) -> None:
    nobody = _nobody()
    text = user.replace("NOBODY_UID", str(nobody.pw_uid))
    config = load(write(tmp_path, MINIMAL + f"server:\n  user: {text}\n  group: 0\n"))
    assert config.server.user in ("nobody", nobody.pw_uid, str(nobody.pw_uid))
    assert config.server.group == 0


def test_unknown_user_and_group_are_refused_with_file_key_and_reason(tmp_path: Path) -> None:
    path, error = load_error(
        tmp_path, MINIMAL + "server:\n  user: no-such-user-tenaya\n  group: no-such-group-tenaya\n"
    )
    assert str(error) == (
        f"{path}: server.user: no such user 'no-such-user-tenaya'\n"
        f"{path}: server.group: no such group 'no-such-group-tenaya'"
    )


def test_group_needs_a_user(tmp_path: Path) -> None:
    path, error = load_error(tmp_path, MINIMAL + "server:\n  group: 0\n")
    assert reasons(path, error) == [
        "server.group: needs server.user: a worker that stays root could take any group back"
    ]


def test_numeric_user_without_entry_needs_a_group(tmp_path: Path) -> None:
    uid = 4242
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            break
        uid += 1
    path, error = load_error(tmp_path, MINIMAL + f"server:\n  user: {uid}\n")
    assert reasons(path, error) == [
        f"server.user: user id {uid} has no entry in the user "
        "database, so its group is not known: set server.group"
    ]
    assert load(write(tmp_path, MINIMAL + f"server:\n  user: {uid}\n  group: {uid}\n"))


@pytest.mark.parametrize("value", ["true", "[nobody]", "{name: nobody}", "-1"])
def test_user_of_another_type_is_refused(tmp_path: Path, value: str) -> None:
    path, error = load_error(tmp_path, MINIMAL + f"server:\n  user: {value}\n")
    (reason,) = reasons(path, error)
    assert reason.startswith("server.user: ")
    if value != "-1":
        assert "expected a string, an integer or unset, got " in reason


def test_reference_names_both_types() -> None:
    rows = reference_rows()
    assert rows["server.user"][1:3] == ["a string, an integer or unset", "`unset`"]
    assert rows["server.group"][1:3] == ["a string, an integer or unset", "`unset`"]
    assert rows["server.max_connections"][1:3] == ["an integer", "`10000`"]

"""shared.privileges: server.user/server.group resolved to ids, the decision to switch (root
switches, anyone else warns and does not), and the switch's order and checks."""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from shared import privileges
from shared.privileges import Identity, for_workers, resolve, switch_to


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        raise pytest.skip.Exception("this system has no user 'nobody'") from None


def _unused_uid() -> int:
    uid = 4242
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def test_a_name_resolves_to_its_ids_and_groups() -> None:
    nobody = _nobody()
    identity = resolve("nobody", None)
    assert identity is not None
    assert (identity.uid, identity.gid) == (nobody.pw_uid, nobody.pw_gid)
    assert identity.groups == tuple(os.getgrouplist("nobody", nobody.pw_gid))
    assert identity.name == f"nobody:{grp.getgrgid(nobody.pw_gid).gr_name}"


def test_a_numeric_id_as_integer_or_digits_names_the_same_user() -> None:
    nobody = _nobody()
    assert (
        resolve(nobody.pw_uid, None) == resolve(str(nobody.pw_uid), None) == resolve("nobody", None)
    )


def test_a_group_replaces_the_primary_group() -> None:
    nobody = _nobody()
    identity = resolve("nobody", 0)
    assert identity is not None and identity.gid == 0
    assert identity.groups == tuple(os.getgrouplist(nobody.pw_name, 0))


def test_a_numeric_id_without_entry_needs_a_group_and_gets_no_supplementary_groups() -> None:
    uid = _unused_uid()
    with pytest.raises(LookupError, match=f"user id {uid} has no entry in the user database"):
        resolve(uid, None)
    identity = resolve(uid, 4243)
    assert identity == Identity(uid, 4243, (), f"{uid}:{_group_or_id(4243)}")


def _group_or_id(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


@pytest.mark.parametrize(
    ("user", "group", "reason"),
    [
        ("no-such-user-tenaya", None, "no such user 'no-such-user-tenaya'"),
        ("root", "no-such-group-tenaya", "no such group 'no-such-group-tenaya'"),
        (-1, None, "a user id is 0 or more, got -1"),
        ("root", -2, "a group id is 0 or more, got -2"),
        ("", None, "a user name or id is needed"),
    ],
)
def test_what_does_not_exist_is_refused_with_the_reason(
    user: str | int, group: str | int | None, reason: str
) -> None:
    with pytest.raises(LookupError) as e:
        resolve(user, group)
    assert str(e.value) == reason


def test_unset_user_is_no_identity() -> None:
    assert resolve(None, None) is None
    assert for_workers(None, None) == (None, None)


def test_root_switches_to_another_user(monkeypatch: pytest.MonkeyPatch) -> None:
    _nobody()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(Identity, "is_current", lambda self: False)
    identity, warning = for_workers("nobody", None)
    assert identity == resolve("nobody", None) and warning is None


def test_not_root_warns_and_does_not_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    nobody = _nobody()
    monkeypatch.setattr(os, "geteuid", lambda: nobody.pw_uid + 1)
    monkeypatch.setattr(Identity, "is_current", lambda self: False)
    identity, warning = for_workers("nobody", None)
    assert identity is None
    assert (
        warning is not None
        and warning.startswith("server.user is nobody:")
        and "the master does not run as root: ignored" in warning
    )


def test_not_root_and_already_that_user_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    nobody = _nobody()
    monkeypatch.setattr(os, "geteuid", lambda: nobody.pw_uid)
    monkeypatch.setattr(os, "getegid", lambda: nobody.pw_gid)
    monkeypatch.setattr(Identity, "is_current", lambda self: False)
    assert for_workers("nobody", None) == (None, None)


class FakeIds:
    """os's id calls, recorded; the ids take unless told otherwise, and root cannot come back
    once given up unless ``regain`` is set."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, regain: bool = False, takes: bool = True
    ) -> None:
        self.calls: list[tuple[str, object]] = []
        self.uid, self.gid = 0, 0
        self.regain, self.takes = regain, takes
        for name in ("setgroups", "setresgid", "setresuid", "getresuid", "getresgid"):
            monkeypatch.setattr(os, name, getattr(self, name))

    def setgroups(self, groups: list[int]) -> None:
        self.calls.append(("setgroups", tuple(groups)))

    def setresgid(self, r: int, e: int, s: int) -> None:
        self.calls.append(("setresgid", (r, e, s)))
        if self.takes:
            self.gid = r

    def setresuid(self, r: int, e: int, s: int) -> None:
        self.calls.append(("setresuid", (r, e, s)))
        if self.uid != 0 and r == 0 and not self.regain:
            raise PermissionError(1, "Operation not permitted")
        if self.takes:
            self.uid = r

    def getresuid(self) -> tuple[int, int, int]:
        return (self.uid,) * 3

    def getresgid(self) -> tuple[int, int, int]:
        return (self.gid,) * 3


NOBODY = Identity(65534, 65534, (65534, 100), "nobody:nogroup")


def test_switch_sets_groups_then_group_then_user_and_checks_root_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = FakeIds(monkeypatch)
    switch_to(NOBODY)
    assert ids.calls == [
        ("setgroups", (65534, 100)),
        ("setresgid", (65534,) * 3),
        ("setresuid", (65534,) * 3),
        ("setresuid", (0, 0, 0)),
    ]
    assert (ids.uid, ids.gid) == (65534, 65534)


def test_switch_fails_when_root_could_be_taken_back(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeIds(monkeypatch, regain=True)
    with pytest.raises(PermissionError, match="root could be taken back"):
        switch_to(NOBODY)


def test_switch_fails_when_the_ids_did_not_take(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeIds(monkeypatch, takes=False)
    with pytest.raises(PermissionError, match="did not take"):
        switch_to(NOBODY)


def test_switch_to_root_skips_the_regain_check(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = FakeIds(monkeypatch)
    switch_to(Identity(0, 4, (0, 4), "root:adm"))
    assert ids.calls[-1] == ("setresuid", (0, 0, 0)) and len(ids.calls) == 3


def test_a_failing_step_stops_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = FakeIds(monkeypatch)

    def refuse(groups: list[int]) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setgroups", refuse)
    with pytest.raises(PermissionError):
        switch_to(NOBODY)
    assert ids.calls == []


def test_module_names_the_current_user() -> None:
    assert privileges.current_name().startswith(pwd.getpwuid(os.geteuid()).pw_name + ":")

"""Who the workers run as: ``server.user`` and ``server.group`` resolved, and the switch to them.

The master stays the user it was started as (root, so that it can bind privileged ports and
keep its control socket and pid file to itself). Each worker switches to the configured user
once it has done what needs the master's rights (opened its log files, read its TLS keys) and
before it loads the app, so no app code runs as root. The switch follows the order that cannot
leave a way back (OpenSSH's ``permanently_set_uid``, nginx's worker init): the supplementary
groups, then the group, then the user, each real, effective and saved; then a check that the
ids took and that root cannot be taken back.

Without root the switch is impossible; like nginx, Tenaya then warns and leaves the workers as
the master's user (:func:`for_workers`), so one config serves both a root deployment and a
developer's machine.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Identity:
    """A user to run as, resolved to ids."""

    #: The user id, set as real, effective and saved uid.
    uid: int
    #: The group id, set as real, effective and saved gid.
    gid: int
    #: The supplementary groups: the user's (from the group database), or none for a numeric
    #: user id that has no entry in the user database.
    groups: tuple[int, ...]
    #: How messages name it, ``user:group`` by name where the databases have one.
    name: str

    def is_current(self) -> bool:
        """True when this process already runs as this user and group."""
        return (
            os.getresuid() == (self.uid,) * 3
            and os.getresgid() == (self.gid,) * 3
            and set(os.getgroups()) <= {*self.groups, self.gid}
        )


def user_entry(value: str | int) -> tuple[int, pwd.struct_passwd | None]:
    """The uid that ``value`` names (a user name, or a numeric id as an integer or as digits)
    and its user database entry (None for a numeric id that has none). A name is looked up
    before digits are read as an id, as chown(1) does. Raises :class:`LookupError` with the
    reason."""
    if isinstance(value, int):
        if value < 0:
            raise LookupError(f"a user id is 0 or more, got {value}")
        try:
            return value, pwd.getpwuid(value)
        except KeyError:
            return value, None
    if not value:
        raise LookupError("a user name or id is needed")
    try:
        entry = pwd.getpwnam(value)
    except KeyError:
        if value.isascii() and value.isdigit():
            return user_entry(int(value))
        raise LookupError(f"no such user {value!r}") from None
    return entry.pw_uid, entry


def group_id(value: str | int) -> int:
    """The gid that ``value`` names (a group name, or a numeric id); a numeric id needs no
    entry in the group database. Raises :class:`LookupError` with the reason."""
    if isinstance(value, int):
        if value < 0:
            raise LookupError(f"a group id is 0 or more, got {value}")
        return value
    if not value:
        raise LookupError("a group name or id is needed")
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        if value.isascii() and value.isdigit():
            return int(value)
        raise LookupError(f"no such group {value!r}") from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def resolve(user: str | int | None, group: str | int | None) -> Identity | None:
    """The identity of ``server.user`` and ``server.group``; None when ``user`` is unset.
    Without ``group``, the user's primary group. Raises :class:`LookupError` with the reason
    when either does not exist, or when a numeric user id with no entry in the user database
    comes without a group."""
    if user is None:
        return None
    uid, entry = user_entry(user)
    if group is not None:
        gid = group_id(group)
    elif entry is not None:
        gid = entry.pw_gid
    else:
        raise LookupError(
            f"user id {uid} has no entry in the user database, so its group is "
            "not known: set server.group"
        )
    groups = tuple(os.getgrouplist(entry.pw_name, gid)) if entry is not None else ()
    name = f"{entry.pw_name if entry is not None else uid}:{_group_name(gid)}"
    return Identity(uid, gid, groups, name)


def current_name() -> str:
    """This process's effective ``user:group``, by name where the databases have one."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return f"{user}:{_group_name(os.getegid())}"


def for_workers(
    user: str | int | None, group: str | int | None
) -> tuple[Identity | None, str | None]:
    """What a worker of a process running as now does with ``server.user``/``server.group``:
    (the identity to switch to, or None for no switch; a warning for the log, or None).

    Root switches to any configured identity. Any other user cannot: a configured identity
    that is not its own is ignored, with a warning (nginx does the same); its own needs no
    switch. Raises :class:`LookupError` as :func:`resolve` does (a config that passed its
    checks does not)."""
    identity = resolve(user, group)
    if identity is None or identity.is_current():
        return None, None
    if os.geteuid() == 0:
        return identity, None
    if (identity.uid, identity.gid) == (os.geteuid(), os.getegid()):
        return None, None
    return None, (
        f"server.user is {identity.name}, but the master does not run as root: "
        f"ignored, the workers run as {current_name()}"
    )


def switch_to(identity: Identity) -> None:
    """Makes this process ``identity`` for good: supplementary groups, group, user (real,
    effective and saved), in that order. Raises :class:`PermissionError` (or another
    :class:`OSError`) when a step fails or root could be taken back afterwards: the caller
    must not go on serving then."""
    uid, gid = identity.uid, identity.gid
    os.setgroups(list(identity.groups))
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3:
        raise PermissionError(f"the switch to {identity.name} did not take")
    if uid != 0:
        try:
            os.setresuid(0, 0, 0)
        except PermissionError:
            return
        raise PermissionError(f"root could be taken back after switching to {identity.name}")

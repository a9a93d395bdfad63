"""The app API documents itself: every name ``shared`` exports, every public method, property
and attribute of those classes (their project base classes included), and every phase in
``shared.app.PHASES`` has a docstring of its own, which the API reference (``scripts/docs``)
is made from.

An attribute's docstring is a string literal right after its declaration in the class body,
as pdoc reads it (pdoc shows neither ``#:`` comments nor the docs of a ``__slots__`` dict). A
docstring inherited from a base class, or the signature a dataclass puts in place of a missing
one, does not count.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

import shared
from shared.app import PHASES, ProxyHttp


def own_doc(cls: type) -> str:
    """The docstring written on ``cls`` itself ("" when there is none)."""
    doc = cls.__dict__.get("__doc__") or ""
    if dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}("):
        return ""  # the signature dataclass() writes when the class has no docstring
    return doc.strip()


def attribute_docs(cls: type) -> dict[str, str]:
    """The docstrings of the attributes declared in ``cls``'s body: a string literal right
    after the declaration, as pdoc reads them."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            name = node.targets[0].id
        else:
            continue
        if (
            isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[name] = following.value.value.strip()
    return docs


def member_doc(owner: type, name: str) -> str:
    """The docstring of the public member ``name`` defined in ``owner``'s own body."""
    value = owner.__dict__.get(name)
    if isinstance(value, (staticmethod, classmethod)):
        return (value.__func__.__doc__ or "").strip()
    if isinstance(value, property):
        return ((value.fget.__doc__ if value.fget else None) or value.__doc__ or "").strip()
    if inspect.isfunction(value):
        return (value.__doc__ or "").strip()
    return attribute_docs(owner).get(name, "")


def public_members(cls: type, package: str = "shared") -> Iterator[tuple[type, str]]:
    """``(owner, name)`` for each public member of ``cls`` and of its bases defined in
    ``package``."""
    seen: set[str] = set()
    for owner in cls.__mro__:
        if owner.__module__.partition(".")[0] != package:
            continue
        names = [*owner.__dict__, *owner.__dict__.get("__annotations__", {})]
        for name in names:
            if name.startswith("_") or name in seen:
                continue
            if issubclass(cls, enum.Enum) and name in cls.__members__:
                continue  # enum members: the class docstring names them
            seen.add(name)
            yield owner, name


def missing_docs(cls: type, package: str = "shared") -> list[str]:
    """``Class.member`` for each public member of ``cls`` without a docstring of its own (and
    ``Class`` when the class has none)."""
    out = [] if own_doc(cls) else [cls.__name__]
    for owner, name in public_members(cls, package):
        if not member_doc(owner, name):
            out.append(f"{owner.__name__}.{name}")
    return out


EXPORTED = [getattr(shared, name) for name in shared.__all__]
CLASSES = [obj for obj in EXPORTED if inspect.isclass(obj)]


def test_every_export_is_a_documented_class() -> None:
    """``shared`` exports classes only, each with a docstring of its own."""
    assert CLASSES == EXPORTED
    assert [c.__name__ for c in CLASSES if not own_doc(c)] == []


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_public_member_is_documented(cls: type) -> None:
    assert missing_docs(cls) == []


def test_the_members_checked_include_attributes_and_inherited_methods() -> None:
    """The walk reaches slots, dataclass fields, annotated class attributes and methods of
    a project base class, so none of them escapes the check above."""
    import shared.headers

    def names(cls: type) -> set[str]:
        return {f"{owner.__name__}.{name}" for owner, name in public_members(cls)}

    assert {"Session.status", "Session.req_header", "Session.respond"} <= names(shared.Session)
    assert {"RequestHeader.path", "Headers.set"} <= names(shared.RequestHeader)
    assert {"HttpPeer.address", "HttpPeer.pool_key"} <= names(shared.HttpPeer)
    assert {"PeerOptions.read_timeout"} <= names(shared.PeerOptions)
    assert {"ProxyHttp.config", "ProxyHttp.worker_id"} <= names(shared.ProxyHttp)
    assert {"ProxyError.kind", "ProxyError.retryable"} <= names(shared.ProxyError)
    assert shared.headers.Headers in shared.RequestHeader.__mro__


class _Base:
    def inherited(self) -> None:
        """Documented here only."""


class _Undocumented(_Base):
    __slots__ = ("slot", "documented_slot", "commented_slot")

    slot: int
    documented_slot: int
    """A slot with its doc."""
    #: A comment, which pdoc does not show.
    commented_slot: int
    counter: int = 0
    """A documented attribute."""
    plain: int = 0

    def method(self) -> None:
        pass

    def inherited(self) -> None:
        pass

    @property
    def prop(self) -> int:
        return 0

    @classmethod
    def build(cls) -> _Undocumented:
        return cls()

    def documented(self) -> None:
        """Says what it does."""


@dataclasses.dataclass(slots=True)
class _UndocumentedData:
    documented: int = 0
    """A field with its doc."""
    field: int = 0


def test_the_check_finds_what_has_no_docstring() -> None:
    """A removed docstring is found: of a class, a method, a property, a classmethod, an
    override (a base's docstring does not count), a slot (a ``#:`` comment does not count), an
    attribute, a dataclass field."""
    here = __name__.partition(".")[0]
    assert sorted(missing_docs(_Undocumented, here)) == [
        "_Undocumented",
        "_Undocumented.build",
        "_Undocumented.commented_slot",
        "_Undocumented.inherited",
        "_Undocumented.method",
        "_Undocumented.plain",
        "_Undocumented.prop",
        "_Undocumented.slot",
    ]
    assert sorted(missing_docs(_UndocumentedData, here)) == [
        "_UndocumentedData",
        "_UndocumentedData.field",
    ]


def test_phases_are_methods_of_the_base_class() -> None:
    assert PHASES
    for name in PHASES:
        assert inspect.isfunction(ProxyHttp.__dict__.get(name)), name


@pytest.mark.parametrize("name", list(PHASES))
def test_phase_docstring_is_a_contract(name: str) -> None:
    """Each phase says whether it may be ``async def`` (as PHASES does, which the loader
    enforces) and what its default does."""
    doc = inspect.cleandoc(ProxyHttp.__dict__[name].__doc__ or "")
    assert doc, f"{name} has no docstring"
    flat = " ".join(doc.split())
    may_be_async = "May be ``async def``" in flat
    must_be_plain = "Must be a plain ``def``" in flat
    assert (may_be_async, must_be_plain) == (PHASES[name], not PHASES[name]), (
        f"{name}: PHASES says async is {'allowed' if PHASES[name] else 'refused'}; "
        f"the docstring must say so"
    )
    assert "Default:" in flat, f"{name} does not say what its default does"


@pytest.mark.parametrize("name", ["configure", "new_ctx"])
def test_other_overridable_methods_say_they_are_plain(name: str) -> None:
    doc = " ".join((ProxyHttp.__dict__[name].__doc__ or "").split())
    assert "Must be a plain ``def``" in doc and "Default:" in doc


def _modules() -> list[Any]:
    return sorted({inspect.getmodule(c) for c in CLASSES}, key=lambda m: m.__name__)


@pytest.mark.parametrize("module", _modules(), ids=lambda m: m.__name__)
def test_modules_of_the_api_are_documented(module: Any) -> None:
    assert (module.__doc__ or "").strip()
    assert (shared.__doc__ or "").strip()

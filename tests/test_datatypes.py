"""`@datatype` behaves as `@dataclass` does for every feature hal0 uses, and compiles nothing for a class."""

from __future__ import annotations

import builtins
import copy
import dataclasses
import pickle
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from hal0.datatypes import datatype

BASE = [dict(), dict(frozen=True), dict(slots=True), dict(frozen=True, slots=True)]
FLAVOURS = BASE + [{**b, "compiled_init": True} for b in BASE]
NAMES = ["plain", "frozen", "slots", "frozen-slots"]
IDS = NAMES + [f"{name}-compiled" for name in NAMES]


def stdlib(options: dict[str, bool]) -> Any:
    """The stdlib decorator for the same flavour (it has no `compiled_init`: its __init__ always is)."""
    return dataclass(**{k: v for k, v in options.items() if k != "compiled_init"})


def pair(options: dict[str, bool]) -> tuple[type[Any], type[Any]]:
    """The same class body made by the stdlib and by hal0."""

    def body() -> type[Any]:
        class Point:
            """A point."""

            x: int
            y: int = 0
            tags: tuple[str, ...] = field(default_factory=tuple)
            secret: str = field(default="", repr=False)
            note: str = field(default="", compare=False)
            seen: int = field(default=0, init=False)

        return Point

    return stdlib(options)(body()), datatype(**options)(body())


@pytest.mark.parametrize("options", FLAVOURS, ids=IDS)
def test_a_datatype_answers_as_the_same_dataclass_does(options: dict[str, bool]) -> None:
    std, ours = pair(options)
    for args, kwargs in [((1,), {}), ((1, 2), {}), ((), {"x": 1, "y": 2}), ((1,), {"tags": ("a",), "note": "n"}),
                         ((3,), {"secret": "k"})]:
        a, b = std(*args, **kwargs), ours(*args, **kwargs)
        assert repr(b).replace(ours.__qualname__, std.__qualname__) == repr(a)
        assert dataclasses.asdict(b) == dataclasses.asdict(a)
        assert b == ours(*args, **kwargs) and b != ours(99)
        assert (b == a) is False  # another class, as between two dataclasses
        assert dataclasses.replace(b, y=7).y == 7 and dataclasses.replace(b, y=7).x == b.x
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(std)]
    assert dataclasses.is_dataclass(ours) and ours.__match_args__ == std.__match_args__
    assert ours(1, note="a") == ours(1, note="b")  # compare=False
    assert ours(1).seen == 0  # init=False: its default, set by __init__
    assert hasattr(ours(1), "__dict__") is hasattr(std(1), "__dict__")
    if options.get("frozen"):
        assert hash(ours(1, 2)) == hash(ours(1, 2, note="other"))
        with pytest.raises(dataclasses.FrozenInstanceError):
            ours(1).x = 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            del ours(1).x
    else:
        assert ours.__hash__ is None  # eq without frozen: unhashable, as the stdlib makes it
        b = ours(1)
        b.x = 5
        assert b.x == 5


@pytest.mark.parametrize("options", FLAVOURS, ids=IDS)
def test_copy_and_pickle_keep_the_fields(options: dict[str, bool]) -> None:
    value = Pickled[IDS[FLAVOURS.index(options)]](1, ("a",))
    for again in (copy.copy(value), copy.deepcopy(value), pickle.loads(pickle.dumps(value))):
        assert again == value and again is not value


@pytest.mark.parametrize("options", FLAVOURS, ids=IDS)
def test_wrong_arguments_fail_as_a_constructor_call_does(options: dict[str, bool]) -> None:
    _, ours = pair(options)
    with pytest.raises(TypeError, match=r"missing 1 required (positional )?argument.*'x'"):
        ours()
    with pytest.raises(TypeError, match="multiple values for argument 'x'"):
        ours(1, x=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        ours(1, z=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'seen'"):  # init=False
        ours(1, seen=2)
    with pytest.raises(TypeError, match="positional arguments"):
        ours(1, 2, (), "", "", 6)


@pytest.mark.parametrize("compiled", [False, True], ids=["shared", "compiled"])
def test_post_init_runs_after_the_fields_are_set_also_on_a_frozen_one(compiled: bool) -> None:
    @datatype(frozen=True, slots=True, compiled_init=compiled)
    class Normalised:
        name: str

        def __post_init__(self) -> None:
            object.__setattr__(self, "name", self.name.lower())

    assert Normalised("PRIMARY").name == "primary"


def test_methods_written_in_the_class_are_kept() -> None:
    @datatype(frozen=True)
    class Named:
        name: str

        def __repr__(self) -> str:
            return f"<{self.name}>"

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Named) and other.name.lower() == self.name.lower()

        def __hash__(self) -> int:
            return hash(self.name.lower())

    assert repr(Named("a")) == "<a>" and Named("a") == Named("A") and len({Named("a"), Named("A")}) == 1


def test_what_it_lacks_is_refused_at_the_class_not_later() -> None:
    with pytest.raises(ValueError, match="mutable default"):  # the stdlib's own check still runs
        @datatype
        class Mutable:
            items: list[int] = []

    with pytest.raises(TypeError, match="InitVar or kw_only"):
        @datatype
        class Keywords:
            a: int = field(kw_only=True)

    with pytest.raises(TypeError, match="__setattr__"):
        @datatype(frozen=True)
        class Settable:
            a: int

            def __setattr__(self, name: str, value: object) -> None: ...


def test_a_default_factory_is_called_for_each_instance() -> None:
    @datatype(slots=True)
    class Bag:
        items: list[int] = field(default_factory=list)

    one, two = Bag(), Bag()
    one.items.append(1)
    assert two.items == [] and Bag([5]).items == [5]


def test_a_datatype_compiles_no_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """What it saves: the stdlib's `exec` of generated source for each method (~1.2 ms a frozen class on 3.11)."""
    compiled: list[str] = []

    def spy(source: str, *args: Any) -> None:
        compiled.append(source)
        builtins.exec(source, *args)

    # Every Python's dataclasses module compiles its methods through `exec` (3.11-3.12 in `_create_fn`, 3.13 in
    # `_FuncBuilder`, which execs an empty builder even when asked for no method): its own name for it is spied on.
    monkeypatch.setattr(dataclasses, "exec", spy, raising=False)
    dataclass(frozen=True)(type("Compiled", (), {"__annotations__": {"a": "int"}}))
    assert any("def __init__" in source for source in compiled)  # the stdlib's own path goes through it
    compiled.clear()
    ours = datatype(frozen=True, slots=True)(type("Shared", (), {"__annotations__": {"a": "int"}}))
    methods = [line.strip() for source in compiled for line in source.splitlines()
               if line.strip().startswith("def ") and "__create_fn__" not in line]
    assert methods == []
    assert ours(1) == ours(1) and repr(ours(2)) == "Shared(a=2)"


def _pickled(options: dict[str, bool]) -> type[Any]:
    @datatype(**options)
    class Stored:
        n: int
        tags: tuple[str, ...] = ()

    Stored.__qualname__ = Stored.__name__ = f"Stored_{IDS[FLAVOURS.index(options)].replace('-', '_')}"
    globals()[Stored.__name__] = Stored  # pickle finds a class by its module and name
    return Stored


Pickled = {name: _pickled(options) for name, options in zip(IDS, FLAVOURS, strict=True)}


@pytest.mark.parametrize("options", FLAVOURS, ids=IDS)
def test_an_init_false_field_without_a_default_is_left_for_post_init(options: dict[str, bool]) -> None:
    def body() -> type[Any]:
        class Later:
            name: str
            key: str = field(init=False)

        return Later

    std, ours = stdlib(options)(body()), datatype(**options)(body())
    for made in (std("a"), ours("a")):
        assert not hasattr(made, "key")  # unset, as the stdlib leaves it, not dataclasses.MISSING


def test_a_compiled_init_has_the_stdlib_signature_and_takes_any_field_name() -> None:
    """What a class built on every request gets: its own `__init__`, with the signature the stdlib writes."""
    import inspect

    def body() -> type[Any]:
        class Odd:
            self: int  # a field may be called what the generated code calls its own names
            put: str = "p"
            items: list[int] = field(default_factory=list)

        return Odd

    std = dataclass(frozen=True, slots=True)(body())
    ours = datatype(frozen=True, slots=True, compiled_init=True)(body())
    assert list(inspect.signature(ours).parameters) == list(inspect.signature(std).parameters)
    assert ours(1) == ours(self=1, put="p", items=[]) and ours(1).items is not ours(1).items
    assert repr(ours(2, "q")).replace("Odd", "") == repr(std(2, "q")).replace("Odd", "")
    for compiled in (False, True):
        with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):
            @datatype(compiled_init=compiled)
            class Misordered:
                a: int = 0
                b: int  # type: ignore[misc]


FIELD_ATTRS = ("name", "type", "default", "default_factory", "init", "repr", "hash", "compare", "metadata", "kw_only",
               "_field_type")


@pytest.mark.parametrize("own", [True, False], ids=["own-fields", "stdlib-fields"])
def test_the_fields_are_the_ones_the_stdlib_sets(own: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`@datatype` sets `__dataclass_fields__` itself where the stdlib's markers exist (`_own_fields`), and leaves it
    to `@dataclass` where they do not: both leave what the stdlib would, down to the class attributes."""
    import hal0.datatypes

    monkeypatch.setattr(hal0.datatypes, "_INTERNALS", own)

    def made(decorate: Any) -> type[Any]:
        @decorate
        class Base:
            """A base."""

            a: int
            shared: str = "base"

        @decorate
        class Point(Base):
            """A point."""

            x: int = 0
            shared: str = "point"  # a field declared again keeps its place and takes the new default
            tags: tuple[str, ...] = field(default_factory=tuple)
            secret: str = field(default="", repr=False, metadata={"why": "hidden"})
            seen: int = field(default=0, init=False)
            counter: ClassVar[int] = 3

        return Point

    std, ours = made(dataclass), made(datatype)
    assert list(ours.__dataclass_fields__) == list(std.__dataclass_fields__)
    for name, theirs in std.__dataclass_fields__.items():
        mine = ours.__dataclass_fields__[name]
        assert [getattr(mine, a) for a in FIELD_ATTRS] == [getattr(theirs, a) for a in FIELD_ATTRS], name
    for name in ("x", "shared", "tags", "secret", "seen", "counter"):
        assert getattr(ours, name, None) == getattr(std, name, None), name  # defaults on the class, no Field left
    assert ours.__match_args__ == std.__match_args__
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(std)]
    assert dataclasses.replace(ours(1, "s"), x=5) == ours(1, "s", 5)
    with pytest.raises(TypeError, match="no type annotation"):
        datatype(type("Loose", (), {"__annotations__": {}, "x": field(default=1)}))

"""`@datatype`: a dataclass whose methods are shared closures, not code compiled for each class.

On Python 3.11 `@dataclass(frozen=True, slots=True)` compiles six small functions per class (`exec`) and builds the
class twice: ~1.2 ms and ~15 KB a class, 35-42 ms and ~0.45 MB of an API start over the 32 dataclasses it imported
(the largest single item of a restart: docs/performance.md, eleventh round). A datatype is still a dataclass to
everything that asks (`dataclasses.fields`, `replace`, `asdict`, `is_dataclass`, `field(...)`, mypy through
`dataclass_transform`): its fields are set as the stdlib sets them (`_own_fields`); `__init__`, `__repr__`,
`__eq__`, and when frozen `__hash__` and a refusing `__setattr__`, are closures over them. The price is a slower
`__init__` (~1.9 against ~0.6 us for three fields), so a class built on every request (a decision, a resolution, an
event) asks for `compiled_init=True`: its `__init__` alone is compiled, as fast as the stdlib's, for ~0.15 ms at
import against ~1.2 ms for the whole dataclass. Supported: defaults, `default_factory`, `field(repr=False,
compare=False, init=False)`, `__post_init__`, `frozen`, `slots`; not `InitVar`, `kw_only` or `order`.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import operator
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform, overload

T = TypeVar("T")

_MISSING = dataclasses.MISSING


@overload
def datatype(cls: type[T], /) -> type[T]: ...
@overload
def datatype(*, frozen: bool = False, slots: bool = False,
             compiled_init: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(field_specifiers=(dataclasses.field, dataclasses.Field))
def datatype(cls: type[T] | None = None, /, *, frozen: bool = False, slots: bool = False,
             compiled_init: bool = False) -> type[T] | Callable[[type[T]], type[T]]:
    """Make `cls` a dataclass with `__init__`, `__repr__`, `__eq__` and, when `frozen`, `__hash__` and an
    immutable `__setattr__`; `slots` gives it `__slots__` (no `__dict__`), as `@dataclass(slots=True)` does;
    `compiled_init` compiles its `__init__` for a class built on every request."""

    def wrap(cls: type[T]) -> type[T]:
        return _build(cls, frozen=frozen, slots=slots, compiled_init=compiled_init)

    return wrap if cls is None else wrap(cls)


def _build(cls: type[T], *, frozen: bool, slots: bool, compiled_init: bool = False) -> type[T]:
    own = cls.__dict__
    for name in ("__setattr__", "__delattr__"):
        if frozen and name in own:
            raise TypeError(f"cannot overwrite attribute {name} in frozen datatype {cls.__name__}")
    documented = bool(cls.__doc__)
    fields = _own_fields(cls) if _INTERNALS else _stdlib_fields(cls)
    if slots:
        cls = _with_slots(cls, tuple(f.name for f in fields))
    names = tuple(f.name for f in fields if f.init)
    # init=False fields with a default or factory are set by __init__; one with neither is left unset (for
    # __post_init__ to set), as the stdlib leaves it.
    always = tuple(f for f in fields if not f.init and (f.default is not _MISSING or f.default_factory is not _MISSING))
    defaults = {f.name: f.default for f in fields if f.init and f.default is not _MISSING}
    factories = {f.name: f.default_factory for f in fields if f.init and f.default_factory is not _MISSING}
    after_default = False  # the stdlib checks this in the __init__ it writes: in its words, for both kinds here
    for name in names:
        if name in defaults or name in factories:
            after_default = True
        elif after_default:
            raise TypeError(f"non-default argument {name!r} follows default argument")
    own = cls.__dict__
    if "__init__" not in own:
        if compiled_init:  # a frozen one sets its fields past its own __setattr__, as the stdlib's does
            _set(cls, "__init__", _compiled_init(cls, names, defaults, factories, always, frozen))
        else:
            _set(cls, "__init__", _init(cls, names, defaults, factories, always, slots))
    if "__repr__" not in own:
        _set(cls, "__repr__", _repr(tuple(f.name for f in fields if f.repr)))
    compared = tuple(f.name for f in fields if f.compare)
    values = _getter(compared)
    if "__eq__" not in own:
        _set(cls, "__eq__", _eq(values))
    explicit_hash = "__hash__" in own and not (own["__hash__"] is None and "__eq__" in own)
    if not explicit_hash:
        hashed = _getter(tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash)))
        if frozen:
            _set(cls, "__hash__", lambda self: hash(hashed(self)))
        else:
            cls.__hash__ = None  # type: ignore[assignment]  # eq without frozen: unhashable, as @dataclass
    if frozen:
        _frozen(cls, frozenset(f.name for f in fields), slots)
    if not documented:
        cls.__doc__ = f"{cls.__name__}({', '.join(names)})"
    return cls


#: What the stdlib marks a dataclass and its fields with. Where a Python lacks any of them, the stdlib's own
#: decorator does the field work (`_stdlib_fields`).
_INTERNALS = all(hasattr(dataclasses, name) for name in ("_FIELDS", "_PARAMS", "_FIELD", "_FIELD_CLASSVAR"))
#: The `__dataclass_params__` of `@dataclass(init=False, repr=False, eq=False)`: the stdlib compiles nothing for it.
_PARAMS: Any = dataclasses.dataclass(type("Params", (), {"__doc__": "-"}), init=False, repr=False,
                                     eq=False).__dataclass_params__  # type: ignore[attr-defined]


def _own_fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    """Set `cls`'s fields as `@dataclass(init=False, repr=False, eq=False)` sets them, and return those
    `dataclasses.fields` returns. The same work as the stdlib's for what hal0 writes (annotations as strings, no
    `InitVar` or `kw_only`), without matching each annotation against a regular expression and resolving its
    module: ~3 ms less of an API start over its 32 datatypes on 3.11 (docs/performance.md, twentieth round)."""
    every: dict[str, dataclasses.Field[Any]] = {}
    for base in cls.__mro__[-1:0:-1]:  # inherited fields first, the nearest base's last, as the stdlib orders them
        every.update(getattr(base, "__dataclass_fields__", None) or {})
    annotations = inspect.get_annotations(cls)  # its own, not its bases': strings, as hal0's modules write them
    for name, kind in annotations.items():
        default: Any = getattr(cls, name, _MISSING)
        given = isinstance(default, dataclasses.Field)  # `x: int = field(...)`: its default goes on the class
        if given:
            f = default
        else:
            if isinstance(default, types.MemberDescriptorType):  # a slot of a base, not a default
                default = _MISSING
            f = dataclasses.field(default=default)
        f.name, f.type = name, kind
        if _annotated(kind, _REFUSED, _REFUSED_OBJECTS) or isinstance(kind, dataclasses.InitVar) or f.kw_only is True:
            raise TypeError(f"datatype {cls.__name__}: field {name!r} is InitVar or kw_only, which @datatype lacks")
        if _annotated(kind, _CLASSVAR, (typing.ClassVar,)):
            f._field_type = dataclasses._FIELD_CLASSVAR  # type: ignore[attr-defined]
            if f.default_factory is not _MISSING:
                raise TypeError(f"field {name} cannot have a default factory")
        else:
            f._field_type = dataclasses._FIELD  # type: ignore[attr-defined]
            f.kw_only = False
            if f.default.__class__.__hash__ is None:  # the stdlib's own test of a mutable default
                raise ValueError(f"mutable default {type(f.default)} for field {name} is not allowed: use "
                                 "default_factory")
        every[name] = f
        if given:
            if f.default is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
    for name, value in cls.__dict__.items():
        if isinstance(value, dataclasses.Field) and name not in annotations:
            raise TypeError(f"{name!r} is a field but has no type annotation")
    cls.__dataclass_fields__ = every  # type: ignore[attr-defined]
    cls.__dataclass_params__ = _PARAMS  # type: ignore[attr-defined]
    fields = tuple(f for f in every.values() if f._field_type is dataclasses._FIELD)  # type: ignore[attr-defined]
    if "__match_args__" not in cls.__dict__:
        cls.__match_args__ = tuple(f.name for f in fields if f.init)  # type: ignore[attr-defined,misc]
    abc.update_abstractmethods(cls)
    return fields


_CLASSVAR = frozenset({"ClassVar", "typing.ClassVar"})
_REFUSED = frozenset({"InitVar", "dataclasses.InitVar", "KW_ONLY", "dataclasses.KW_ONLY"})
_REFUSED_OBJECTS = (dataclasses.InitVar, dataclasses.KW_ONLY)


def _annotated(kind: Any, names: frozenset[str], objects: tuple[Any, ...]) -> bool:
    """Whether an annotation is one of `objects` (or subscripts one): `names` are how a string spells them."""
    if isinstance(kind, str):
        return kind.partition("[")[0].strip() in names
    return kind in objects or getattr(kind, "__origin__", None) in objects


def _stdlib_fields(cls: type) -> tuple[dataclasses.Field[Any], ...]:
    """The field work done by the stdlib itself: `@dataclass` asked for no method compiles none (3.13 still
    execs its empty builder, ~0.05 ms)."""
    if not cls.__doc__:  # else the stdlib makes one from inspect.signature, ~0.1 ms, and of the wrong __init__
        cls.__doc__ = cls.__name__
    dataclasses.dataclass(cls, init=False, repr=False, eq=False)
    for f in cls.__dataclass_fields__.values():  # type: ignore[attr-defined]
        if f.kw_only is True or f._field_type is getattr(dataclasses, "_FIELD_INITVAR", None):
            raise TypeError(f"datatype {cls.__name__}: field {f.name!r} is InitVar or kw_only, which @datatype lacks")
    return dataclasses.fields(cls)


def _set(cls: type, name: str, fn: Callable[..., Any]) -> None:
    fn.__name__ = name
    fn.__qualname__ = f"{cls.__qualname__}.{name}"
    setattr(cls, name, fn)


def _with_slots(cls: type[T], names: tuple[str, ...]) -> type[T]:
    """The class again with `__slots__` for its fields (a class can't gain slots once made): what
    `@dataclass(slots=True)` does. Defaults live in `__init__` then, not on the class."""
    inherited = {s for base in cls.__mro__[1:-1] for s in _slots_of(base)}
    body = dict(cls.__dict__)
    body["__slots__"] = tuple(n for n in names if n not in inherited)
    for name in (*names, "__dict__", "__weakref__"):
        body.pop(name, None)
    meta: Any = type(cls)  # a class under a metaclass (Generic, ABCMeta) keeps it
    made: type[T] = meta(cls.__name__, cls.__bases__, body)
    made.__qualname__ = cls.__qualname__
    return made


def _slots_of(cls: type) -> tuple[str, ...]:
    slots = cls.__dict__.get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


def _getter(names: tuple[str, ...]) -> Callable[[Any], Any]:
    """The compared fields of an instance, read in C: one value for one field, a tuple for more."""
    if not names:
        return lambda self: ()
    return operator.attrgetter(*names)


def _init(cls: type, names: tuple[str, ...], defaults: dict[str, Any], factories: dict[str, Callable[[], Any]],
          always: tuple[dataclasses.Field[Any], ...], slots: bool) -> Callable[..., None]:
    count = len(names)
    known = frozenset(names)
    post_init = hasattr(cls, "__post_init__")
    put = object.__setattr__
    qualname = f"{cls.__qualname__}.__init__"

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if args:
            if len(args) > count:
                raise TypeError(f"{qualname}() takes {count + 1} positional arguments but {len(args) + 1} were given")
            given = dict(zip(names, args, strict=False))
            if kwargs:
                twice = kwargs.keys() & given.keys()
                if twice:
                    raise TypeError(f"{qualname}() got multiple values for argument {min(twice)!r}")
                given.update(kwargs)
        else:
            given = kwargs
        if len(given) != count or not known.issuperset(given):
            unknown = given.keys() - known
            if unknown:
                raise TypeError(f"{qualname}() got an unexpected keyword argument {min(unknown)!r}")
            missing = []
            for name in names:
                if name in given:
                    continue
                if name in defaults:
                    given[name] = defaults[name]
                elif name in factories:
                    given[name] = factories[name]()
                else:
                    missing.append(name)
            if missing:
                raise TypeError(f"{qualname}() missing {len(missing)} required argument(s): "
                                + ", ".join(repr(n) for n in missing))
        for f in always:
            given[f.name] = f.default_factory() if f.default_factory is not _MISSING else f.default
        if slots:
            for name, value in given.items():
                put(self, name, value)
        else:
            self.__dict__.update(given)
        if post_init:
            self.__post_init__()

    return __init__


_FACTORY = object()  # the default of a compiled __init__'s argument that has a default_factory


def _compiled_init(cls: type, names: tuple[str, ...], defaults: dict[str, Any],
                   factories: dict[str, Callable[[], Any]], always: tuple[dataclasses.Field[Any], ...],
                   put_directly: bool) -> Callable[..., None]:
    """`__init__` written out and compiled once, as the stdlib does it, for a class built on every request.
    Names the generated code needs live under `__datatype_*` globals, which no field can shadow."""
    env: dict[str, Any] = {"__datatype_put": object.__setattr__, "__datatype_factory": _FACTORY}
    params, body = ["__datatype_self"], []  # not `self`, which a field may be called

    def assign(name: str, value: str) -> None:
        body.append(f"__datatype_put(__datatype_self, {name!r}, {value})" if put_directly
                    else f"__datatype_self.{name} = {value}")

    for name in names:
        if name in factories:
            env[f"__datatype_f_{name}"] = factories[name]
            params.append(f"{name}=__datatype_factory")
            assign(name, f"__datatype_f_{name}() if {name} is __datatype_factory else {name}")
        elif name in defaults:
            env[f"__datatype_d_{name}"] = defaults[name]
            params.append(f"{name}=__datatype_d_{name}")
            assign(name, name)
        else:
            params.append(name)
            assign(name, name)
    for f in always:
        if f.default_factory is not _MISSING:
            env[f"__datatype_f_{f.name}"] = f.default_factory
            assign(f.name, f"__datatype_f_{f.name}()")
        else:
            env[f"__datatype_d_{f.name}"] = f.default
            assign(f.name, f"__datatype_d_{f.name}")
    if hasattr(cls, "__post_init__"):
        body.append("__datatype_self.__post_init__()")
    source = f"def __init__({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in body or ["pass"])
    exec(compile(source, f"<datatype {cls.__qualname__}>", "exec"), env)  # our own source, as the stdlib's
    init: Callable[..., None] = env["__init__"]
    return init


def _repr(names: tuple[str, ...]) -> Callable[[Any], str]:
    def __repr__(self: Any) -> str:
        inner = ", ".join([f"{n}={getattr(self, n)!r}" for n in names])
        return f"{type(self).__qualname__}({inner})"

    return __repr__


def _eq(values: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    def __eq__(self: Any, other: Any) -> Any:
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    return __eq__


def _frozen(cls: type, names: frozenset[str], slots: bool) -> None:
    put = object.__setattr__

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")
        put(self, name, value)

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
        object.__delattr__(self, name)

    _set(cls, "__setattr__", __setattr__)
    _set(cls, "__delattr__", __delattr__)
    if slots:  # pickle and copy set a slots object's state with setattr, which a frozen one refuses
        def __getstate__(self: Any) -> list[Any]:
            return [getattr(self, n) for n in fields_order]

        def __setstate__(self: Any, state: list[Any]) -> None:
            for n, v in zip(fields_order, state, strict=True):
                put(self, n, v)

        fields_order = tuple(f.name for f in dataclasses.fields(cls))
        _set(cls, "__getstate__", __getstate__)
        _set(cls, "__setstate__", __setstate__)

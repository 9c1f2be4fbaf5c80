"""The command line's flags, derived from the options' declarations (options/): each field of
an options dataclass becomes a typer option with the type, default and help declared there, and
each command receives its options built and checked (`with_options`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer

from .errors import warn
from .options.fields import help_of, nests, sigma_warning


class Argument(typer.core.TyperArgument):
    """A positional argument shown as IMAGE... in usage and help, where typer 0.29 writes
    {images}... and IMAGE... <list[Path]>."""

    def _usage_display_name(self) -> str:
        return self.display_name_raw + ("..." if self.nargs != 1 else "")

    def _rich_display_name(self) -> str:
        return self._usage_display_name()

    def display_type(self, ctx: Any) -> str:
        return ""


class Command(typer.core.TyperCommand):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        for param in self.params:
            if type(param) is typer.core.TyperArgument:
                param.__class__ = Argument


def flag(cls: type, name: str, *declarations: str) -> Any:
    """The typer option of field `name` of `cls`, with the help declared there."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    declared = declarations or field.metadata["flags"]
    if not declared and field.type == "bool":  # a switch: --grayscale, never --no-grayscale
        declared = ("--" + name.replace("_", "-"),)
    return typer.Option(*declared, help=help_of(cls, name))


def with_options(
    cls: type, into: str, exclude: tuple[str, ...] = ()
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command every CLI field of the dataclass `cls` (and of the dataclasses inside
    it: SmoothingOptions.wire) as an option, less `exclude` (left at their defaults); the
    command receives them built and checked, as `into=cls(…)`. In --help they come after the
    required ones and before the command's own, the nested ones (the wire) last."""
    params, tail, build = _parameters(cls, exclude)

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != into]
        clash = {p.name for p in own} & {p.name for p in [*params, *tail]}
        assert not clash, f"{command.__name__}: {clash} declared twice"
        required = [p for p in own if p.default is inspect.Parameter.empty]
        rest = [p for p in own if p.default is not inspect.Parameter.empty]
        ordered = [*required, *params, *rest, *tail]

        @functools.wraps(command)
        def wrapper(*args: Any, **kw: Any) -> None:
            built = build(kw)
            warning = sigma_warning(getattr(built, "sigma", 0.0))
            if warning:
                warn(warning)
            command(*args, **{into: built}, **kw)

        annotations = {k: v for k, v in command.__annotations__.items() if k != into}
        added = {p.name: p.annotation for p in [*params, *tail]}
        wrapper.__annotations__ = {**annotations, **added}
        # typer reads options by name; keyword-only keeps Python's order rules out of the way
        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in ordered]
        )
        return wrapper

    return decorate


def _parameters(
    cls: type, exclude: tuple[str, ...]
) -> tuple[list[inspect.Parameter], list[inspect.Parameter], Callable[[dict[str, Any]], Any]]:
    """The command-line parameters of `cls`'s own fields and of its nested dataclasses', and
    how to build `cls` from them (taking them out of a command's keyword arguments)."""
    hints = typing.get_type_hints(cls)
    params: list[inspect.Parameter] = []
    tail: list[inspect.Parameter] = []
    own: list[str] = []  # the fields of cls itself
    nested: dict[str, Callable[[dict[str, Any]], Any]] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if nests(f, hints[f.name]):
            inner, inner_tail, nested[f.name] = _parameters(hints[f.name], ())
            tail += [*inner, *inner_tail]
        elif f.metadata.get("cli", True):
            own.append(f.name)
            params.append(
                inspect.Parameter(
                    f.name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=inspect.Parameter.empty if f.metadata["required"] else f.default,
                    annotation=Annotated[
                        f.metadata.get("parsed_from", hints[f.name]), flag(cls, f.name)
                    ],
                )
            )

    def build(kw: dict[str, Any]) -> Any:
        parts = {name: make(kw) for name, make in nested.items()}
        return cls(**parts, **{name: kw.pop(name) for name in own})

    return params, tail, build

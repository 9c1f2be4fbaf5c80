"""How an option is declared (`option`: its help, its flags, whether the CLI shows it), read
(`help_of`, `default_of`, `cli_fields`), spelled back as flags (`command_flags`), and the checks
the option classes share."""

from __future__ import annotations

import math
from dataclasses import MISSING, field, fields, is_dataclass
from enum import StrEnum
from typing import Any

from ..errors import UsageError


def option(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    required: bool = False,
    cli: bool = True,
    parsed_from: type | None = None,
) -> Any:
    """A dataclass field with the help text its flag shows (`flags`: when not --field-name;
    `required`: the CLI asks for it; `cli=False`: for library callers only; `parsed_from`: the
    type the command line gives, which the dataclass parses into its own)."""
    metadata = {"help": help, "flags": flags, "required": required, "cli": cli}
    if parsed_from is not None:
        metadata["parsed_from"] = parsed_from
    return field(default=default, metadata=metadata)


def nests(f: Any, kind: Any) -> bool:
    """Whether field `f` (of type or value `kind`) is a group of options of its own (the
    wire inside SmoothingOptions), not one value: a value the CLI gives as text and the
    dataclass parses (`parsed_from`, the Endpoint) is one value."""
    return is_dataclass(kind) and "parsed_from" not in f.metadata


def command_flags(options: Any, exclude: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild `options` (a dataclass of options, with those inside it) from
    their defaults: what a hint prints as the next command to type."""
    out: list[str] = []
    implied = getattr(options, "implied", lambda: ())()  # what another flag fills (--preset)
    for f in cli_fields(type(options)):
        value = getattr(options, f.name)
        if f.name in exclude or f.name in implied:
            continue
        if nests(f, value):
            out += command_flags(value, exclude)
            continue
        if value == f.default or value is None:
            continue
        spelled = f.metadata["flags"][0] if f.metadata["flags"] else f"--{f.name}"
        on, _, off = spelled.replace("_", "-").partition("/")
        if isinstance(value, bool):
            out.append(on if value else off or f"--no-{on.removeprefix('--')}")
        else:
            text = value.value if isinstance(value, StrEnum) else str(value)
            out += [on, text]
    return out


def help_of(cls: type, name: str) -> str:
    return str(_field(cls, name).metadata["help"])


def default_of(cls: type, name: str) -> Any:
    f = _field(cls, name)
    return f.default if f.default is not MISSING else MISSING


def cli_fields(cls: type) -> list[Any]:
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def _field(cls: type, name: str) -> Any:
    return next(f for f in fields(cls) if f.name == name)


def enum_of(kind: type[StrEnum], value: Any, flag: str) -> Any:
    if value is None or isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        raise UsageError(
            f"{flag} {value!r} is unknown: use {', '.join(k.value for k in kind)}"
        ) from None


def channel_values(flag: str, text: str | None) -> tuple[float, ...] | None:
    """'0.485,0.456,0.406' → (0.485, 0.456, 0.406): one value per channel, or one for all."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(
            f"{flag} {text!r} is not a list of numbers: give one per channel, comma-separated "
            "(0.485,0.456,0.406)"
        ) from None
    if not all(math.isfinite(v) for v in values) or len(values) > 4:
        raise UsageError(f"{flag} {text!r}: give 1 to 4 finite numbers, one per channel")
    return values


def at_least(flag: str, value: float | None, low: float) -> None:
    if value is not None and not value >= low:
        raise UsageError(f"{flag} must be >= {low}, got {value}")


def positive(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be > 0, got {value}")


def sigma_warning(sigma: float) -> str | None:
    """σ above 1 on the [0,1] pixel scale drowns any image (a guess of 25 on the 0–255 scale
    is 25 times the image's whole range): legal, but almost surely not what was meant."""
    if sigma <= 1:
        return None
    return (
        f"--sigma {sigma:g} is on the [0,1] pixel scale, where noise above 1 drowns the image; "
        f"for {sigma:g} on the 0–255 scale give --sigma {sigma / 255:.4g}"
    )

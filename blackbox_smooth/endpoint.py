"""An endpoint as the user names it (`--endpoint`), parsed once where the option is read: what
kind of black box it is and where it lies. Every scheme prefix is spelled here and nowhere
else; `adapters.OPENERS` maps each kind to the adapter that opens it.

Light on purpose (no torch, no numpy): the options are built, and a typo refused, before any
model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum

from .errors import UsageError
from .redaction import redact_url


class Kind(StrEnum):
    python = "python"  # a Python function on [0,1] float32 arrays
    torch_function = "torch-function"  # a .py function returning a torch.nn.Module
    torchscript = "torchscript"
    onnx = "onnx"
    http = "http"  # any protocol over HTTP(S): adapters pick it from --protocol or the URL


@dataclass(frozen=True)
class Scheme:
    """One row of the table: the prefixes that name a kind, how it is written, and what its
    local file is called in messages (None: not a file)."""

    prefixes: tuple[str, ...]
    forms: str
    file: str | None


SCHEMES: dict[Kind, Scheme] = {
    Kind.python: Scheme(("python:",), "python:FILE.py:FUNC, python:package.module:FUNC",
                        "python endpoint file"),
    Kind.torch_function: Scheme(("torch:",), "torch:FILE.py:FUNC", "python endpoint file"),
    Kind.torchscript: Scheme(("torch:",), "torch:FILE.pt", "TorchScript file"),
    Kind.onnx: Scheme(("onnx:",), "onnx:FILE.onnx", "ONNX file"),
    Kind.http: Scheme(("http://", "https://"), "an http(s):// URL (Open Inference Protocol "
                      "…/v2/models/NAME/infer, TorchServe …/predictions/NAME, Hugging Face, "
                      "Cloud Vision, or any API with --protocol)", None),
}  # fmt: skip
HTTP_PREFIXES = SCHEMES[Kind.http].prefixes
FORMS = ", ".join(dict.fromkeys(s.forms for s in SCHEMES.values()))  # for messages and --help
LOCAL = (Kind.python, Kind.torch_function, Kind.torchscript)  # what `bbsmooth serve` can serve


def _kind(text: str) -> tuple[Kind, str] | None:
    for kind, scheme in SCHEMES.items():
        prefix = next((p for p in scheme.prefixes if text.startswith(p)), None)
        if prefix is None:
            continue
        if kind == Kind.http:
            return kind, text  # a URL is its own target
        target = text.removeprefix(prefix)
        if kind == Kind.torch_function and ".py:" not in target:
            continue  # a TorchScript file: the next row
        return kind, target
    return None


@dataclass(frozen=True)
class Endpoint:
    """`text` as given; `kind`; `target`: the text after the prefix (a URL whole)."""

    text: str
    kind: Kind
    target: str

    @classmethod
    def parse(cls, text: str | Endpoint) -> Endpoint:
        """The endpoint `text` names; a scheme bbsmooth does not know is one line (a query
        string, which may carry a key, is left out of it)."""
        if isinstance(text, Endpoint):
            return text
        found = _kind(text)
        if found is None:
            shown = text.split("?")[0][:200]
            raise UsageError(f"unknown endpoint {shown!r}: use one of {FORMS}")
        return cls(text, *found)

    def __str__(self) -> str:
        return self.text

    @property
    def remote(self) -> bool:
        """Behind an address (whose model may change while its cached answers stay), not a
        file known by its content."""
        return self.kind == Kind.http

    @property
    def file(self) -> str | None:
        """The local file the endpoint loads; None for a URL or a python:package.module."""
        if self.kind == Kind.http:
            return None
        if self.kind in (Kind.python, Kind.torch_function):
            path, _, _ = self.target.rpartition(":")
            return path if path.endswith(".py") else None
        return self.target

    def check_file(self) -> None:
        """A local model's file is there: told when the options are built, before torch or a
        model loads (a typo costs no seconds)."""
        what = SCHEMES[self.kind].file
        if self.file is not None and not os.path.lexists(self.file):
            raise UsageError(f"{what} not found: {self.file}")

    @property
    def shown(self) -> str:
        """As a report or a log may show it: a URL without credentials or query string."""
        return redact_url(self.text) if self.remote else self.text

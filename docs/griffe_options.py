"""A griffe extension for the API reference: an options field declared as
`name: T = option(default, "help", …)` is documented by its help, the same text its flag shows,
and shown with its default. One declaration serves the CLI, its reference and the API pages."""

from __future__ import annotations

import ast
from typing import Any

import griffe


class OptionHelp(griffe.Extension):
    def on_attribute_instance(self, *, node: Any, attr: griffe.Attribute, **kwargs: Any) -> None:
        call = getattr(node, "value", None)
        if not (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id == "option"
            and len(call.args) >= 2
            and isinstance(call.args[1], ast.Constant)
            and isinstance(call.args[1].value, str)
        ):
            return
        if attr.docstring is None:
            attr.docstring = griffe.Docstring(call.args[1].value, parent=attr)
        attr.value = ast.unparse(call.args[0])

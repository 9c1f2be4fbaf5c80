"""Any vendor, from a small JSON config instead of code (`--protocol-config FILE`):

    {"body": "file" | "json",                   file: the encoded image is the request body
     "request": {"image": "{image_base64}"},    json: this template, the placeholder filled
     "headers": {"x-version": "2"},             sent as they are (no secrets here)
     "auth": "bearer" | "key" | "header:NAME" | "query:NAME" | "none",
     "labels": "tagsResult.values[*].name",     where the labels are in the answer
     "scores": "tagsResult.values[*].confidence",  and their scores (optional: rank order)
     "max_image_bytes": 20000000,
     "status": "status.code", "ok": [10000], "retry": [11005],   for APIs that answer
     "message": "status.description"}                            errors in the body

Paths are dotted keys, with `[N]` for one list item and `[*]` for all of them. One image per
request. The config's content is part of the black box's fingerprint.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EndpointError, ProtocolError, UsageError
from .base import file_digest
from .labels import Pairs
from .vendor import LabelledAPI, label_of, score_of

PLACEHOLDER = "{image_base64}"
_STEP = re.compile(r"([^.\[\]]+)?((?:\[(?:\d+|\*)\])*)")


@dataclass(frozen=True)
class VendorConfig:
    labels: str
    scores: str | None = None
    body: str = "file"
    request: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    auth: str = "bearer"
    content_type: str | None = None
    max_image_bytes: int | None = None
    status: str | None = None  # where an answer carries its own status code
    ok: list[Any] = field(default_factory=list)  # status values that mean success
    retry: list[Any] = field(default_factory=list)  # status values worth asking again
    message: str | None = None  # where the error text is
    name: str = "generic"
    documentation: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VendorConfig:
        path = os.fspath(path)
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"--protocol-config {path} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"--protocol-config {path} is not a readable JSON file ({e})") from e
        if not isinstance(data, dict):
            raise UsageError(f"--protocol-config {path} must hold a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(
                f"--protocol-config {path}: unknown keys {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        try:
            config = cls(**data)
        except TypeError as e:
            raise UsageError(f"--protocol-config {path} needs a 'labels' path ({e})") from e
        config.check(path)
        return config

    def check(self, path: str) -> None:
        if self.body not in ("file", "json"):
            raise UsageError(f"--protocol-config {path}: body must be 'file' or 'json'")
        if self.body == "json" and PLACEHOLDER not in json.dumps(self.request):
            raise UsageError(
                f"--protocol-config {path}: the 'request' template needs the {PLACEHOLDER} "
                "placeholder where the image goes"
            )
        if self.status is not None and not self.ok:
            raise UsageError(f"--protocol-config {path}: 'status' needs the 'ok' values")
        for p in (self.labels, self.scores, self.status, self.message):
            if p is not None:
                steps(p, path)
        if any(k.lower() in ("authorization", "x-api-key") for k in self.headers):
            raise UsageError(
                f"--protocol-config {path}: put no credentials in 'headers': set 'auth' and "
                "pass the key in an environment variable (--api-key-env)"
            )


class Generic(LabelledAPI):
    protocol = "generic"

    def __init__(self, url: str, transport: Any, config: VendorConfig, config_path: str,
                 **kw: Any) -> None:  # fmt: skip
        self.config = config
        self.max_image_bytes = config.max_image_bytes
        super().__init__(url, transport, vendor=config.name, config=file_digest(config_path), **kw)

    async def ask_one(self, data: bytes) -> Pairs:
        c = self.config
        if c.body == "file":
            content_type = c.content_type or self.encoding.mime
            return await self.transport.post_file(self.url, data, content_type, self.parse)
        encoded = base64.b64encode(data).decode()
        return await self.transport.post_json(self.url, fill(c.request, encoded), self.parse)

    def parse(self, body: Any) -> Pairs:
        what = f"the {self.config.name} answer"
        self.check_status(body, what)
        labels = [label_of(v, what) for v in select(body, self.config.labels)]
        if self.config.scores is None:  # rank order: the first label scores highest
            return [(label, -float(i)) for i, label in enumerate(labels)]
        scores = [score_of(v, what) for v in select(body, self.config.scores)]
        if len(scores) != len(labels):
            raise ProtocolError(f"{what} has {len(labels)} labels but {len(scores)} scores")
        return list(zip(labels, scores, strict=True))

    def check_status(self, body: Any, what: str) -> None:
        c = self.config
        if c.status is None:
            return
        found = select(body, c.status)
        if found and found[0] in c.ok:
            return
        detail = ""
        if c.message is not None:
            with contextlib.suppress(ProtocolError):
                detail = ": " + " ".join(str(m) for m in select(body, c.message))[:200]
        text = f"{what} has status {found[0] if found else None!r}{detail}"
        if found and found[0] in c.retry:
            raise ProtocolError(text)  # asked again, with backoff
        raise EndpointError(text)


def fill(template: Any, image: str) -> Any:
    if isinstance(template, str):
        return template.replace(PLACEHOLDER, image)
    if isinstance(template, list):
        return [fill(t, image) for t in template]
    if isinstance(template, dict):
        return {k: fill(v, image) for k, v in template.items()}
    return template


def steps(path: str, where: str = "") -> list[str | int | None]:
    """'a.b[*].c[0]' → ['a', 'b', None, 'c', 0] (None: every item)."""
    out: list[str | int | None] = []
    for part in path.split("."):
        m = _STEP.fullmatch(part)
        if not part or not m or (m.group(1) is None and not m.group(2)):
            raise UsageError(f"--protocol-config {where}: {path!r} is not a path like a.b[*].c")
        if m.group(1):
            out.append(m.group(1))
        for index in re.findall(r"\[(\d+|\*)\]", m.group(2)):
            out.append(None if index == "*" else int(index))
    return out


def select(doc: Any, path: str) -> list[Any]:
    """Every value at `path` in `doc`; ProtocolError when the answer lacks it."""
    values = [doc]
    for step in steps(path):
        nxt: list[Any] = []
        for v in values:
            if isinstance(step, str):
                if not isinstance(v, dict) or step not in v:
                    raise ProtocolError(f"the answer has no {step!r} (at {path})")
                nxt.append(v[step])
            elif not isinstance(v, list):
                raise ProtocolError(f"the answer has no list at {path}")
            elif step is None:
                nxt.extend(v)
            elif step < len(v):
                nxt.append(v[step])
            else:
                raise ProtocolError(f"the answer's list at {path} has only {len(v)} items")
        values = nxt
    return values

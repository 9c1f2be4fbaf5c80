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
from dataclasses import dataclass, field, fields
from typing import Any

from ..digests import file_digest
from ..errors import EndpointError, ProtocolError, UsageError
from ..inputs import MAX_CONFIG_BYTES, read_json, shown, want_int, want_str
from ..redaction import server_text
from .auth import check_auth_style, check_header_name
from .labels import Pairs
from .vendor import LabelledAPI, check_count, label_of, score_of

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
        """Read, bounded and strict; every key's type and range checked before anything is
        built from it (see `validate`)."""
        path = os.fspath(path)
        data = read_json(path, "--protocol-config", MAX_CONFIG_BYTES)
        if not isinstance(data, dict):
            raise UsageError(f"--protocol-config {path} must hold a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            listed = ", ".join(shown(k) for k in unknown[:5]) + (", …" if len(unknown) > 5 else "")
            raise UsageError(
                f"--protocol-config {path}: unknown keys {listed} "
                f"(known: {', '.join(sorted(known))})"
            )
        validate(data, f"--protocol-config {path}")
        config = cls(**data)
        config.check(path)
        return config

    def check(self, path: str) -> None:
        where = f"--protocol-config {path}"
        validate({f.name: getattr(self, f.name) for f in fields(self)}, where)
        if self.body == "json" and PLACEHOLDER not in json.dumps(self.request):
            raise UsageError(
                f"{where}: the 'request' template needs the {PLACEHOLDER} "
                "placeholder where the image goes"
            )
        if self.status is not None and not self.ok:
            raise UsageError(f"{where}: 'status' needs the 'ok' values")
        for p in (self.labels, self.scores, self.status, self.message):
            if p is not None:
                steps(p, path)
        check_auth_style(self.auth, f"{where}: 'auth'")
        for name, value in self.headers.items():
            if looks_like_credential(name, value):  # named, never its value
                raise UsageError(
                    f"{where}: put no credentials in 'headers' (the {shown(name)} header looks "
                    "like one): set 'auth' (for example \"header:NAME\") and pass the key in an "
                    "environment variable (--api-key-env)"
                )
            check_header_name(name, f"{where}: 'headers'")


# -- the config's schema: types and ranges, checked before a VendorConfig is made -----------

MAX_HEADERS = 64
MAX_STATUS_VALUES = 1000
MAX_VENDOR_IMAGE_BYTES = 100_000_000
_PATH_KEYS = ("labels", "scores", "status", "message")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed in a header value
# A header whose name says it carries a secret, or whose value is an authorization scheme.
_SECRET_NAME = re.compile(
    r"key|token|secret|auth|password|passwd|credential|signature|session|cookie", re.IGNORECASE
)
_SECRET_VALUE = re.compile(r"\s*(bearer|basic|key|token)\s", re.IGNORECASE)


def validate(data: dict[str, Any], where: str) -> None:
    """Each key of a vendor config has the type and range it must have, or one UsageError line
    naming the key and what it must be. `request` may be any JSON (its depth was bounded when
    it was read)."""
    if "labels" not in data:
        raise UsageError(f"{where} needs a 'labels' path (where the labels are in the answer)")
    if not isinstance(data["labels"], str) or not data["labels"]:
        raise UsageError(
            f"{where}: 'labels' must be a non-empty string path like a.b[*].c, "
            f"not {shown(data['labels'])}"
        )
    for key in _PATH_KEYS:
        if key in data:
            want_str(data, key, where, null=key != "labels", limit=1000)
    if "body" in data and data["body"] not in ("file", "json"):
        raise UsageError(f'{where}: \'body\' must be "file" or "json", not {shown(data["body"])}')
    if "auth" in data:
        want_str(data, "auth", where, limit=300)
    for key, limit in (("name", 200), ("documentation", 2000)):
        if key in data:
            want_str(data, key, where, limit=limit)
    if "content_type" in data:
        value = want_str(data, "content_type", where, null=True, limit=300)
        if value is not None and (not value.strip() or _CONTROL.search(value)):
            raise UsageError(f"{where}: 'content_type' must be a media type like image/png")
    if data.get("max_image_bytes") is not None:
        want_int(data, "max_image_bytes", where, 1, MAX_VENDOR_IMAGE_BYTES)
    for key in ("ok", "retry"):
        values = data.get(key, [])
        if not isinstance(values, list) or len(values) > MAX_STATUS_VALUES:
            raise UsageError(
                f"{where}: {key!r} must be a list of status values (strings or numbers), "
                f"not {shown(values)}"
            )
        for value in values:
            if not isinstance(value, str | int | float) or (
                isinstance(value, str) and len(value) > 1000
            ):
                raise UsageError(
                    f"{where}: {key!r} must hold strings or numbers, not {shown(value)}"
                )
    headers = data.get("headers", {})
    if not isinstance(headers, dict) or len(headers) > MAX_HEADERS:
        raise UsageError(
            f"{where}: 'headers' must be an object of at most {MAX_HEADERS} "
            f'"Name": "value" pairs, not {shown(headers)}'
        )
    for name, value in headers.items():
        if not 0 < len(name) <= 256:
            raise UsageError(f"{where}: header name {shown(name)} must be 1..256 characters")
        if not isinstance(value, str) or len(value) > 8192 or _CONTROL.search(value):
            # never echo the value: it may be a key put where it does not belong
            raise UsageError(
                f"{where}: header {shown(name)} must have a string value of at most 8192 "
                "characters, without line breaks or control characters"
            )


def looks_like_credential(name: str, value: str) -> bool:
    """A fixed header that would carry a secret: its name says so (Ocp-Apim-Subscription-Key,
    X-Goog-Api-Key, X-Auth-Token, Proxy-Authorization, Cookie, …) or its value is an
    authorization scheme (Bearer …, Basic …, Key …, Token …)."""
    return bool(_SECRET_NAME.search(name) or _SECRET_VALUE.match(value + " "))


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
        found = select(body, self.config.labels)
        check_count(len(found), what)
        labels = [label_of(v, what) for v in found]
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
                messages = select(body, c.message)[:20]
                detail = ": " + server_text(" ".join(m if isinstance(m, str) else server_text(m)
                                                     for m in messages))  # fmt: skip
        text = f"{what} has status {server_text(found[0] if found else None, 60)}{detail}"
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

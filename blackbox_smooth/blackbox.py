"""The core types: what every black box is (a batch of noisy images in, one label per image,
and scores, out) and what it answers. Below both the adapters, which produce `Answer`s, and the
vote counting and cache, which consume them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from .errors import ProtocolError

if TYPE_CHECKING:  # only named in a signature: the CLI's argument checks run before torch loads
    import torch

# An answer outside the label map: a vote against the top class, never for it. Apart in memory
# from stats.ABSTAIN (-1, a certificate's label), so that neither can be read as the other;
# every file and client (the cache, the ledger, certificates, run folders, served answers)
# reads it as FILE_OTHER, -1 as it always has: `labels_out` and `labels_in` translate, where
# each format is written and read.
OTHER = -2
FILE_OTHER = -1
MAX_CLASSES = 100_000  # class indices are 0..MAX_CLASSES-1: more is a hostile or broken input


Labels = TypeVar("Labels", np.ndarray, "torch.Tensor")


def labels_out(labels: Labels) -> Labels:
    """Labels as files and clients read them: OTHER written as FILE_OTHER (-1); a copy, of
    the same dtype."""
    out = _copy(labels)
    out[labels == OTHER] = FILE_OTHER
    return out


def labels_in(labels: Labels) -> Labels:
    """Labels read from a file or a client: any negative one is OTHER; a copy, of the same
    dtype."""
    out = _copy(labels)
    out[labels < 0] = OTHER
    return out


def _copy(labels: Labels) -> Labels:
    # numpy's copy or torch's clone: the one module here that needs no torch at run time
    return labels.copy() if isinstance(labels, np.ndarray) else labels.clone()


def label_out(label: int) -> int:
    """One label (a vote count's key) as files and clients read it."""
    return FILE_OTHER if label == OTHER else label


@dataclass(frozen=True)
class Answer:
    """The black box's answer to one batch: `labels[i]` for image i (OTHER when unmapped) and,
    when the classifier gives them, an N×K array of class scores."""

    labels: np.ndarray
    scores: np.ndarray | None = None

    @classmethod
    def from_output(cls, output: Any, n: int, what: str) -> Answer:
        """Read N labels or an N×K score array (argmax is the label); `what` names the source."""
        try:
            arr = np.asarray(output)
        except Exception as e:  # ragged lists and the like
            raise ProtocolError(f"{what} returned something that is not an array: {e}") from e
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim == 1 and arr.shape[0] == n:
            if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
                raise ProtocolError(f"{what} returned labels that are not finite numbers")
            if np.any(arr != np.round(arr)):
                raise ProtocolError(f"{what} returned non-integer labels")
            if np.any(arr >= MAX_CLASSES):  # before any cast: 1e30 would wrap around in int64
                raise ProtocolError(
                    f"{what} returned label {float(arr.max()):.6g}: class index out of range "
                    f"(0..{MAX_CLASSES - 1}; negative means OTHER)"
                )
            return cls(np.where(arr < 0, OTHER, arr).astype(np.int64))
        if arr.ndim == 2 and arr.shape[0] == n and arr.shape[1] >= 1:
            if not np.issubdtype(arr.dtype, np.number):
                raise ProtocolError(f"{what} returned scores that are not numbers")
            if arr.shape[1] > MAX_CLASSES:
                raise ProtocolError(
                    f"{what} returned scores for {arr.shape[1]:,} classes: class index out of "
                    f"range (at most {MAX_CLASSES:,} classes)"
                )
            scores = arr.astype(np.float32)
            if not np.all(np.isfinite(scores)):
                raise ProtocolError(f"{what} returned NaN or infinite scores")
            return cls(scores.argmax(axis=1).astype(np.int64), scores)
        raise ProtocolError(
            f"{what} returned shape {tuple(arr.shape)} for a batch of {n}: "
            f"expected ({n},) labels or ({n}, K) scores"
        )

    @classmethod
    def stack(cls, parts: list[Answer]) -> Answer:
        """One Answer from several in order; scores only when every part has them, of one
        width."""
        widths = {None if p.scores is None else p.scores.shape[1] for p in parts}
        scores = None
        if len(widths) == 1 and None not in widths:
            scores = np.concatenate([p.scores for p in parts if p.scores is not None])
        return cls(np.concatenate([p.labels for p in parts]), scores)

    def one_by_one(self) -> list[Answer]:
        """One Answer per image."""
        return [
            Answer(self.labels[i : i + 1], None if self.scores is None else self.scores[i : i + 1])
            for i in range(len(self.labels))
        ]


# One image's (label, score) answers from a vendor, in any order.
Pairs = Sequence[tuple[str, float]]


class Rate(Protocol):
    """A pace for requests: `wait` before each one."""

    async def wait(self) -> None: ...


class Transport(Protocol):
    """The HTTP transport under a black box, as far as its callers reach into it: its pace,
    which a cluster replaces with one shared by every machine (cluster.py)."""

    rate: Any  # a Rate; Any so that a transport may declare its own kind of pace


class LabelTable(Protocol):
    """A vendor's label strings → the task's classes (adapters/labels.py's LabelMap)."""

    @property
    def classes(self) -> tuple[str, ...]: ...

    def lookup(self, label: str | int) -> int | None: ...


@runtime_checkable
class BlackBox(Protocol):
    """A classifier we can only query.

    `classify` receives float32 images N×C×H×W on the [0,1] pixel scale with noise already added
    (unclipped). What the wire needs after that (clipping, quantizing, encoding) happens inside
    the adapter, so it is part of the base classifier and of `fingerprint`. Every member below
    is read by a caller; a black box without the thing says so with 0 or None.
    """

    fingerprint: str  # what identifies the classifier's answers; never holds a secret
    description: dict[str, Any]  # the readable parts of the fingerprint
    max_batch: int  # images per request
    cache_by_default: bool  # whether answers may be cached on disk without --cache
    # Read-only members (properties here, plain attributes in the adapters):

    @property
    def wire_bytes_per_value(self) -> float:
        """What a request holds per pixel value while it is built and sent (adapters that
        build request bodies), or what a value costs while a local model runs: votes.py caps
        requests in flight and sizes forward passes by it. 0: nothing to say, no cap."""

    @property
    def transport(self) -> Transport | None:
        """The HTTP transport it sends through, whose pace a cluster shares; None: no HTTP."""

    @property
    def labels(self) -> LabelTable | None:
        """Its vendor labels → classes; None: it answers class indices itself."""

    @property
    def annotate(self) -> Callable[[torch.Tensor], Awaitable[list[Pairs]]] | None:
        """Every image's (label, score) answers before the label map (`bbsmooth labels`);
        None: it answers class indices or scores, read from `classify`."""

    async def classify(self, images: torch.Tensor) -> Answer: ...

    async def aclose(self) -> None: ...


def differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    """What tells two black boxes apart, from their descriptions (which hold no secret):
    "url http://127.0.0.1:18080/… (now http://127.0.0.1:40213/…)"; empty when nothing
    readable differs (a description from an older bbsmooth, or a digest)."""
    parts = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old != new:
            parts.append(f"{key} {_shown(old)} (now {_shown(new)})")
    return ", ".join(parts)


def _shown(value: Any) -> str:
    text = "none" if value is None else str(value)
    return text if len(text) <= 80 else text[:77] + "…"

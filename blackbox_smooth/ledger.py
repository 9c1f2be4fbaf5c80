"""The evidence ledger: which certificates already looked at an image's estimation samples.

A certificate's (1 − α) guarantee holds for a protocol decided before its samples are seen.
The cache makes re-runs free, and so makes it easy to look at the same estimation samples twice:
a larger n after a certificate fell short, a fixed run after an adaptive one. The second
certificate is then chosen after looking, and its α no longer holds ("increase n until it
certifies" on one seed gave 3.4% wrong certificates at α = 1%).

The ledger remembers, per estimation stream (black box, front end, σ, seed, image, noise
generator), the protocols that completed on it, in the order they first did. A certificate is
fresh when its protocol is the first that completed on its stream; replaying it (a resume, a
reproduction) gives the same certificate and stays fresh. Any other protocol on the same stream
is marked `fresh: false`. Without a cache nothing is remembered, so nothing can be flagged.
"""

from __future__ import annotations

from typing import Any

from .cache import BlockCache, cache_key

MAX_ENTRIES = 32  # only the first entry decides freshness; the rest name what else was tried


def protocol(**settings: Any) -> dict[str, Any]:
    """What a certificate decided before looking: mode, n0, n (or the cap), α, target, bound."""
    return {k: v for k, v in sorted(settings.items()) if v is not None}


def check_and_record(
    cache: BlockCache | None, stream: dict[str, Any], used: dict[str, Any], result: dict[str, Any]
) -> dict[str, Any] | None:
    """Record that a certificate with protocol `used` (and `result`) completed on the estimation
    stream `stream`; return the earlier certificate that makes this one not fresh, or None."""
    if cache is None:
        return None
    key = cache_key(ledger="estimation", **stream)
    entries = cache.get_record(key)
    entries = entries if isinstance(entries, list) else []
    entries = [e for e in entries if isinstance(e, dict) and "protocol" in e]
    if len(entries) < MAX_ENTRIES and all(e["protocol"] != used for e in entries):
        cache.put_record(key, [*entries, {"protocol": used, "result": result}])
    if entries and entries[0]["protocol"] != used:
        return entries[0]
    return None


def describe(entry: dict[str, Any]) -> str:
    """An earlier certificate in words: its protocol and what it said."""
    p, r = entry.get("protocol", {}), entry.get("result", {})
    modes = {
        "fixed": f"fixed n={p.get('n')}",
        "target": f"--target-radius {p.get('target_radius')}",
        "budget": f"--budget {(p.get('n_max') or 0) + (p.get('n0') or 0)}",
    }
    how = modes.get(p.get("mode"), str(p.get("mode")))
    label = r.get("label", -1)
    said = "abstained" if label == -1 else f"label {label} at radius {r.get('radius', 0):.3f}"
    return f"{how}, n0={p.get('n0')}, α={p.get('alpha')}: {said}"

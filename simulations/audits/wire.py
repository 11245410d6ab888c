"""The wire audit: planted PII in what the devices really sent.

When the harness audits a run it adds the wire recorder
(``simulations/wire_recorder.py``) outside every device's production mods, so
each reply that left a device is kept in Flower's protobuf wire format under
``config.json``'s ``wire_dir`` (``<node>-<kind>-<id>.bin``). Those bytes are
scanned for every planted PII value and canary, in UTF-8 and UTF-16 and as the
model's token-id sequences (int32 and int64). The expected count is zero.
"""

from __future__ import annotations

import numpy as np

from simulations.audits.base import Audit, AuditContext, register, skipped
from simulations.audits.report_html import Section


def needles(values: list[str], tokenizer) -> list[bytes]:
    """Byte patterns of each value: UTF-8, UTF-16 LE/BE and, given a tokenizer, its token ids as int32 and int64."""
    out = []
    for value in values:
        out.append(value.encode("utf-8"))
        out.append(value.encode("utf-16-le"))
        out.append(value.encode("utf-16-be"))
        if tokenizer is not None:
            ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            if len(ids) >= 2:  # one token id alone is far too common to mean anything
                out.append(np.asarray(ids, dtype="<i4").tobytes())
                out.append(np.asarray(ids, dtype="<i8").tobytes())
    return out


class NeedleFinder:
    """Count occurrences of many byte strings in a blob, in one vectorised pass.

    Every 4-byte window of the blob is read as a uint32; its low three bytes
    index a 2**24-entry table of the needles' 3-byte prefixes (one gather per
    position, no sort), and only those rare candidate positions get an exact
    comparison. (A regex alternation of ~2,000 needles tries each one at every
    position and takes minutes on a run's wire; ``np.isin`` sorts every blob.)
    """

    def __init__(self, needles: list[bytes]):
        if any(len(n) < 4 for n in needles):
            raise ValueError("needles must be at least 4 bytes long")
        self.by_prefix: dict[int, list[bytes]] = {}
        for n in needles:
            self.by_prefix.setdefault(int.from_bytes(n[:4], "little"), []).append(n)
        self.table = np.zeros(1 << 24, dtype=bool)
        self.table[[p & 0xFFFFFF for p in self.by_prefix]] = True

    def count(self, blob: bytes) -> int:
        if len(blob) < 4:
            return 0
        b = np.frombuffer(blob, dtype=np.uint8).astype(np.uint32)
        low = b[:-3] | (b[1:-2] << 8) | (b[2:-1] << 16)
        hits = 0
        for pos in np.flatnonzero(self.table[low]):
            window = int(low[pos]) | (int(b[pos + 3]) << 24)
            hits += sum(blob.startswith(n, int(pos)) for n in self.by_prefix.get(window, ()))
        return hits


def _skip_reason(view) -> str | None:
    if view.wire_dir is None:
        return "the wire was not recorded (config.json has no wire_dir): run the simulation with --audit fast or full"
    if not view.planted_values():
        return "no planted PII or canaries to look for (no pii_sidecar.jsonl and no canaries in manifest.json)"
    return None


def wire_audit(view, tokenizer=None) -> dict:
    """Scan every recorded reply of the run for its planted values; skips without a recording or planted values."""
    reason = _skip_reason(view)
    if reason:
        return skipped(reason)
    planted = view.planted_values()
    messages = sorted(view.wire_dir.glob("*.bin"))
    patterns = sorted(set(needles(planted, tokenizer)))
    finder = NeedleFinder(patterns)
    hits, scanned = 0, 0
    for path in messages:
        blob = path.read_bytes()
        scanned += len(blob)
        hits += finder.count(blob)
    return {
        "messages": len(messages),
        "bytes_scanned": scanned,
        "planted_values": len(planted),
        "patterns": len(patterns),
        "encodings": ["utf-8", "utf-16-le", "utf-16-be"] + (["token-ids int32", "token-ids int64"] if tokenizer else []),
        "hits": hits,
    }


@register
class WireAudit(Audit):
    name = "wire"
    title = "Wire audit"
    level = "fast"
    order = 20
    method = (
        "Every reply a device sent was recorded in Flower's protobuf wire format and scanned for every planted PII "
        "value and canary, in UTF-8, UTF-16 and as the model's token-id sequences (int32/int64). Expected: 0 hits."
    )
    criterion = "no planted value in any recorded reply (and at least one reply recorded)"

    def run(self, ctx: AuditContext) -> dict:
        view = ctx.view
        return wire_audit(view, None if _skip_reason(view) else view.tokenizer)

    def failure(self, result: dict) -> str | None:
        if result["hits"]:
            return f"wire audit found {result['hits']} planted PII occurrence(s) in sent messages"
        if not result["messages"]:
            return "the wire recorder kept no messages"
        return None

    def summary(self, result: dict) -> str:
        return (
            f"{result['hits']} hits for {result['planted_values']} planted values in {result['messages']} messages, "
            f"{result['bytes_scanned']:,} bytes ({', '.join(result['encodings'])})"
        )

    def section(self, result: dict, ctx: AuditContext) -> Section:
        r = result
        rows = [[r["messages"], f"{r['bytes_scanned']:,}", r["planted_values"], ", ".join(r["encodings"]), r["hits"]]]
        return Section(self.section_id, self.title, self.method, [("Scan", ["messages", "bytes scanned", "planted values", "encodings", "hits"], rows)])

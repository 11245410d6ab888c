"""The wire contract: what a client may send, and the guard that enforces it.

Both halves of the egress guard live here, pfl-research style:

* the device half (:func:`egress_guard_mod`, a Flower client mod) checks every
  reply *before* it leaves the ClientApp and raises if anything is off;
* the server half (:meth:`EgressGuard.check` called by the strategy) refuses
  malformed replies instead of aggregating them.

A reply may carry only allow-listed records: one ``ArrayRecord`` whose keys and
shapes match the shared-tier schema exactly (float32 only), and one
``MetricRecord`` with allow-listed numeric metrics. No ``ConfigRecord`` (it can
hold strings), no extra tensors. Error messages name *counts and schema keys*,
never the offending value or an unexpected key (which could itself be text).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
SECAGG = "secagg"  # secure-aggregation stage messages (ConfigRecord of bytes and ints)
MASKED = "masked"  # the one array of a masked train reply (uint32, mod 2**bits)
SECAGG_REPLY_STAGES = frozenset({"advertise_keys", "shares", "unmask_shares"})
SECAGG_REPLY_FIELDS = frozenset({"stage", "c_pk", "s_pk", "dst", "ciphertexts", "b_ids", "b_shares", "sk_ids", "sk_shares"})

TRAIN_METRICS = frozenset({"train-loss", "num-examples", "steps", "epsilon"})
EVAL_METRICS = frozenset(
    {
        "nll-base", "nll-global", "nll-persona", "nll-personal", "nll-served", "routing-group",
        "num-examples", "num-tokens", "epsilon", "user-index", "num-records",
    }
)


class EgressViolation(RuntimeError):
    """A message broke the wire contract. Carries no user data by construction."""


def _fingerprint(value: object) -> str:
    # Lets an operator correlate repeated violations without seeing the value.
    return hashlib.sha256(repr(value).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class WireSchema:
    """Expected arrays of a train reply (name -> shape), all of one dtype.

    Plain rounds send the shared tensors as float32; secure-aggregation rounds
    send one masked uint32 vector instead.
    """

    arrays: dict[str, tuple[int, ...]]
    dtype: str = "float32"

    @classmethod
    def masked(cls, layout: dict[str, tuple[int, ...]]) -> "WireSchema":
        """One uint32 vector as long as the update ``layout`` (key -> shape) it masks."""
        return cls({MASKED: (sum(math.prod(s) for s in layout.values()),)}, dtype="uint32")


def train_reply_schema(shared_shapes: dict[str, tuple[int, ...]], num_slots: int, masked: bool) -> WireSchema:
    """The train-reply contract, from the model's live shared shapes (both halves call this).

    * no persona tier, no secure aggregation: the new global values;
    * persona tier: the K-slot update (global, K slots, count vector);
    * secure aggregation: one masked vector as long as that update.
    """
    from common.tiers import update_layout, wire_shapes

    if not num_slots and not masked:
        return WireSchema(dict(shared_shapes))
    layout = update_layout(wire_shapes(shared_shapes, num_slots), num_slots)
    return WireSchema.masked(layout) if masked else WireSchema(layout)


class EgressGuard:
    def __init__(self, schema: WireSchema):
        self.schema = schema

    def check(self, content, kind: str) -> None:
        """Raise :class:`EgressViolation` unless ``content`` (a RecordDict) fits ``kind``.

        ``kind`` is ``"train"`` (arrays + train metrics), ``"evaluate"`` (metrics
        only) or ``"query"`` (a secure-aggregation stage reply).
        """
        from flwr.app import ArrayRecord, MetricRecord

        if kind == "query":
            self.check_secagg(content)
            return

        allowed_metrics = TRAIN_METRICS if kind == "train" else EVAL_METRICS
        expected_records = {ARRAYS, METRICS} if kind == "train" else {METRICS}
        names = set(content.keys())
        if names != expected_records:
            extra = names - expected_records
            raise EgressViolation(
                f"{kind} reply must hold records {sorted(expected_records)}; "
                f"{len(extra)} unexpected record(s) (fingerprint {_fingerprint(sorted(extra))}), "
                f"missing {sorted(expected_records - names)}"
            )
        for name in names:
            record = content[name]
            if name == ARRAYS:
                if not isinstance(record, ArrayRecord):
                    raise EgressViolation(f"record '{ARRAYS}' must be an ArrayRecord")
                self._check_arrays(record)
            else:
                if not isinstance(record, MetricRecord):
                    raise EgressViolation(f"record '{METRICS}' must be a MetricRecord")
                self._check_metrics(record, allowed_metrics)

    def _check_arrays(self, record) -> None:
        keys = set(record.keys())
        expected = set(self.schema.arrays)
        if keys != expected:
            unexpected = keys - expected
            raise EgressViolation(
                f"array keys differ from the shared-tier schema: {len(unexpected)} unexpected "
                f"(fingerprint {_fingerprint(sorted(unexpected))}), {len(expected - keys)} missing"
            )
        for key in sorted(keys):
            arr = record[key]
            if arr.dtype != self.schema.dtype or arr.stype != "numpy.ndarray":
                raise EgressViolation(f"array {key}: only {self.schema.dtype} numpy arrays may leave the device")
            if tuple(arr.shape) != self.schema.arrays[key]:
                raise EgressViolation(f"array {key}: shape {tuple(arr.shape)} != {self.schema.arrays[key]}")
            decoded = arr.numpy()  # the payload itself must agree with the declared header
            if decoded.dtype != np.dtype(self.schema.dtype) or decoded.shape != self.schema.arrays[key]:
                raise EgressViolation(f"array {key}: payload does not match its declared dtype/shape")
            if decoded.dtype.kind == "f" and not np.isfinite(decoded).all():
                raise EgressViolation(f"array {key}: non-finite values")

    @staticmethod
    def check_secagg(content) -> None:
        """A secure-aggregation stage reply: public keys, ciphertexts, shares, ids.

        Only bytes and integers pass (keys, encrypted shares and node ids are all
        one or the other); the one string allowed is the stage name, from a fixed
        set. So no free text can ride along.
        """
        from flwr.app import ConfigRecord

        if set(content.keys()) != {SECAGG} or not isinstance(content[SECAGG], ConfigRecord):
            raise EgressViolation(f"a query reply must hold exactly one ConfigRecord '{SECAGG}'")
        unexpected = set(content[SECAGG].keys()) - SECAGG_REPLY_FIELDS
        if unexpected:
            raise EgressViolation(f"{len(unexpected)} secagg field name(s) not on the allow-list (fingerprint {_fingerprint(sorted(unexpected))})")
        for key, value in content[SECAGG].items():
            if key == "stage":
                if value not in SECAGG_REPLY_STAGES:
                    raise EgressViolation("unknown secure-aggregation stage name")
                continue
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (bytes, int)) and not isinstance(v, bool) for v in values):
                raise EgressViolation(f"secagg field {key}: only bytes and integers may leave the device")

    @staticmethod
    def _check_metrics(record, allowed: frozenset[str]) -> None:
        unexpected = set(record.keys()) - allowed
        if unexpected:
            raise EgressViolation(
                f"{len(unexpected)} metric name(s) not on the allow-list (fingerprint {_fingerprint(sorted(unexpected))})"
            )
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise EgressViolation(f"metric {key}: only numbers may leave the device")


def flatten(record, keys=None) -> np.ndarray:
    """One float64 vector of an ArrayRecord's arrays, in ``keys`` order (default: its own).

    The secure-aggregation vector layout: the client flattens its update in the
    key order the server sent, and the server un-flattens the sum with it.
    """
    keys = list(record.keys()) if keys is None else list(keys)
    return np.concatenate([record[k].numpy().reshape(-1) for k in keys]).astype(np.float64)


def unflatten(vector: np.ndarray, like):
    """The inverse of :func:`flatten`: float32 arrays shaped and keyed like ``like``."""
    from flwr.app import Array, ArrayRecord

    out, start = {}, 0
    for key, arr in like.items():
        size = math.prod(arr.shape)
        out[key] = Array(vector[start : start + size].reshape(arr.shape).astype(np.float32))
        start += size
    return ArrayRecord(out)


def reply_nbytes(content) -> int:
    """Bytes of a reply as Flower serialises it (protobuf): what the report counts as 'sent'."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()

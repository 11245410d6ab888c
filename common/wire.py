"""The wire contract, both directions: what a server message may carry and what a device may send.

Server to device. Static settings come from the run config (``context.run_config``)
and the device's own policy; a message carries per-round values only, from the
allow-list :data:`MESSAGE_CONFIG` (the secure-aggregation stage travels in its
own ``secagg`` record). A device refuses anything else, and refuses outright
any key naming a device location (:data:`DEVICE_PATH_KEYS`).

Device to server. A reply holds allow-listed records only:

* a train reply: one ``ArrayRecord`` whose keys and shapes match the K-slot
  update exactly (float32), or one masked vector under secure aggregation;
  nothing else (per-client training metrics are not sent at all);
* an evaluate reply: an empty ``MetricRecord`` (the device keeps its
  evaluation results; see the README's privacy model);
* a secure-aggregation stage reply: bytes, integers and a stage name from a
  fixed set;
* a **refusal**, for any message: one ``MetricRecord`` with a reason code
  (:class:`Reason`). Every failure on a device crosses as a refusal, never as
  an exception's text.

Both halves of the egress guard enforce this: the device's before a reply
leaves (``client/app.py`` installs it as a Flower mod), the server's before a
reply is summed (``common/privacy/guard.py``). Error messages name counts and
schema keys, never a value or an unexpected key (which could itself be text).
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass

import numpy as np

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
SECAGG = "secagg"  # secure-aggregation stage messages (ConfigRecord of bytes and ints)
MASKED = "masked"  # the one array of a masked train reply (uint32/uint64, mod 2**bits)
REFUSAL = "refusal"  # a typed refusal: MetricRecord {"reason": Reason}
SECAGG_REPLY_STAGES = frozenset({"advertise_keys", "shares", "unmask_shares"})
SECAGG_REPLY_FIELDS = frozenset({"stage", "session_id", "c_pk", "s_pk", "b_commit", "dst", "ciphertexts", "b_ids", "b_shares", "sk_ids", "sk_shares"})

# A train message's user-level clip norm for the round, under adaptive clipping only (common/privacy/clip.py).
ROUND_CLIP_KEY = "user-clip-norm"
# The per-round values a server message may carry in its ConfigRecord: the whole allow-list.
MESSAGE_CONFIG: dict[str, type] = {"server-round": int, ROUND_CLIP_KEY: float}
# Keys that name a place on the device. Only the device's owner sets these
# (its policy); from a server, in a message or in the run config, they are refused.
DEVICE_PATH_KEYS = frozenset({"store-dir", "store-path", "key-file", "user-file", "wire-audit-dir", "policy-file"})

# A train reply carries no metrics; an evaluate reply carries none of these unless listed.
EVAL_METRICS: frozenset[str] = frozenset()


class Reason(enum.IntEnum):
    """Why a device declined a message. The only thing a failure sends to the server."""

    CONFIG_INVALID = 1  # the run config failed validation on the device
    CONFIG_KEY_NOT_ALLOWED = 2  # the message carried a key outside MESSAGE_CONFIG
    DEVICE_PATH_FROM_SERVER = 3  # the server named a device location
    SCRUB_BELOW_FLOOR = 4
    DP_REQUIRED = 5
    NOISE_BELOW_FLOOR = 6
    CLIP_ABOVE_CEILING = 7
    DELTA_ABOVE_CEILING = 8
    SECAGG_REQUIRED = 9
    PARTICIPATION_BUDGET_SPENT = 10
    RECORD_BUDGET_SPENT = 11
    NO_TRAINING_DATA = 12
    NO_TEST_DATA = 13
    INGEST_ERROR = 14  # the user's file is malformed (the device log names file and line)
    DATA_MISSING = 15  # no user file or policy for this device
    PROTOCOL_ERROR = 16  # a secure-aggregation stage or message was malformed or out of order
    EGRESS_VIOLATION = 17  # the device's own guard stopped the reply
    MODEL_UNAVAILABLE = 18
    POLICY_INVALID = 19  # the device owner's policy file is malformed
    NOT_IN_PERSONA_TIER = 20  # informational: not used as a refusal
    DEVICE_ERROR = 99  # anything else (details only in the device's local log)


def refusal_content(reason: Reason):
    """The RecordDict of a refusal reply."""
    from flwr.app import MetricRecord, RecordDict

    return RecordDict({REFUSAL: MetricRecord({"reason": int(reason)})})


def refusal_reason(content) -> Reason | None:
    """The reason code of a refusal reply, or None for any other content."""
    if REFUSAL not in content.keys():
        return None
    try:
        return Reason(int(content[REFUSAL]["reason"]))
    except (KeyError, ValueError, TypeError):
        return Reason.DEVICE_ERROR


class EgressViolation(RuntimeError):
    """A message broke the wire contract. Carries no user data by construction."""


def _fingerprint(value: object) -> str:
    # Lets an operator correlate repeated violations without seeing the value.
    return hashlib.sha256(repr(value).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class WireSchema:
    """Expected arrays of a train reply (name -> shape), all of one dtype."""

    arrays: dict[str, tuple[int, ...]]
    dtype: str = "float32"


def train_reply_schema(update_shapes: dict[str, tuple[int, ...]], masked_dtype: str | None = None) -> WireSchema:
    """The train-reply contract: the K-slot update (``KSlotCodec.update_shapes``), or one masked vector as long."""
    if masked_dtype is None:
        return WireSchema(dict(update_shapes))
    return WireSchema({MASKED: (sum(math.prod(s) for s in update_shapes.values()),)}, dtype=masked_dtype)


class EgressGuard:
    def __init__(self, schema: WireSchema):
        self.schema = schema

    def check(self, content, kind: str) -> None:
        """Raise :class:`EgressViolation` unless ``content`` (a RecordDict) fits ``kind``.

        ``kind`` is ``"train"``, ``"evaluate"`` or ``"query"`` (a secure-aggregation
        stage reply). A refusal fits every kind.
        """
        from flwr.app import ArrayRecord, MetricRecord

        names = set(content.keys())
        if REFUSAL in names:
            self._check_refusal(content)
            return
        if kind == "query":
            self.check_secagg(content)
            return
        expected = {ARRAYS} if kind == "train" else {METRICS}
        if names != expected:
            extra = names - expected
            raise EgressViolation(
                f"{kind} reply must hold records {sorted(expected)}; "
                f"{len(extra)} unexpected record(s) (fingerprint {_fingerprint(sorted(extra))}), "
                f"missing {sorted(expected - names)}"
            )
        if kind == "train":
            if not isinstance(content[ARRAYS], ArrayRecord):
                raise EgressViolation(f"record '{ARRAYS}' must be an ArrayRecord")
            self._check_arrays(content[ARRAYS])
        else:
            if not isinstance(content[METRICS], MetricRecord):
                raise EgressViolation(f"record '{METRICS}' must be a MetricRecord")
            self._check_metrics(content[METRICS], EVAL_METRICS)

    @staticmethod
    def _check_refusal(content) -> None:
        from flwr.app import MetricRecord

        if set(content.keys()) != {REFUSAL} or not isinstance(content[REFUSAL], MetricRecord):
            raise EgressViolation(f"a refusal must hold exactly one MetricRecord '{REFUSAL}'")
        record = content[REFUSAL]
        if set(record.keys()) != {"reason"}:
            raise EgressViolation("a refusal holds only its reason code")
        value = record["reason"]
        if isinstance(value, bool) or not isinstance(value, int) or value not in {int(r) for r in Reason}:
            raise EgressViolation("a refusal's reason must be a known reason code")

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


def message_config_violation(config: dict) -> Reason | None:
    """Why a server message's ConfigRecord is not acceptable, or None if it is."""
    if any(key in DEVICE_PATH_KEYS for key in config):
        return Reason.DEVICE_PATH_FROM_SERVER
    for key, value in config.items():
        kind = MESSAGE_CONFIG.get(key)
        if kind is None or isinstance(value, bool) or not isinstance(value, kind):
            return Reason.CONFIG_KEY_NOT_ALLOWED
    return None


def reply_nbytes(content) -> int:
    """Bytes of a reply as Flower serialises it (protobuf): what the report counts as 'sent'."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()

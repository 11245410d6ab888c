"""Secure aggregation (SecAgg / SecAgg+) for the Flower Message API.

A transport-free protocol library after Bonawitz et al. 2017 ("Practical Secure
Aggregation for Privacy-Preserving Machine Learning") with the sparse neighbour
graph of Bell et al. 2020 ("Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", SecAgg+). Every message is a plain ``dict`` of
``str -> int | bytes | float | bool | list[int] | list[bytes]`` (fits a Flower
``ConfigRecord``) or one ``numpy`` array (fits an ``ArrayRecord``), so the lead
can wire the stages into Message-API ServerApp/ClientApp rounds.

Stage flow (server ``S = SecAggServer(params)``, client ``C``)::

    0 setup      S.setup_message()                  -> every sampled client
                 C = SecAggClient(node_id, msg); C.advertise_keys() -> S.receive_keys(id, r)
    1 share keys S.share_keys_messages()[id]        -> C.share_keys(msg)  -> S.receive_shares(id, r)
    2 masking    S.masked_input_messages()[id]      -> C.masked_input(msg, x) -> S.receive_masked_input(id, y)
    3 unmask     S.unmask_messages()[id]            -> C.unmask(msg)      -> S.receive_unmask(id, r)
    S.finalize() -> SecAggResult(sum=..., modular_sum=..., survivors=..., dropped=...)

A client that does not answer a stage is simply never passed to ``receive_*``;
calling the next ``*_messages()`` closes the stage and treats it as dropped.
Every stage message and every ConfigRecord reply carries the ``session_id``
(the stage-2 reply is a bare array, bound to the session by its masks); a
message of another session, or one with a missing field, a wrong type, a short
list or bytes of the wrong length, raises :class:`SecAggProtocolError`, whose
text names the field and never a value, and does not consume the stage. The
server app should then just not count that client (it becomes a dropout).
:class:`SecAggAbort` means the round cannot complete (too many dropouts, a
disconnected survivor set, too many corrupt shares). Between stages a
Message-API ClientApp keeps ``C.to_state()`` in ``context.state`` (a
``ConfigRecord``) and resumes with ``SecAggClient.from_state(...)``; after
``C.unmask`` that state holds nothing private any more
(:meth:`SecAggClient.clear_secrets` scrubs it for a round that ends early).
The server object simply lives in the ServerApp's ``main`` for the round.
:func:`benchmarks.secagg_driver.run_secagg_round` drives all of this in one
process (tests, benchmarks).

Masking (double masking). Client i with secure id ``u_i`` sends

    y_i = enc(x_i) + PRG(b_i) + sum_{j in N(i), u_i < u_j} PRG(s_ij)
                              - sum_{j in N(i), u_i > u_j} PRG(s_ij)     (mod 2**bits)

where ``N(i)`` are its graph neighbours that completed the share-keys stage,
``s_ij = HKDF(X25519(s_sk_i, s_pk_j))`` and ``b_i`` is a fresh random seed,
committed to with its keys (``SHA-256(session_id || b_i)``).
Each client Shamir-shares ``b_i`` and ``s_sk_i`` (threshold t) among its
neighbours, encrypted under ``HKDF(X25519(c_sk_i, c_pk_j))``. In the unmask
stage every surviving neighbour reveals, for each neighbour i, *either* its
share of ``b_i`` (i sent a masked input) *or* of ``s_sk_i`` (i dropped), never
both. The server removes the self masks of survivors and the dangling pairwise
masks of the dropped, then decodes the exact modular sum. It reconstructs each
secret from any t shares that verify (``b_i`` against its commitment,
``s_sk_i`` against ``s_pk_i``), so corrupt shares are skipped. Two key pairs
per client (as in the paper): revealing a dropped client's mask key ``s_sk``
must not also let the server decrypt the shares that client was holding.

Threat model and guarantee (stated as Bell et al. 2020 state theirs: over the
random graph, for a colluder fraction and a dropout rate):

* Parameters. N sampled clients, of which at most a fraction gamma collude
  with the server (fixed before the graph seed is drawn) and at most a
  fraction delta drop out (independently of the graph). The neighbour graph
  is SecAgg+'s ring over a uniformly random order derived from ``graph_seed``
  (:func:`common.secagg_crypto.neighbour_graph`); ``k`` and the threshold
  ``t`` come from :func:`choose_neighbours`, which sizes them so that, except
  with probability ``2**-40`` over the graph, no honest client has ``t``
  colluding neighbours and the honest survivors stay connected, and, except
  with probability ``2**-20``, every client keeps ``t`` live neighbours.
  Defaults: gamma = 0.1, delta = 0.3 (k = 14 of 19 at N = 20, 60 at 100,
  174 at 1,000; the complete graph, original SecAgg, up to N = 9). ``t > k/2`` always
  (enforced by :class:`SecAggParams`, also on the client): otherwise the server
  could collect t shares of a client's seed from one half of its neighbours
  and t of its mask key from the other half.
* Server: honest-but-curious. It follows the protocol (routes messages
  faithfully, reports the true survivor set, draws the graph seed at random)
  but tries to learn individual inputs from what it sees. Against that server
  plus the colluders above, with the probability above, the server learns only
  the sum of the surviving clients' inputs (and the colluders' own inputs).
  Pairwise masks cancel in the sum; an input arriving late (after the server
  declared its sender dropped) stays hidden behind ``b_i``, whose shares
  honest clients then never reveal.
* Checks that do not rely on the server's honesty: both the server and every
  client refuse to unmask a survivor set that is disconnected in the graph
  (each component's sum would leak); clients refuse overlapping survivor and
  dropped sets, sets naming nodes outside the session or omitting neighbours
  that sent them shares, fewer than ``min_survivors`` survivors, a list that
  omits themselves, a ``t <= k/2`` setup, and any message of another session.
* NOT protected: a malicious server. There is no signature/PKI step (the server
  could substitute public keys), no consistency round (it could tell different
  clients different survivor sets, or declare honest clients dropped to cut a
  target off while keeping the survivor graph connected through colluders),
  nothing stops it grinding graph seeds against known colluders, and no
  verification that the output is correct.
* The sum itself is revealed exactly; combine with DP noise if the sum of the
  survivors must not leak individual contributions (e.g. with few survivors).
* Quantisation clips each coordinate to ``[-clip_range, clip_range]``; see
  :mod:`common.secagg_codec` for the error bound and for
  :func:`~common.secagg_codec.clip_probability` (size the range for noise).
* Randomness: keys, seeds, Shamir coefficients, nonces and session ids come
  from the OS (``cryptography``, ``os.urandom``, ``secrets``); masks are
  AES-CTR keystreams; stochastic rounding uses an OS-seeded generator
  (:mod:`common.csprng`).
* Each round needs fresh key pairs and a fresh ``session_id``; the classes are
  single-use and enforce stage order.
"""

from __future__ import annotations

import functools
import hmac
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cryptography.exceptions import InvalidTag

from common.secagg_codec import FixedPointCodec, Segment, VectorPacker  # noqa: F401  (re-export)
from common.secagg_crypto import (
    INFO_ENC,
    INFO_MASK,
    SEED_LEN,
    SHARE_LEN,
    MaskExpander,
    agree,
    commit_seed,
    decrypt_from,
    encrypt_for,
    generate_keypair,
    is_connected,
    neighbour_graph,
    private_bytes,
    private_from_bytes,
    public_bytes,
    shamir_recover,
    shamir_split,
)

__all__ = [
    "FixedPointCodec",
    "Segment",
    "VectorPacker",
    "SecAggParams",
    "SecAggClient",
    "SecAggServer",
    "SecAggResult",
    "SecAggAbort",
    "SecAggProtocolError",
    "choose_neighbours",
    "default_neighbours",
]

STAGE = "stage"
SESSION = "session_id"


class SecAggAbort(RuntimeError):
    """Too many clients dropped (or the parameters cannot work): no sum this round."""


class SecAggProtocolError(RuntimeError):
    """A message arrived out of order or failed a consistency check."""


def default_neighbours(num_clients: int) -> int:
    """The log-degree heuristic k ~ 2*ceil(log2 N) (even; the full graph when that is >= N-1).

    This is the SecAgg+ rule of thumb (Flower's ``SecAggPlusWorkflow``
    default is of this order); it does NOT meet the bounds of
    :func:`choose_neighbours` at small N and is kept for like-for-like
    benchmarks against Flower. Sessions default to :func:`choose_neighbours`.
    """
    if num_clients <= 3:
        return num_clients - 1
    k = 2 * math.ceil(math.log2(num_clients))
    return num_clients - 1 if k >= num_clients - 1 else k


# Defaults of SecAggParams.create: the threat the graph is sized for.
COLLUDER_FRACTION = 0.1  # gamma: clients that may collude with the server
DROPOUT_FRACTION = 0.3  # delta: clients that may drop out (the strategy's secagg-max-dropout)
SECURITY_BITS = 40  # sigma: privacy fails with probability <= 2**-40 over the graph
CORRECTNESS_BITS = 20  # eta: an abort for too few live neighbours has probability <= 2**-20


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _hypergeom_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P(X >= at_least), X ~ Hypergeometric: marked ones among ``draws`` drawn without replacement."""
    lo, hi = max(at_least, 0, draws - (population - marked)), min(marked, draws)
    base = _log_comb(population, draws)
    total = sum(math.exp(_log_comb(marked, j) + _log_comb(population - marked, draws - j) - base) for j in range(lo, hi + 1))
    return min(1.0, total)


def _cut_off_bound(n: int, k: int, removed: int) -> float:
    """Upper bound on P(the honest survivors' subgraph of the ring is disconnected).

    The graph is a ring over a uniformly random cyclic order
    (:func:`common.secagg_crypto.neighbour_graph`): two nodes are neighbours
    when at most k/2 positions apart. Walk the survivors in ring order: two
    consecutive ones with g removed nodes (colluders and dropouts) between them
    are neighbours iff g < k/2. So the survivors stay connected unless at
    least two of these gaps are k/2 or longer; one long gap still leaves a path
    the other way round. Two such gaps contain two disjoint windows of k/2
    consecutive positions, all removed. There are at most C(n, 2) pairs of
    window starts, and ``removed`` nodes placed uniformly fill k given
    positions with probability ``(removed)_k / (n)_k`` (falling factorials).
    The union bound over the pairs is rigorous, with no independence
    assumption; it is 0 when fewer than k nodes are removed.
    """
    if removed < k:
        return 0.0
    log_fill = math.lgamma(removed + 1) - math.lgamma(removed - k + 1) - math.lgamma(n + 1) + math.lgamma(n - k + 1)
    return min(1.0, math.comb(n, 2) * math.exp(log_fill))


@functools.lru_cache(maxsize=64)
def choose_neighbours(
    num_clients: int,
    colluder_fraction: float = COLLUDER_FRACTION,
    dropout_fraction: float = DROPOUT_FRACTION,
    security_bits: int = SECURITY_BITS,
    correctness_bits: int = CORRECTNESS_BITS,
) -> tuple[int, int]:
    """The sparsest neighbour graph (k, t) that meets SecAgg+'s three conditions.

    Bell et al. 2020 size k and t so that, over the random graph, for a
    colluder fraction gamma and a dropout fraction delta: (1) no honest
    client has t colluding neighbours (they alone could rebuild both its
    seed and its mask key), (2) the honest survivors stay connected (a
    component cut off by colluders and dropouts would have its own sum
    revealed), both except with probability 2**-sigma; and (3) every client
    keeps t live neighbours, except with probability 2**-eta (else the round
    aborts). We recompute these bounds for our graph, a ring over a uniformly
    random order (each node's neighbours a uniform k-subset) drawn after the
    colluders are fixed and independently of the dropouts, with
    ceil(gamma N) colluders and ceil(delta N) dropouts:

    * (1) ``N * P(Hypergeom(N-1, colluders, k) >= t) <= 2**-sigma``;
    * (2) ``_cut_off_bound(...) <= 2**-sigma``;
    * (3) ``N * P(Hypergeom(N-1, dropouts, k) > k - t) <= 2**-eta``;

    with ``t`` the smallest threshold above k/2 that meets (1). Returns the
    smallest even k that meets all three, else the complete graph (original
    SecAgg: (2) holds trivially) with the smallest ``t > max(k/2, colluders)``,
    whose dropout tolerance ``k - t`` may then fall short of delta (the round
    aborts rather than leak). Raises ``ValueError`` if no threshold can keep
    the colluders below t. At the defaults (gamma 0.1, delta 0.3): k = 8 at
    N = 10, 14 at 20, 60 at 100, 174 at 1,000; from N = 100 on, (1) and (3)
    set k, and (2) is far below its limit.
    """
    if num_clients < 3 or not (0 <= colluder_fraction < 1 and 0 <= dropout_fraction < 1):
        raise ValueError("choose_neighbours needs >= 3 clients and fractions in [0, 1)")
    n = num_clients
    c, d = math.ceil(colluder_fraction * n), math.ceil(dropout_fraction * n)
    sec, cor = 2.0**-security_bits, 2.0**-correctness_bits
    honest = n - c - d
    for k in range(2, n - 1, 2):
        t = next((t for t in range(k // 2 + 1, k + 1) if n * _hypergeom_tail(n - 1, c, k, t) <= sec), None)
        if (
            t is not None
            and n * _hypergeom_tail(n - 1, d, k, k - t + 1) <= cor
            and honest > 0
            and _cut_off_bound(n, k, c + d) <= sec
        ):
            return k, t
    k = n - 1
    t = max(k // 2 + 1, c + 1)
    if t > k:
        raise ValueError("too many colluders: no threshold keeps them below it")
    return k, t


class _InvalidParam(ValueError):
    """A parameter check failed; names the field (and never its value)."""

    def __init__(self, field_name: str, why: str) -> None:
        super().__init__(f"{field_name} {why}")
        self.field, self.why = field_name, why


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


class _Fields:
    """Typed reads of one message's fields.

    Every problem (missing, wrong type, wrong length) is a
    :class:`SecAggProtocolError` naming the message and the field, never the
    value: a value is whatever a peer chose to send, and errors end up in logs.
    """

    def __init__(self, msg: Any, what: str, prefix: str = "") -> None:
        if not isinstance(msg, Mapping):
            raise SecAggProtocolError(f"{what}: not a mapping")
        self._msg, self._what, self._prefix = msg, what, prefix

    def error(self, key: str, why: str) -> SecAggProtocolError:
        return SecAggProtocolError(f"{self._what}: field {self._prefix + key!r} {why}")

    def _raw(self, key: str) -> Any:
        try:
            return self._msg[self._prefix + key]
        except KeyError:
            raise self.error(key, "is missing") from None

    def get_int(self, key: str) -> int:
        v = self._raw(key)
        if not _is_int(v):
            raise self.error(key, "must be an integer")
        return int(v)

    def get_bool(self, key: str) -> bool:
        v = self._raw(key)
        if not isinstance(v, bool):
            raise self.error(key, "must be a boolean")
        return v

    def get_float(self, key: str) -> float:
        v = self._raw(key)
        try:
            x = float(v) if _is_int(v) or isinstance(v, float) else math.nan
        except OverflowError:
            x = math.nan
        if not math.isfinite(x):
            raise self.error(key, "must be a finite number")
        return x

    def get_str(self, key: str, allowed: frozenset[str]) -> str:
        v = self._raw(key)
        if not isinstance(v, str) or v not in allowed:
            raise self.error(key, "is not one of " + ", ".join(map(repr, sorted(allowed))))
        return v

    def get_bytes(self, key: str, length: int | None = None, min_length: int = 0) -> bytes:
        v = self._raw(key)
        if not isinstance(v, (bytes, bytearray)):
            raise self.error(key, "must be bytes")
        if (length is not None and len(v) != length) or len(v) < min_length:
            raise self.error(key, "has the wrong length")
        return bytes(v)

    def _list(self, key: str, length: int | None, like: str | None) -> list:
        v = self._raw(key)
        if not isinstance(v, (list, tuple)):
            raise self.error(key, "must be a list")
        if length is not None and len(v) != length:
            raise self.error(key, f"must have one entry per entry of {self._prefix + like!r}" if like else "has the wrong length")
        return list(v)

    def get_ints(self, key: str, length: int | None = None, like: str | None = None, distinct: bool = True) -> list[int]:
        v = self._list(key, length, like)
        if not all(_is_int(i) for i in v):
            raise self.error(key, "must be a list of integers")
        out = [int(i) for i in v]
        if distinct and len(set(out)) != len(out):
            raise self.error(key, "lists a node twice")
        return out

    def get_blobs(self, key: str, length: int | None = None, like: str | None = None, item_len: int | None = None) -> list[bytes]:
        v = self._list(key, length, like)
        if not all(isinstance(b, (bytes, bytearray)) for b in v):
            raise self.error(key, "must be a list of bytes")
        if item_len is not None and any(len(b) != item_len for b in v):
            raise self.error(key, "holds an entry of the wrong length")
        return [bytes(b) for b in v]


@dataclass(frozen=True)
class SecAggParams:
    """Round parameters the server chooses and every client receives in the setup message."""

    session_id: bytes
    node_ids: tuple[int, ...]
    vector_len: int
    neighbours: int
    threshold: int
    graph_seed: bytes
    modulus_bits: int = 32
    clip_range: float = 8.0
    max_summands: int = 0  # 0 -> len(node_ids): the finest grid that cannot overflow
    stochastic_rounding: bool = True
    min_survivors: int = 0  # 0 -> threshold

    def __post_init__(self) -> None:
        # Every message names the field and never its value (see _Fields).
        ids = tuple(sorted(int(i) for i in self.node_ids))
        object.__setattr__(self, "node_ids", ids)
        if len(set(ids)) != len(ids):
            raise _InvalidParam("node_ids", "must be distinct")
        if any(not 0 <= i < 1 << 64 for i in ids):
            raise _InvalidParam("node_ids", "must be unsigned 64-bit integers (Flower node ids)")
        n = len(ids)
        if n < 3:
            raise _InvalidParam("node_ids", "must list at least 3 clients for secure aggregation")
        if self.max_summands == 0:
            object.__setattr__(self, "max_summands", n)
        if self.min_survivors == 0:
            object.__setattr__(self, "min_survivors", self.threshold)
        if self.max_summands < n:
            raise _InvalidParam("max_summands", "must be >= the number of clients")
        if not 1 <= self.min_survivors <= n:
            raise _InvalidParam("min_survivors", "must be between 1 and the number of clients")
        if self.neighbours < 2:
            raise _InvalidParam("neighbours", "must be at least 2")
        k = min(self.neighbours, n - 1)
        object.__setattr__(self, "neighbours", k)
        if k < n - 1 and k % 2:
            raise _InvalidParam("neighbours", "must be even for a sparse graph")
        if not k // 2 < self.threshold <= k:
            # t <= k/2 lets two disjoint halves of a neighbourhood each hold t
            # shares: a server could then get a client's self-mask seed from one
            # half and its mask key from the other, and unmask it without any
            # colluder. t <= k: the client must be able to reach t holders.
            raise _InvalidParam("threshold", "must be more than half the neighbourhood size and at most that size")
        if self.vector_len < 1:
            raise _InvalidParam("vector_len", "must be positive")
        if len(self.session_id) < 16:
            raise _InvalidParam("session_id", "needs >= 16 random bytes")
        if len(self.graph_seed) < 16:
            raise _InvalidParam("graph_seed", "needs >= 16 random bytes")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise _InvalidParam("clip_range", "must be a positive finite number")
        if not 2 <= self.modulus_bits <= 64:
            raise _InvalidParam("modulus_bits", "must be in [2, 64]")
        if (1 << self.modulus_bits) - 1 < self.max_summands:
            raise _InvalidParam("modulus_bits", "leaves no fixed-point grid for max_summands summands")

    @classmethod
    def create(
        cls,
        node_ids: Iterable[int],
        vector_len: int,
        *,
        neighbours: int | None = None,
        threshold: int | None = None,
        colluder_fraction: float = COLLUDER_FRACTION,
        dropout_fraction: float = DROPOUT_FRACTION,
        **kwargs: Any,
    ) -> "SecAggParams":
        """Fresh session: random session id and graph seed.

        Without ``neighbours``, (k, t) come from :func:`choose_neighbours` for
        the given colluder and dropout fractions; with it, t defaults to
        k//2 + 1 (t > k/2: the server can never obtain t shares of both b_i
        and s_sk_i from honest neighbours, even by splitting them in two).
        """
        ids = tuple(node_ids)
        if neighbours is None and len(ids) >= 3:
            k, t = choose_neighbours(len(ids), colluder_fraction, dropout_fraction)
        else:
            k = min(len(ids) - 1 if neighbours is None else neighbours, len(ids) - 1)
            t = k // 2 + 1
        t = t if threshold is None else threshold
        return cls(os.urandom(16), ids, vector_len, k, t, os.urandom(16), **kwargs)

    @property
    def codec(self) -> FixedPointCodec:
        return FixedPointCodec(self.clip_range, self.modulus_bits, self.max_summands, self.stochastic_rounding)

    @property
    def full_graph(self) -> bool:
        return self.neighbours >= len(self.node_ids) - 1

    def secure_id(self, node_id: int) -> int:
        # Flower node ids are arbitrary 64-bit values; the protocol needs small
        # distinct non-zero points for Shamir and a total order for mask signs.
        return self._sid[node_id]

    @property
    def _sid(self) -> dict[int, int]:
        cache = self.__dict__.get("_sid_cache")
        if cache is None:
            cache = {nid: i + 1 for i, nid in enumerate(self.node_ids)}
            object.__setattr__(self, "_sid_cache", cache)
        return cache

    def neighbours_of(self, node_id: int) -> frozenset[int]:
        # Each node's set is translated to node ids when first asked for: a device asks only for its
        # own, at every stage, from fresh params. Translating the whole graph for it was N * k set
        # insertions per device and stage, 72% of a device's secure-aggregation time at N = 1,000.
        cache = self.__dict__.get("_graph_cache")
        if cache is None:  # (the graph over secure ids, its sets translated so far)
            sg = neighbour_graph(len(self.node_ids), None if self.full_graph else self.neighbours, self.graph_seed)
            cache = (sg, {})
            object.__setattr__(self, "_graph_cache", cache)
        sg, translated = cache
        found = translated.get(node_id)
        if found is None:
            found = translated[node_id] = frozenset(self.node_ids[j - 1] for j in sg[self.secure_id(node_id)])
        return found

    def connected(self, members: Iterable[int]) -> bool:
        """Whether ``members`` with the graph's edges among them form one component.

        Unmasking a disconnected survivor set would reveal the sum of each
        component on its own: pairwise masks cancel within a component.
        """
        ms = set(members)
        return is_connected({i: self.neighbours_of(i) & ms for i in ms})

    def to_config(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "node_ids": list(self.node_ids),
            "vector_len": self.vector_len,
            "neighbours": self.neighbours,
            "threshold": self.threshold,
            "graph_seed": self.graph_seed,
            "modulus_bits": self.modulus_bits,
            "clip_range": float(self.clip_range),
            "max_summands": self.max_summands,
            "stochastic_rounding": bool(self.stochastic_rounding),
            "min_survivors": self.min_survivors,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, what: str = "setup", prefix: str = "") -> "SecAggParams":
        """Parse a setup message (or, with a ``prefix``, saved client state).

        Every problem is a :class:`SecAggProtocolError` that names the field.
        """
        f = _Fields(cfg, what, prefix)
        fields = dict(
            session_id=f.get_bytes("session_id"),
            node_ids=tuple(f.get_ints("node_ids")),
            vector_len=f.get_int("vector_len"),
            neighbours=f.get_int("neighbours"),
            threshold=f.get_int("threshold"),
            graph_seed=f.get_bytes("graph_seed"),
            modulus_bits=f.get_int("modulus_bits"),
            clip_range=f.get_float("clip_range"),
            max_summands=f.get_int("max_summands"),
            stochastic_rounding=f.get_bool("stochastic_rounding"),
            min_survivors=f.get_int("min_survivors"),
        )
        try:
            return cls(**fields)
        except _InvalidParam as err:
            raise f.error(err.field, err.why) from None


def _expect(msg: Any, stage: str, session_id: bytes) -> _Fields:
    """The message must be the named stage of this session; returns its field reader."""
    f = _Fields(msg, f"{stage!r} message")
    f.get_str(STAGE, frozenset({stage}))
    got = msg.get(SESSION)
    if not isinstance(got, bytes) or not hmac.compare_digest(got, session_id):
        # A stale message (an earlier round's, delivered late) or another session's.
        raise f.error(SESSION, "does not match this session")
    return f


# ============================================================== device half

CT_LEN = 12 + 2 * SHARE_LEN + 16  # nonce + (b share || s_sk share) + GCM tag
_CLIENT_STAGES = frozenset({"setup", "advertised", "shared", "masked", "unmasked", "closed"})
_ENDED = frozenset({"unmasked", "closed"})  # no secrets left; no stage can run
# What a client's state holds that must not outlive the round: its two private
# keys, its self-mask seed, its neighbours' shares (and, round-specific, their
# public keys).
SECRET_STATE_FIELDS = ("c_sk", "s_sk", "b", "peer_ids", "peer_c_pks", "peer_s_pks", "held_ids", "held_b", "held_sk")


class SecAggClient:
    """The device side of one secure-aggregation round (single use)."""

    def __init__(self, node_id: int, setup: Mapping[str, Any]) -> None:
        _Fields(setup, "setup").get_str(STAGE, frozenset({"setup"}))
        self.params = SecAggParams.from_config(setup)
        if node_id not in self.params.node_ids:
            raise SecAggProtocolError("setup: field 'node_ids' does not list this node: it was not sampled")
        self.node_id = node_id
        self.sid = self.params.secure_id(node_id)
        self.graph_neighbours = self.params.neighbours_of(node_id)
        self._stage = "setup"
        self._c_sk, self._c_pk = generate_keypair()
        self._s_sk, self._s_pk = generate_keypair()
        self._b = os.urandom(SEED_LEN)
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[bytes, bytes]] = {}  # src -> (b share, s_sk share)
        self.num_clipped = 0  # how many coordinates were clipped; stays on the device

    def _require(self, frm: str, to: str) -> None:
        """Stage order: checked before anything else, and nothing changes until the
        message has passed every check (a refused message does not consume the stage)."""
        if self._stage != frm:
            raise SecAggProtocolError(f"client is at stage {self._stage!r}, cannot run {to!r}")

    # -- persistence between stages
    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume at the next stage, as ConfigRecord-ready values.

        A Message-API ClientApp is re-entered for every message, so the object
        cannot live in memory between stages; keep this dict in
        ``context.state`` (it never leaves the device). Mid-round it holds the
        private keys, the self-mask seed and the neighbours' shares (as
        Flower's ``secaggplus_mod`` keeps there too). Once :meth:`unmask` has
        answered, or after :meth:`forget`, it holds only what is public or
        local: the session parameters, the node id, the stage and the local
        clip count; :meth:`clear_secrets` makes the same cut on a stored dict.
        """
        public = {
            **{f"p.{k}": v for k, v in self.params.to_config().items()},
            "node_id": self.node_id,
            "stage": self._stage,
            "num_clipped": self.num_clipped,
        }
        if self._stage in _ENDED:
            return public
        held = sorted(self._held)
        peers = sorted(self._peer_keys)
        return {
            **public,
            "c_sk": private_bytes(self._c_sk),
            "s_sk": private_bytes(self._s_sk),
            "b": self._b,
            "peer_ids": peers,
            "peer_c_pks": [self._peer_keys[i][0] for i in peers],
            "peer_s_pks": [self._peer_keys[i][1] for i in peers],
            "held_ids": held,
            "held_b": [self._held[i][0] for i in held],
            "held_sk": [self._held[i][1] for i in held],
        }

    def forget(self) -> None:
        """Drop the private keys, the seed, the peers' keys and the held shares.

        Afterwards no stage can run. Python cannot overwrite ``bytes`` in
        place, so this drops the references (the memory is freed, not wiped).
        """
        self._c_sk = self._s_sk = None
        self._c_pk = self._s_pk = self._b = b""
        self._peer_keys, self._held = {}, {}
        if self._stage != "unmasked":
            self._stage = "closed"

    @staticmethod
    def clear_secrets(state: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of a :meth:`to_state` dict without anything private (see :data:`SECRET_STATE_FIELDS`).

        For a caller whose round ended before :meth:`unmask` (an abort, a
        server that never asked): store the result over the old state. The
        client it resumes to is closed and refuses every stage.
        """
        out = {k: v for k, v in state.items() if k not in SECRET_STATE_FIELDS}
        if out.get("stage") != "unmasked":
            out["stage"] = "closed"
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "SecAggClient":
        """Resume from :meth:`to_state`; a damaged state is a :class:`SecAggProtocolError`."""
        f = _Fields(state, "client state")
        self = cls.__new__(cls)
        self.params = SecAggParams.from_config(state, what="client state", prefix="p.")
        self.node_id = f.get_int("node_id")
        if self.node_id not in self.params.node_ids:
            raise f.error("node_id", "is not in the session")
        self.sid = self.params.secure_id(self.node_id)
        self.graph_neighbours = self.params.neighbours_of(self.node_id)
        self._stage = f.get_str("stage", _CLIENT_STAGES)
        self.num_clipped = f.get_int("num_clipped")
        if self._stage in _ENDED:
            self.forget()
            return self
        self._c_sk = private_from_bytes(f.get_bytes("c_sk", 32))
        self._s_sk = private_from_bytes(f.get_bytes("s_sk", 32))
        self._c_pk, self._s_pk = public_bytes(self._c_sk), public_bytes(self._s_sk)
        self._b = f.get_bytes("b", SEED_LEN)
        peers = f.get_ints("peer_ids")
        if not set(peers) <= self.graph_neighbours:
            raise f.error("peer_ids", "lists a node that is not a neighbour")
        c_pks = f.get_blobs("peer_c_pks", len(peers), "peer_ids", 32)
        s_pks = f.get_blobs("peer_s_pks", len(peers), "peer_ids", 32)
        self._peer_keys = {i: (c, s) for i, c, s in zip(peers, c_pks, s_pks)}
        held = f.get_ints("held_ids")
        if not set(held) <= set(peers):
            raise f.error("held_ids", "lists a node whose keys are unknown")
        held_b = f.get_blobs("held_b", len(held), "held_ids", SHARE_LEN)
        held_sk = f.get_blobs("held_sk", len(held), "held_ids", SHARE_LEN)
        self._held = {i: (b, k) for i, b, k in zip(held, held_b, held_sk)}
        return self

    # -- stage 0 reply
    def advertise_keys(self) -> dict[str, Any]:
        self._require("setup", "advertised")
        self._stage = "advertised"
        p = self.params
        commit = commit_seed(p.session_id, self._b)
        return {STAGE: "advertise_keys", SESSION: p.session_id, "c_pk": self._c_pk, "s_pk": self._s_pk, "b_commit": commit}

    # -- stage 1
    def share_keys(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        self._require("advertised", "shared")
        p = self.params
        f = _expect(msg, "share_keys", p.session_id)
        ids = f.get_ints("ids")
        if not set(ids) <= self.graph_neighbours:
            # The graph follows from the setup message; a server adding peers
            # outside it would weaken SecAgg+'s per-neighbourhood threshold.
            raise f.error("ids", "lists nodes that are not my neighbours")
        c_pks = f.get_blobs("c_pks", len(ids), "ids", 32)
        s_pks = f.get_blobs("s_pks", len(ids), "ids", 32)
        if any(c == s for c, s in zip(c_pks, s_pks)):
            raise f.error("s_pks", "repeats a node's encryption key as its mask key")
        self._stage = "shared"
        if len(ids) < p.threshold:
            raise SecAggAbort(f"only {len(ids)} neighbours advertised keys; threshold is {p.threshold}")
        self._peer_keys = {nid: (c, s) for nid, c, s in zip(ids, c_pks, s_pks)}
        xs = [p.secure_id(n) for n in ids]
        b_shares = shamir_split(self._b, p.threshold, xs)
        sk_shares = shamir_split(private_bytes(self._s_sk), p.threshold, xs)
        dst, cts = [], []
        for nid, x in zip(ids, xs):
            key = agree(self._c_sk, self._peer_keys[nid][0], INFO_ENC, p.session_id)
            cts.append(encrypt_for(key, p.session_id, self.node_id, nid, b_shares[x] + sk_shares[x]))
            dst.append(nid)
        return {STAGE: "shares", SESSION: p.session_id, "dst": dst, "ciphertexts": cts}

    # -- stage 2
    def masked_input(
        self,
        msg: Mapping[str, Any],
        vector: np.ndarray | None = None,
        *,
        encoded: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Return the masked vector (for an ``ArrayRecord``).

        Pass the float ``vector`` to encode it with the session codec, or an
        already ``encoded`` integer vector (e.g. from a :class:`VectorPacker`
        built with the same ``modulus_bits`` and ``max_summands``). A bad
        message is a :class:`SecAggProtocolError`, a bad vector (the caller's
        own mistake) a ``ValueError``; neither consumes the stage.
        """
        self._require("shared", "masked")
        p = self.params
        f = _expect(msg, "masked_input", p.session_id)
        srcs = f.get_ints("src")
        if not set(srcs) <= set(self._peer_keys):
            raise f.error("src", "lists nodes whose keys I never received")
        blobs = f.get_blobs("ciphertexts", len(srcs), "src", CT_LEN)
        if (vector is None) == (encoded is None):
            raise ValueError("pass exactly one of vector / encoded")
        codec = p.codec
        if encoded is None:
            enc = codec.encode(np.asarray(vector).reshape(-1), rng)
            y, num_clipped = enc.values, enc.num_clipped
        else:
            e = np.asarray(encoded).reshape(-1)
            # Check before casting: a cast would silently wrap out-of-range values.
            if e.dtype.kind not in "ui" or (e.size and (int(e.min()) < 0 or int(e.max()) >> p.modulus_bits)):
                raise ValueError(f"encoded values must be integers in [0, 2**{p.modulus_bits})")
            y, num_clipped = e.astype(codec.dtype, copy=True), 0
        if y.shape != (p.vector_len,):
            raise ValueError(f"vector has {y.size} values, the session expects {p.vector_len}")

        held = {}
        for src, blob in zip(srcs, blobs):
            key = agree(self._c_sk, self._peer_keys[src][0], INFO_ENC, p.session_id)
            try:
                pt = decrypt_from(key, p.session_id, src, self.node_id, blob)
            except InvalidTag:
                raise f.error("ciphertexts", "holds a share that fails authentication") from None
            held[src] = (pt[:SHARE_LEN], pt[SHARE_LEN:])
        self._stage = "masked"
        self._held, self.num_clipped = held, num_clipped
        if len(held) < p.threshold:
            raise SecAggAbort(f"only {len(held)} neighbours shared keys; threshold is {p.threshold}")

        # Mask only with neighbours that completed share-keys: exactly those the
        # server can later unmask (it holds their shares' recipients).
        prg = MaskExpander(p.vector_len, p.modulus_bits)
        prg.add(y, self._b, +1)
        for src in self._held:
            seed = agree(self._s_sk, self._peer_keys[src][1], INFO_MASK, p.session_id)
            prg.add(y, seed, +1 if self.sid < p.secure_id(src) else -1)
        return y

    # -- stage 3
    def unmask(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        self._require("masked", "unmasked")
        p = self.params
        f = _expect(msg, "unmask", p.session_id)
        survivors = set(f.get_ints("survivors"))
        dropped = set(f.get_ints("dropped"))
        if not (survivors | dropped) <= set(p.node_ids):
            raise f.error("survivors", "or 'dropped' lists a node outside the session")
        if survivors & dropped:
            # Revealing both shares of one client would let the server strip all
            # of its masks: the core SecAgg invariant.
            raise f.error("survivors", "and 'dropped' overlap")
        if self.node_id not in survivors:
            raise f.error("survivors", "does not list me, yet I sent a masked input")
        if len(survivors) < p.min_survivors:
            raise f.error("survivors", "lists fewer nodes than min_survivors")
        if not p.connected(survivors):
            raise f.error("survivors", "are not connected in the neighbour graph: unmasking would reveal partial sums")
        if not set(self._held) <= survivors | dropped:
            # The server's dropped set is everyone who shared keys but sent no
            # masked input, so every neighbour that sent me shares is in one list.
            raise f.error("survivors", "and 'dropped' omit a neighbour that sent me shares")
        if not (survivors | dropped) & self.graph_neighbours <= set(self._held):
            raise f.error("survivors", "or 'dropped' lists a neighbour that never sent me shares")
        self._stage = "unmasked"
        b_ids, b_shares, sk_ids, sk_shares = [], [], [], []
        for src, (b_share, sk_share) in self._held.items():
            if src in survivors:
                b_ids.append(src)
                b_shares.append(b_share)
            else:
                sk_ids.append(src)
                sk_shares.append(sk_share)
        # The round is over for this client: nothing private is needed any more.
        self.forget()
        return {STAGE: "unmask_shares", SESSION: p.session_id, "b_ids": b_ids, "b_shares": b_shares, "sk_ids": sk_ids, "sk_shares": sk_shares}


# ============================================================== server half


@dataclass
class SecAggResult:
    sum: np.ndarray  # decoded float64 sum of the survivors' inputs
    modular_sum: np.ndarray  # exact sum of the encodings mod 2**bits (decode with a VectorPacker if used)
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]  # sent shares but no masked input; their masks were removed
    seconds: dict[str, float] = field(default_factory=dict)  # filled by benchmarks.secagg_driver


class SecAggServer:
    """The aggregator side of one round (single use). Sees keys, ciphertexts,
    masked vectors and shares of survivors' self-mask seeds / dropped clients'
    mask keys; never a plaintext input."""

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self._stage = "init"
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._commits: dict[int, bytes] = {}  # SHA-256 commitments to the self-mask seeds
        self._cts: dict[int, dict[int, bytes]] = {}  # src -> {dst: ciphertext}
        self._u1: set[int] = set()
        self._u2: set[int] = set()
        self._u3: set[int] = set()
        self._acc: np.ndarray | None = None
        self._b_shares: dict[int, dict[int, bytes]] = {}
        self._sk_shares: dict[int, dict[int, bytes]] = {}
        self._responders: set[int] = set()

    def _advance(self, frm: str, to: str) -> None:
        if self._stage != frm:
            raise SecAggProtocolError(f"server is at stage {self._stage!r}, cannot run {to!r}")
        self._stage = to

    def _check_neighbourhoods(self, members: set[int], active: set[int], what: str) -> None:
        t = self.params.threshold
        for nid in sorted(members):
            live = len(self.params.neighbours_of(nid) & active)
            if live < t:
                raise SecAggAbort(
                    f"too many dropouts {what}: a client has {live} live neighbours, threshold is {t}; "
                    f"{len(active)}/{len(self.params.node_ids)} clients remain"
                )

    # -- stage 0
    def setup_message(self) -> dict[str, Any]:
        self._advance("init", "setup")
        return {STAGE: "setup", **self.params.to_config()}

    def receive_keys(self, node_id: int, reply: Mapping[str, Any]) -> None:
        if self._stage != "setup" or node_id not in self.params.node_ids:
            raise SecAggProtocolError("unexpected key advertisement")
        f = _expect(reply, "advertise_keys", self.params.session_id)
        c_pk, s_pk = f.get_bytes("c_pk", 32), f.get_bytes("s_pk", 32)
        if c_pk == s_pk:
            raise f.error("s_pk", "repeats the encryption key: the two key pairs must differ")
        self._commits[node_id] = f.get_bytes("b_commit", 32)
        self._keys[node_id] = (c_pk, s_pk)

    # -- stage 1
    def share_keys_messages(self) -> dict[int, dict[str, Any]]:
        self._advance("setup", "share_keys")
        self._u1 = set(self._keys)
        self._check_neighbourhoods(self._u1, self._u1, "before key sharing")
        out = {}
        for nid in self._u1:
            peers = sorted(self.params.neighbours_of(nid) & self._u1)
            out[nid] = {
                STAGE: "share_keys",
                SESSION: self.params.session_id,
                "ids": peers,
                "c_pks": [self._keys[j][0] for j in peers],
                "s_pks": [self._keys[j][1] for j in peers],
            }
        return out

    def receive_shares(self, node_id: int, reply: Mapping[str, Any]) -> None:
        if self._stage != "share_keys" or node_id not in self._u1:
            raise SecAggProtocolError("unexpected shares")
        f = _expect(reply, "shares", self.params.session_id)
        dst = f.get_ints("dst")
        if set(dst) != self.params.neighbours_of(node_id) & self._u1:
            # A partial share set would leave some neighbours unable to help
            # unmask; treat the sender as dropped rather than guess.
            raise f.error("dst", "must address exactly the sender's live neighbours")
        cts = f.get_blobs("ciphertexts", len(dst), "dst", CT_LEN)
        self._cts[node_id] = dict(zip(dst, cts))

    # -- stage 2
    def masked_input_messages(self) -> dict[int, dict[str, Any]]:
        self._advance("share_keys", "masked_input")
        self._u2 = set(self._cts)
        self._check_neighbourhoods(self._u2, self._u2, "during key sharing")
        out = {}
        for nid in self._u2:
            srcs = sorted(s for s in self.params.neighbours_of(nid) & self._u2)
            out[nid] = {STAGE: "masked_input", SESSION: self.params.session_id, "src": srcs, "ciphertexts": [self._cts[s][nid] for s in srcs]}
        return out

    def receive_masked_input(self, node_id: int, masked: np.ndarray) -> None:
        if self._stage != "masked_input" or node_id not in self._u2 or node_id in self._u3:
            raise SecAggProtocolError("unexpected masked input")
        p = self.params
        if not isinstance(masked, np.ndarray) or masked.dtype != p.codec.dtype or masked.shape != (p.vector_len,):
            raise SecAggProtocolError(f"masked input must be a {np.dtype(p.codec.dtype).name} array of the session's vector_len")
        y = masked
        # Running sum: memory stays O(vector) however many clients report.
        if self._acc is None:
            self._acc = y.copy()
        else:
            np.add(self._acc, y, out=self._acc)
        self._u3.add(node_id)

    # -- stage 3
    def unmask_messages(self) -> dict[int, dict[str, Any]]:
        self._advance("masked_input", "unmask")
        p = self.params
        if len(self._u3) < p.min_survivors:
            raise SecAggAbort(f"only {len(self._u3)} masked inputs arrived; need {p.min_survivors}")
        self._check_neighbourhoods(self._u2, self._u3, "before unmasking")
        if not p.connected(self._u3):
            # Pairwise masks cancel within each component, so unmasking would
            # hand out each component's own sum; the clients refuse it too.
            raise SecAggAbort("the survivors are not connected in the neighbour graph: unmasking would reveal partial sums")
        survivors, dropped = sorted(self._u3), sorted(self._u2 - self._u3)
        return {nid: {STAGE: "unmask", SESSION: p.session_id, "survivors": survivors, "dropped": dropped} for nid in self._u3}

    def receive_unmask(self, node_id: int, reply: Mapping[str, Any]) -> None:
        if self._stage != "unmask" or node_id not in self._u3 or node_id in self._responders:
            raise SecAggProtocolError("unexpected unmask reply")
        f = _expect(reply, "unmask_shares", self.params.session_id)
        nb = self.params.neighbours_of(node_id)
        b_ids = f.get_ints("b_ids")
        b_shares = f.get_blobs("b_shares", len(b_ids), "b_ids", SHARE_LEN)
        sk_ids = f.get_ints("sk_ids")
        sk_shares = f.get_blobs("sk_shares", len(sk_ids), "sk_ids", SHARE_LEN)
        # An honest client reveals seed shares of survivors and key shares of
        # the dropped, and only for its own neighbours.
        if not set(b_ids) <= self._u3 & nb:
            raise f.error("b_ids", "lists a node that is not a surviving neighbour")
        if not set(sk_ids) <= (self._u2 - self._u3) & nb:
            raise f.error("sk_ids", "lists a node that is not a dropped neighbour")
        x = self.params.secure_id(node_id)
        for src, share in zip(b_ids, b_shares):
            self._b_shares.setdefault(src, {})[x] = share
        for src, share in zip(sk_ids, sk_shares):
            self._sk_shares.setdefault(src, {})[x] = share
        self._responders.add(node_id)

    def _recover(self, shares: dict[int, bytes], secret_len: int, verify: Callable[[bytes], bool], what: str) -> bytes:
        """Reconstruct from any t shares that verify (corrupt shares are skipped)."""
        try:
            return shamir_recover(shares, self.params.threshold, secret_len, verify)
        except ValueError as err:
            raise SecAggAbort(f"could not reconstruct a client's {what}: {err} (too many corrupt shares)") from None

    def finalize(self) -> SecAggResult:
        self._advance("unmask", "done")
        p = self.params
        t = p.threshold
        dropped = self._u2 - self._u3
        for group, shares, what in ((self._u3, self._b_shares, "self-mask seed"), (dropped, self._sk_shares, "mask key")):
            for nid in group:
                got = len(shares.get(nid, {}))
                if got < t:
                    raise SecAggAbort(
                        f"too many dropouts during unmasking: {got} shares of a client's {what}, threshold is {t}"
                    )
        acc = self._acc
        assert acc is not None  # unmask_messages guarantees >= min_survivors inputs
        prg = MaskExpander(p.vector_len, p.modulus_bits)
        for nid in sorted(self._u3):
            commit = self._commits[nid]
            b = self._recover(self._b_shares[nid], SEED_LEN, lambda v, c=commit: hmac.compare_digest(commit_seed(p.session_id, v), c), "self-mask seed")
            prg.add(acc, b, -1)
        for nid in sorted(dropped):
            s_pk = self._keys[nid][1]
            raw = self._recover(self._sk_shares[nid], 32, lambda v, pk=s_pk: public_bytes(private_from_bytes(v)) == pk, "mask key")
            sk = private_from_bytes(raw)
            sid = p.secure_id(nid)
            for j in sorted(p.neighbours_of(nid) & self._u3):
                seed = agree(sk, self._keys[j][1], INFO_MASK, p.session_id)
                # j added +PRG(s_ij) when u_j < u_i and -PRG otherwise; undo it.
                prg.add(acc, seed, -1 if p.secure_id(j) < sid else +1)
        n = len(self._u3)
        return SecAggResult(
            sum=p.codec.decode_sum(acc, n),
            modular_sum=acc,
            survivors=tuple(sorted(self._u3)),
            dropped=tuple(sorted(dropped)),
        )

"""Cryptographic building blocks of secure aggregation (see :mod:`common.secagg`).

* X25519 key agreement + HKDF-SHA256 (``cryptography``) for per-pair mask seeds
  and per-pair share-encryption keys, domain-separated and bound to the session.
* AES-256-GCM (``cryptography``) to carry Shamir shares through the server.
* AES-256-CTR keystream as the mask PRG: OpenSSL's AES-NI path produces the
  1.8 MB of a 460,800-word mask in ~0.3 ms, and ``np.frombuffer`` turns it into
  words without a Python loop. (Flower's SecAgg+ seeds ``np.random.RandomState``
  with a 32-bit XOR-fold of the key, which is both slower and a weak PRG.)
* Shamir secret sharing over the prime field GF(2**521 - 1). Flower ships
  ``flwr.common.secure_aggregation.crypto.shamir`` (pycryptodome, GF(2**128),
  16-byte chunks, a thread pool per call); measured here it takes ~5 ms to split
  and ~17 ms to combine one 32-byte secret, which alone would exceed our whole
  per-round budget at N=10. A single Mersenne-prime field element holds a
  32-byte secret, so split/combine are a handful of big-int operations.
* The SecAgg+ neighbour graph (Bell et al. 2020): a ring over a random order
  derived from the session's graph seed with SHA-256/AES-CTR only, so every
  party on any Python/numpy version derives the same one.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
import secrets
from collections.abc import Callable, Mapping, Sequence, Set

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# Distinct HKDF "info" strings: a mask seed and an encryption key derived from
# the same Diffie-Hellman secret must be independent.
INFO_MASK = b"fedpersona/secagg/v1/pairwise-mask"
INFO_ENC = b"fedpersona/secagg/v1/share-encryption"
COMMIT_DOMAIN = b"fedpersona/secagg/v1/self-mask-commitment"
SEED_LEN = 32
KEY_LEN = 32

# --------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    sk = X25519PrivateKey.generate()
    return sk, public_bytes(sk)


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(sk: X25519PrivateKey, peer_pk: bytes, info: bytes, session_id: bytes) -> bytes:
    """HKDF-SHA256(X25519(sk, peer_pk)) -> 32 bytes, salted with the session id.

    Symmetric in the two parties (X25519 is), so i and j derive the same value.
    The session id as salt makes a (hypothetically) reused key pair still yield
    fresh seeds in every round.
    """
    shared = sk.exchange(X25519PublicKey.from_public_bytes(peer_pk))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=session_id, info=info).derive(shared)


# ---------------------------------------------------------------- share transport


def _aad(session_id: bytes, src: int, dst: int) -> bytes:
    # Binding (session, src, dst) stops the server replaying a ciphertext in
    # another round or re-addressing it to a different client.
    return session_id + src.to_bytes(8, "big") + dst.to_bytes(8, "big")


def encrypt_for(key: bytes, session_id: bytes, src: int, dst: int, plaintext: bytes) -> bytes:
    # i->j and j->i share one key, so the nonce must be random, not a counter.
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(session_id, src, dst))


def decrypt_from(key: bytes, session_id: bytes, src: int, dst: int, blob: bytes) -> bytes:
    return AESGCM(key).decrypt(blob[:12], blob[12:], _aad(session_id, src, dst))


# ------------------------------------------------------------------------- masks


class MaskExpander:
    """Expands 32-byte seeds into uniform vectors mod 2**bits and adds them in place.

    Holds one zero input and one output buffer per vector length, so a round
    allocates nothing per mask: each expansion is one OpenSSL call plus one
    numpy add.
    """

    def __init__(self, length: int, modulus_bits: int) -> None:
        self.length = length
        self.bits = modulus_bits
        self.dtype = np.uint32 if modulus_bits <= 32 else np.uint64
        self.nbytes = length * np.dtype(self.dtype).itemsize
        self._zeros = bytes(self.nbytes)
        # update_into needs len(data) + block_size - 1 bytes of room.
        self._buf = bytearray(self.nbytes + 15)
        self._words = np.frombuffer(self._buf, dtype=self.dtype, count=length)
        full = self.bits in (32, 64)
        self._bitmask = None if full else self.dtype((1 << self.bits) - 1)

    def expand(self, seed: bytes) -> np.ndarray:
        """Return a view of the (reused) buffer holding PRG(seed); copy it to keep it."""
        if len(seed) != SEED_LEN:
            raise ValueError("mask seeds are 32 bytes")
        # A fresh key per seed, so a fixed all-zero counter block never repeats a
        # (key, counter) pair.
        enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        enc.update_into(self._zeros, self._buf)
        if self._bitmask is not None:
            np.bitwise_and(self._words, self._bitmask, out=self._words)
        return self._words

    def add(self, acc: np.ndarray, seed: bytes, sign: int) -> None:
        """acc <- acc + sign * PRG(seed)  (mod 2**bits)."""
        m = self.expand(seed)
        if sign > 0:
            np.add(acc, m, out=acc)
        else:
            np.subtract(acc, m, out=acc)
        if self._bitmask is not None:
            np.bitwise_and(acc, self._bitmask, out=acc)


# ------------------------------------------------------------------------ Shamir

SHAMIR_PRIME = (1 << 521) - 1  # Mersenne prime M521; holds any secret up to 65 bytes
SHARE_LEN = 66  # ceil(521 / 8)
MAX_SECRET_LEN = 65


def shamir_split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Split ``secret`` so that any ``threshold`` of the points ``xs`` recover it.

    ``xs`` are the public, distinct, non-zero evaluation points (we use the
    holders' secure ids). Coefficients come from ``secrets``: t-1 shares are then
    uniformly distributed and independent of the secret.
    """
    if len(secret) > MAX_SECRET_LEN:
        raise ValueError("secret too long for the field")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < SHAMIR_PRIME for x in xs):
        raise ValueError("evaluation points must be distinct and non-zero")
    p = SHAMIR_PRIME
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(p) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % p
        out[x] = y.to_bytes(SHARE_LEN, "big")
    return out


def _differences_products(xs: tuple[int, ...]) -> list[int]:
    """``[prod_{j != i} (x_j - x_i) for each x_i]`` as exact integers.

    Share points are secure ids (small integers), so the differences fit in a
    few bits: numpy multiplies them in int64 groups that cannot overflow and
    Python multiplies the ~t/6 partial products per row, instead of t**2
    big-int steps. Points too large for that take the plain Python product.
    """
    t = len(xs)
    width = (max(xs) - min(xs)).bit_length() + 1  # bits of |x_j - x_i|, sign included
    group = 62 // width if t > 1 else 0
    if group < 2:
        return [math.prod(xj - xi for xj in xs if xj != xi) for xi in xs]
    x = np.array([v - xs[0] for v in xs], dtype=np.int64)  # shifted: only differences matter
    diff = x[None, :] - x[:, None]  # row i: x_j - x_i
    np.fill_diagonal(diff, 1)
    pad = -t % group
    if pad:
        diff = np.concatenate([diff, np.ones((t, pad), dtype=np.int64)], axis=1)
    partial = diff.reshape(t, -1, group).prod(axis=2)  # |product| < 2**(group * (width - 1)) <= 2**62
    return [math.prod(row) for row in partial.tolist()]


@functools.lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange coefficients ``L_i(0) = prod_{j != i} x_j / (x_j - x_i)`` mod p for sorted points ``xs``.

    Cached: every secret shared among the same holders (the complete graph's
    survivors, say) reuses them, and a secret costs ``t`` multiplications.
    The t denominators are inverted together (Montgomery's trick: one modular
    inverse and 3(t - 1) multiplications).
    """
    p = SHAMIR_PRIME
    # L_i(0) = (prod_j x_j) / (x_i prod_{j != i} (x_j - x_i)): one product, t inverses.
    dens = [xi * d % p for xi, d in zip(xs, _differences_products(xs))]  # non-zero: distinct points in (0, p)
    prefix = [1] * (len(xs) + 1)
    for i, d in enumerate(dens):
        prefix[i + 1] = prefix[i] * d % p
    inv = pow(prefix[-1], -1, p)
    total = math.prod(xs) % p
    coeffs = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        coeffs[i] = inv * prefix[i] % p * total % p
        inv = inv * dens[i] % p
    return tuple(coeffs)


def _interpolate_at_zero(points: Mapping[int, int]) -> int:
    """The value at 0 of the polynomial of degree < len(points) through ``points`` (x -> y), mod p."""
    xs = tuple(sorted(points))
    return sum(points[x] * c for x, c in zip(xs, _lagrange_at_zero(xs))) % SHAMIR_PRIME


def shamir_combine(shares: Mapping[int, bytes], threshold: int, secret_len: int) -> bytes:
    """Recover a ``secret_len``-byte secret from at least ``threshold`` shares.

    Fewer than ``threshold`` shares raise. Interpolating a wrong set (too few
    points, or a corrupted share) yields an essentially uniform element of a
    521-bit field, which lies below ``256**secret_len`` with probability
    ``2**(8*secret_len - 521)``; that range check turns silent garbage into an
    error.
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares to reconstruct, got {len(shares)}")
    pts = {int(x): int.from_bytes(y, "big") for x, y in shares.items()}
    if any(y >= SHAMIR_PRIME for y in pts.values()):
        raise ValueError("share value outside the field")
    value = _interpolate_at_zero(pts)
    if value >= 1 << (8 * secret_len):
        raise ValueError("shares are inconsistent: reconstruction fell outside the secret space")
    return value.to_bytes(secret_len, "big")


MAX_RECOVERY_TRIES = 20_000


def shamir_recover(
    shares: Mapping[int, bytes], threshold: int, secret_len: int, verify: Callable[[bytes], bool]
) -> bytes:
    """Recover a secret from shares of which some may be corrupt.

    ``verify`` recognises the true secret (a hash commitment, or the public key
    of a private key). Shares that cannot be field elements are dropped; then
    t-subsets are interpolated in colex order (by their largest point, so all
    subsets of the first ``t + b`` points come before any later point) until
    one reconstructs a secret that verifies. With ``b`` bad shares among the
    first points that takes at most ``C(t + b, b)`` interpolations; the search
    stops after :data:`MAX_RECOVERY_TRIES`. A verified secret is the true one
    whatever the bad shares were (a commitment cannot be opened two ways), so
    this needs no bound on the number of bad shares, only ``t`` good ones.

    Raises ``ValueError`` when no subset verifies (fewer than t good shares).
    """
    pts = {}
    for x, y in shares.items():
        v = int.from_bytes(y, "big")
        if len(y) == SHARE_LEN and v < SHAMIR_PRIME:
            pts[int(x)] = v
    xs = sorted(pts)
    tries = 0
    for top in range(threshold - 1, len(xs)):
        for rest in itertools.combinations(xs[:top], threshold - 1):
            value = _interpolate_at_zero({x: pts[x] for x in (*rest, xs[top])})
            if value < 1 << (8 * secret_len):
                secret = value.to_bytes(secret_len, "big")
                if verify(secret):
                    return secret
            tries += 1
            if tries >= MAX_RECOVERY_TRIES:
                raise ValueError(f"gave up after {tries} subsets of {len(shares)} shares: none verifies")
    raise ValueError(f"no {threshold} of its {len(shares)} shares reconstruct a secret that verifies")


def commit_seed(session_id: bytes, seed: bytes) -> bytes:
    """SHA-256 commitment to a self-mask seed, published with the keys.

    The 32-byte seed is uniformly random, so the hash hides it; SHA-256's
    collision resistance binds the client to it, so the server recognises the
    true seed among reconstructions from partly corrupt shares.
    """
    return hashlib.sha256(COMMIT_DOMAIN + session_id + seed).digest()


# ------------------------------------------------------------------------- graph

GRAPH_DOMAIN = b"fedpersona/secagg/v2/neighbour-graph"  # v2: the ring over a seeded order (v1 added a switch chain)


class _SeededInts:
    """Deterministic uniform integers from a seed: AES-256-CTR keyed by SHA-256(domain || seed).

    Every party must derive the same graph from the setup message, on any
    platform and any Python/numpy version; numpy's seeded generators do not
    promise stable streams across releases, SHA-256 and AES do.
    """

    def __init__(self, seed: bytes, domain: bytes) -> None:
        key = hashlib.sha256(domain + seed).digest()
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def words(self, count: int) -> list[int]:
        """``count`` uniform 64-bit integers (big-endian words of the keystream)."""
        return np.frombuffer(self._enc.update(bytes(8 * count)), dtype=">u8").tolist()


def is_connected(adj: Mapping[int, Set[int]]) -> bool:
    """Whether the graph given as node -> neighbours (all inside the mapping) is connected."""
    if not adj:
        return False
    start = next(iter(adj))
    seen, todo = {start}, [start]
    while todo:
        for j in adj[todo.pop()] - seen:
            seen.add(j)
            todo.append(j)
    return len(seen) == len(adj)


def neighbour_graph(num_nodes: int, k: int | None, seed: bytes) -> dict[int, frozenset[int]]:
    """Neighbours of each secure id ``1..num_nodes``; same inputs -> same graph (see :func:`_draw_graph`)."""
    return dict(zip(range(1, num_nodes + 1), _draw_graph(num_nodes, k, bytes(seed))))


@functools.lru_cache(maxsize=8)  # a stateless ClientApp re-derives the graph at every stage
def _draw_graph(num_nodes: int, k: int | None, seed: bytes) -> tuple[frozenset[int], ...]:
    """The neighbour sets of secure ids ``1..num_nodes``, in order.

    ``k is None`` or ``k >= num_nodes - 1`` gives the complete graph (original
    SecAgg). Otherwise SecAgg+'s sparse graph as Flower's
    ``SecAggPlusWorkflow`` builds it: a Harary ring, each node joined to the
    k/2 nodes on either side of it in a random cyclic order. Here the order
    comes from the seed (so every party derives the same graph, and the server
    need not send it) instead of from the server's ``random.shuffle``.

    Why this graph suffices. The guarantee (:func:`common.secagg.choose_neighbours`)
    is over the random order, drawn after the colluders are fixed and
    independently of the dropouts. In a uniformly random order each node's
    k neighbours are a uniformly random k-subset of the others, so the counts
    of colluding and of dropped neighbours are exactly hypergeometric; and the
    honest survivors are disconnected exactly when two of the gaps between
    cyclically consecutive survivors are k/2 or longer, which has a simple
    exact bound. A ring is not an expander: colluders chosen *after* seeing
    the order could cut off an arc with k of them, as k colluders chosen after
    seeing any k-regular graph cut off one node; both are outside the model
    (README, "Assumptions and limits"). The ring costs O(N k) to build; the
    random-regular-graph switch chain it replaces cost 1.4 s per party per
    round at N = 1,000 (docs/results.md, issue 15 (d)).
    """
    ids = range(1, num_nodes + 1)
    if k is None or k >= num_nodes - 1:
        return tuple(frozenset(j for j in ids if j != i) for i in ids)
    if k < 2 or k % 2:
        raise ValueError("a sparse graph needs an even number of neighbours k >= 2")
    rng = _SeededInts(seed, GRAPH_DOMAIN)
    order = np.array([i for _, i in sorted(zip(rng.words(num_nodes), ids))])  # a uniformly random permutation
    offsets = np.concatenate([np.arange(-(k // 2), 0), np.arange(1, k // 2 + 1)])
    rows = order[(np.arange(num_nodes)[:, None] + offsets[None, :]) % num_nodes]  # neighbours of order[p]
    graph = dict(zip(order.tolist(), map(frozenset, rows.tolist())))
    return tuple(graph[i] for i in ids)

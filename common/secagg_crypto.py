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
* The SecAgg+ neighbour graph (Bell et al. 2020): a random k-regular graph
  derived from the session's graph seed with SHA-256/AES-CTR only, so every
  party on any Python/numpy version derives the same one.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
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


def _interpolate_at_zero(points: Mapping[int, int]) -> int:
    p = SHAMIR_PRIME
    xs = list(points)
    total = 0
    for xi in xs:
        num, den = 1, 1
        for xj in xs:
            if xj != xi:
                num = num * (-xj) % p
                den = den * (xi - xj) % p
        total = (total + points[xi] * num * pow(den, -1, p)) % p
    return total


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

GRAPH_DOMAIN = b"fedpersona/secagg/v1/neighbour-graph"
SWITCHES_PER_EDGE = 10


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

    def below(self, m: int, count: int) -> list[int]:
        """``count`` uniform draws from ``[0, m)``, ``m < 2**64``: rejection
        sampling on 64-bit words, so no modulo bias."""
        limit = (1 << 64) - (1 << 64) % m
        out: list[int] = []
        while len(out) < count:
            need = count - len(out)
            out.extend(w % m for w in self.words(need + need // 8 + 8) if w < limit)
        return out[:count]


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
    SecAgg). Otherwise a random k-regular graph (SecAgg+), connected:

    1. a Harary ring (each node joined to the k/2 nearest on either side) over a
       seeded random order: k-regular, simple, connected;
    2. ``SWITCHES_PER_EDGE`` x |E| attempted double-edge switches
       ``{a,b},{c,d} -> {a,c},{b,d}`` (refused when they would create a loop or
       a double edge). Switches keep every degree at exactly k, and this
       Markov chain converges to the uniform distribution over k-regular
       graphs (it is irreducible and symmetric; Cooper, Dyer & Greenhill
       2007 prove rapid mixing). Each switch replaces two edges, so after 10
       attempts per edge essentially no ring edge is left: the tests measure
       the second eigenvalue, which lands near a random regular graph's
       ``2 sqrt(k - 1)`` (Friedman 2008), where the ring's is almost ``k``;
    3. more switches while the result is disconnected (rare but possible for
       small k).

    Why this graph. The ring it replaces has connectivity k whatever N is, so
    2 x k/2 colluders consecutive in ring order cut off the arc between them.
    Random k-regular graphs are, with high probability, k-connected expanders,
    and removing colluders and dropouts chosen independently of the graph
    leaves the honest survivors connected except with the probability bounded
    in :func:`common.secagg.choose_neighbours`. An Erdos-Renyi graph
    ``G(N, k/(N-1))`` (edges drawn independently, the easiest model to bound)
    expands as well but has binomial degrees: at N = 10-100 some client would
    get far fewer than t neighbours and the round would abort without any
    dropout. A union of k/2 random Hamiltonian cycles repeats edges, so its
    degrees fall below k too. Exact regularity gives every client the same
    margin between k and t.
    """
    ids = range(1, num_nodes + 1)
    if k is None or k >= num_nodes - 1:
        return tuple(frozenset(j for j in ids if j != i) for i in ids)
    if k < 2 or k % 2:
        raise ValueError("a sparse graph needs an even number of neighbours k >= 2")
    rng = _SeededInts(seed, GRAPH_DOMAIN)
    order = [i for _, i in sorted(zip(rng.words(num_nodes), ids))]  # a random permutation
    adj: dict[int, set[int]] = {i: set() for i in ids}
    edges: list[tuple[int, int]] = []
    for p in range(num_nodes):
        for o in range(1, k // 2 + 1):
            a, b = order[p], order[(p + o) % num_nodes]
            adj[a].add(b)
            adj[b].add(a)
            edges.append((a, b))
    m = len(edges)
    for _ in range(100):
        tries = SWITCHES_PER_EDGE * m
        for e, f, flip in zip(rng.below(m, tries), rng.below(m, tries), rng.below(2, tries)):
            a, b = edges[e]
            d, c = edges[f] if flip else edges[f][::-1]
            if a == c or b == d or a == d or b == c or c in adj[a] or d in adj[b]:
                continue
            adj[a].remove(b)
            adj[b].remove(a)
            adj[c].remove(d)
            adj[d].remove(c)
            adj[a].add(c)
            adj[c].add(a)
            adj[b].add(d)
            adj[d].add(b)
            edges[e], edges[f] = (a, c), (b, d)
        if is_connected(adj):
            return tuple(frozenset(adj[i]) for i in ids)
    raise RuntimeError("could not draw a connected neighbour graph")  # pragma: no cover  (practically never)

"""The SecAgg+ neighbour graph: a ring over a seeded random order, with k chosen from Bell et al.'s conditions.

What the guarantee needs from the graph (``common.secagg.choose_neighbours``):
each node's neighbours are a uniformly random k-subset (so the colluding and
the dropped neighbours are hypergeometric), and the honest survivors stay
connected except with the probability of ``_cut_off_bound``. The tests check
the ring's shape, the uniformity of a neighbourhood, the exact cut condition
and the bound by enumeration, and the outcome by sampling at the sizes
``choose_neighbours`` picks. No k-regular graph survives k colluders chosen
*after* seeing it (a node's own neighbourhood cuts it off), which is why the
colluders are fixed before the order is drawn.
"""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pytest

from common.secagg import SecAggParams, choose_neighbours
from common.secagg_crypto import neighbour_graph


def _components(nodes: set[int], graph: dict[int, frozenset[int]]) -> list[set[int]]:
    """Connected components of the subgraph induced on ``nodes``."""
    left, out = set(nodes), []
    while left:
        todo = [left.pop()]
        comp = set(todo)
        while todo:
            for j in graph[todo.pop()] & left:
                left.discard(j)
                comp.add(j)
                todo.append(j)
        out.append(comp)
    return out


def _long_gaps(removed: set[int], ring_order: list[int], k: int) -> int:
    """Gaps of at least k/2 removed nodes between cyclically consecutive survivors."""
    alive = [p for p, i in enumerate(ring_order) if i not in removed]
    n = len(ring_order)
    return sum((alive[(q + 1) % len(alive)] - alive[q] - 1) % n >= k // 2 for q in range(len(alive)))


def _ring_order(graph: dict[int, frozenset[int]], k: int) -> list[int]:
    """Recover the cyclic order of a ring: walk to the unique unvisited neighbour
    that shares k - 2 neighbours with the current node (its ring successor)."""
    start = next(iter(graph))
    order = [start]
    while len(order) < len(graph):
        cur = order[-1]
        nxt = [j for j in graph[cur] if j not in order and len(graph[cur] & graph[j]) == k - 2]
        assert nxt, "not a ring"
        order.append(nxt[0])
    return order


@pytest.mark.parametrize(("n", "k"), [(12, 4), (40, 10), (101, 30)])
def test_graph_is_a_ring_over_a_seeded_order(n, k):
    seed = hashlib.sha256(b"ring-%d-%d" % (n, k)).digest()
    g = neighbour_graph(n, k, seed)
    assert all(len(nb) == k and i not in nb and all(i in g[j] for j in nb) for i, nb in g.items())
    order = _ring_order(g, k)
    pos = {i: p for p, i in enumerate(order)}
    for i, nb in g.items():  # exactly the k/2 on either side
        assert {(pos[j] - pos[i]) % n for j in nb} == set(range(1, k // 2 + 1)) | set(range(n - k // 2, n))
    assert neighbour_graph(n, k, seed) == g and neighbour_graph(n, k, seed[::-1]) != g


def test_a_neighbourhood_is_a_uniform_k_subset():
    """The bounds of choose_neighbours use that each node's neighbours are a
    uniformly random k-subset of the others: count how often node 1 neighbours
    each other node over many seeds (expected k/(n-1) each)."""
    n, k, trials = 11, 4, 3000
    hits = np.zeros(n + 1)
    for trial in range(trials):
        for j in neighbour_graph(n, k, b"uniform-%d" % trial)[1]:
            hits[j] += 1
    expected = trials * k / (n - 1)
    chi2 = float(((hits[2:] - expected) ** 2 / expected).sum())
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


@pytest.mark.parametrize(("n", "k"), [(12, 4), (14, 6), (16, 4)])
def test_the_cut_bound_is_exact_where_it_can_be_enumerated(n, k):
    """On a ring every removed set of each size is equally likely (the order is
    uniform), so enumerate them all: the survivors are disconnected exactly when
    two gaps are k/2 or longer, and the frequency stays under _cut_off_bound."""
    from common.secagg import _cut_off_bound

    g = neighbour_graph(n, k, b"enumerate")
    order = _ring_order(g, k)
    for r in range(0, n - 1):
        cut = 0
        sets = list(itertools.combinations(range(1, n + 1), r))
        for removed in map(set, sets):
            split = len(_components(set(g) - removed, g)) > 1
            assert split == (_long_gaps(removed, order, k) >= 2), (r, removed)
            cut += split
        assert cut / len(sets) <= _cut_off_bound(n, k, r) + 1e-12, (r, cut / len(sets))
        if r < k:
            assert cut == 0


def test_graph_is_pinned_across_versions():
    """Every party derives the graph itself from the setup message, so the
    construction must not drift with Python or numpy versions: SHA-256 and
    AES-CTR only. Changing this digest breaks mixed-version sessions."""
    g = neighbour_graph(20, 6, b"fedpersona-graph-golden")
    edges = sorted((i, j) for i, nb in g.items() for j in nb if i < j)
    assert len(edges) == 60
    assert hashlib.sha256(repr(edges).encode()).hexdigest()[:16] == "40b92cfa462eed09"


@pytest.mark.parametrize(("n", "trials"), [(100, 60), (300, 6)])
def test_honest_survivors_stay_connected_at_the_stated_fractions(n, trials):
    gamma, delta = 0.05, 0.1
    k, t = choose_neighbours(n, gamma, delta)
    assert k < n - 1 and k % 2 == 0 and k // 2 < t <= k  # really sparse at these sizes
    c, d = math.ceil(gamma * n), math.ceil(delta * n)
    rng = np.random.default_rng(n)
    for _ in range(trials):
        graph = neighbour_graph(n, k, rng.bytes(16))
        perm = [int(i) + 1 for i in rng.permutation(n)]
        colluders, dropped, rest = set(perm[:c]), set(perm[c : c + d]), set(perm[c + d :])
        assert len(_components(rest, graph)) == 1  # the honest survivors' masks tie them all together
        assert all(len(graph[i] & colluders) < t for i in rest | dropped)  # no honest secret reconstructible
        assert all(len(graph[i] - dropped) >= t for i in rest | colluders)  # every survivor can be unmasked


def test_choose_neighbours_from_the_bounds():
    # Tiny cohorts get the complete graph (original SecAgg): nothing sparser meets the bounds.
    assert choose_neighbours(9, 0.1, 0.3) == (8, 5)
    assert choose_neighbours(10, 0.1, 0.3) == (8, 5) and choose_neighbours(30, 0.1, 0.3) == (20, 11)
    # From N = 100 on, the per-node tails (1) and (3) set k; connectivity (2) is far below its limit.
    assert choose_neighbours(100) == (60, 31) and choose_neighbours(1000) == (174, 88)
    k, t = choose_neighbours(1000, 0.05, 0.05)
    assert k < 60 and k % 2 == 0 and k // 2 < t <= k
    # More colluders or more dropouts never buy a sparser graph.
    assert choose_neighbours(1000, 0.1, 0.05)[0] >= k and choose_neighbours(1000, 0.05, 0.2)[0] >= k
    # More colluders than a full neighbourhood: no threshold can work.
    with pytest.raises(ValueError):
        choose_neighbours(10, 0.95, 0.0)
    with pytest.raises(ValueError):
        choose_neighbours(10, -0.1, 0.0)
    # A fresh session uses them unless told otherwise.
    p = SecAggParams.create(range(1, 201), 4)
    assert (p.neighbours, p.threshold) == choose_neighbours(200, 0.1, 0.3)
    p = SecAggParams.create(range(1, 201), 4, colluder_fraction=0.05, dropout_fraction=0.1)
    assert (p.neighbours, p.threshold) == choose_neighbours(200, 0.05, 0.1)

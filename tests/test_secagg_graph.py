"""The SecAgg+ neighbour graph: a random k-regular graph, with k chosen from Bell et al.'s bounds.

The graph used to be a Harary ring over a pseudo-random order. A ring's
connectivity is k however large N is, so two runs of k/2 colluders that are
consecutive in ring order cut off the arc of honest clients between them: the
pairwise masks of that arc then cancel among themselves and the server learns
its sum. No k-regular graph survives *every* choice of k colluders (a node's
own neighbourhood cuts it off), which is why the guarantee is probabilistic:
the graph is drawn at random after the colluders are fixed, and k is chosen so
that, for a colluder fraction gamma and a dropout fraction delta, the honest
survivors stay connected except with a stated tiny probability.
"""

from __future__ import annotations

import hashlib
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


def _old_ring(n: int, k: int, seed: bytes) -> tuple[list[int], dict[int, frozenset[int]]]:
    """The previous construction: a Harary ring over the SHA-256 order of the ids."""
    order = sorted(range(1, n + 1), key=lambda i: hashlib.sha256(seed + i.to_bytes(8, "big")).digest())
    half = k // 2
    return order, {order[p]: frozenset(order[(p + o) % n] for o in range(-half, half + 1) if o) for p in range(n)}


def test_two_colluding_runs_no_longer_cut_off_an_arc():
    n, k = 30, 10
    for trial in range(40):
        seed = hashlib.sha256(b"arc-%d" % trial).digest()[:16]
        order, ring = _old_ring(n, k, seed)
        colluders = set(order[0:5]) | set(order[11:16])  # two runs of k/2, six honest clients between
        honest = set(range(1, n + 1)) - colluders
        # The attack as it worked on the ring: the arc is a component of its own.
        assert sorted(map(len, _components(honest, ring))) == [6, 14]
        graph = neighbour_graph(n, k, seed)
        assert len(_components(honest, graph)) == 1, trial


def _second_eigenvalue(graph: dict[int, frozenset[int]]) -> float:
    n = len(graph)
    a = np.zeros((n, n))
    for i, nb in graph.items():
        a[i - 1, [j - 1 for j in nb]] = 1.0
    return float(np.sort(np.linalg.eigvalsh(a))[-2])


def test_graph_is_an_expander_not_a_ring():
    """A random k-regular graph has second eigenvalue near 2*sqrt(k-1)
    (Friedman); a ring's is almost k, the spectral sign of its thin cuts."""
    for n, k in ((100, 8), (200, 10)):
        for trial in range(3):
            seed = hashlib.sha256(b"spectrum-%d" % trial).digest()[:16]
            _, ring = _old_ring(n, k, seed)
            assert _second_eigenvalue(ring) > 0.95 * k
            lam = _second_eigenvalue(neighbour_graph(n, k, seed))
            assert lam < 2 * math.sqrt(k - 1) + 1.0 < 0.85 * k


def test_graph_is_pinned_across_versions():
    """Every party derives the graph itself from the setup message, so the
    construction must not drift with Python or numpy versions: SHA-256 and
    AES-CTR only. Changing this digest breaks mixed-version sessions."""
    g = neighbour_graph(20, 6, b"fedpersona-graph-golden")
    edges = sorted((i, j) for i, nb in g.items() for j in nb if i < j)
    assert len(edges) == 60
    assert hashlib.sha256(repr(edges).encode()).hexdigest()[:16] == "797017cb8f42d969"


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
    # Small cohorts get the complete graph (original SecAgg): nothing sparser meets the bounds.
    assert choose_neighbours(10, 0.1, 0.3) == (9, 5)
    assert choose_neighbours(30, 0.1, 0.3)[0] == 29
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


def _reference_draw(n: int, k: int, seed: bytes) -> tuple[frozenset[int], ...]:
    """The switch chain as first written (word-by-word rejection sampling, sets
    of neighbours, one Python step per switch): the optimised ``_draw_graph``
    must give exactly this graph for every seed."""
    from common.secagg_crypto import GRAPH_DOMAIN, SWITCHES_PER_EDGE, _SeededInts, is_connected

    rng = _SeededInts(seed, GRAPH_DOMAIN)

    def below(m: int, count: int) -> list[int]:
        limit, out = (1 << 64) - (1 << 64) % m, []
        while len(out) < count:
            need = count - len(out)
            out.extend(w % m for w in rng.words(need + need // 8 + 8) if w < limit)
        return out[:count]

    ids = range(1, n + 1)
    order = [i for _, i in sorted(zip(rng.words(n), ids))]
    adj: dict[int, set[int]] = {i: set() for i in ids}
    edges = []
    for p in range(n):
        for o in range(1, k // 2 + 1):
            a, b = order[p], order[(p + o) % n]
            adj[a].add(b)
            adj[b].add(a)
            edges.append((a, b))
    while True:
        tries = SWITCHES_PER_EDGE * len(edges)
        for e, f, flip in zip(below(len(edges), tries), below(len(edges), tries), below(2, tries)):
            (a, b), (d, c) = edges[e], (edges[f] if flip else edges[f][::-1])
            if len({a, b, c, d}) < 4 or c in adj[a] or d in adj[b]:
                continue
            adj[a] -= {b}
            adj[b] -= {a}
            adj[c] -= {d}
            adj[d] -= {c}
            adj[a].add(c)
            adj[c].add(a)
            adj[b].add(d)
            adj[d].add(b)
            edges[e], edges[f] = (a, c), (b, d)
        if is_connected(adj):
            return tuple(frozenset(adj[i]) for i in ids)


@pytest.mark.parametrize(("n", "k"), [(8, 2), (30, 2), (20, 6), (40, 10), (120, 60)])
def test_optimised_draw_gives_the_reference_graph(n, k):
    """Same seed, same graph as the original implementation: parties running
    either version agree. k = 2 disconnects often, so the extra rounds of
    switches (and their reads of the keystream) are covered too."""
    from common.secagg_crypto import _draw_graph

    for trial in range(4):
        seed = hashlib.sha256(b"reference-%d-%d-%d" % (n, k, trial)).digest()
        assert _draw_graph.__wrapped__(n, k, seed) == _reference_draw(n, k, seed), (n, k, trial)

"""FedAvg over summed updates, with the K-slot persona tier (the server's half).

Clients send *updates* in the wire layout of :mod:`common.tiers`: the global
tier, K persona slots (zero except the sender's own), the centroid block (the
sender's profile embedding in its own row) and a one-hot count vector. This strategy only ever uses their **sum** (plain rounds add the
replies up; :class:`~server.secure_strategy.SecAggFedAvg` gets the sum from
secure aggregation and never sees one reply) and from it:

* updates the global tier by ``sum / n_sampled`` (DP-FedAvg's fixed
  denominator, so a dropout cannot change the sensitivity; the expected cohort
  under Poisson client sampling);
* sets centroid k to the mean profile of the devices that chose k
  (federated k-means);
* updates persona slot k by ``sum_k / count_k``, when ``count_k`` reaches the
  minimum persona size; otherwise the slot keeps its values and its sum is
  folded into the global tier's (persona adapters share the global adapter's
  LoRA subspace, so the sums are compatible). Per-persona DP noise divided by a
  tiny count would swamp the slot.

With user-level DP the sum carries Gaussian noise of std ``z*C`` on every
coordinate (counts and profiles included, see ``common.tiers.count_scale``): added here
("server" noise), or already inside the sum when the clients added distributed
noise shares under secure aggregation. Either way the round composes one
Gaussian event into Flower's client-level accountant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import GaussianPrivacyEvent, Grid

from common.tiers import CENTROID_KEY, COUNT_KEY, GLOBAL, count_scale, slot_of
from common.wire import ARRAYS, flatten, unflatten
from server.strategy import EvalAtEndFedAvg

log = logging.getLogger(__name__)


@dataclass
class SlotRound:
    """What the server learned from one round's sum (numbers only, no per-client data)."""

    counts: list[float]  # decoded per-persona counts (noisy under user-level DP)
    folded: list[int]  # slots below the minimum size, folded into the global tier


def apply_update_sum(
    arrays: ArrayRecord,
    total: np.ndarray,
    sampled: float,
    num_slots: int,
    min_size: float,
    clip_norm: float | None,
) -> tuple[ArrayRecord, SlotRound]:
    """New server tensors from the (noised) sum of ``sampled`` clients' updates.

    ``total`` is laid out as ``flatten(arrays)`` followed by the K counts;
    ``sampled`` is the global tier's fixed denominator.
    """
    base = flatten(arrays)
    if total.shape != (base.size + num_slots,):
        raise ValueError(f"update sum has {total.size} values, the layout needs {base.size + num_slots}")
    counts = total[base.size :] / count_scale(clip_norm)
    if clip_norm is None:
        # Without DP noise the counts are integers by construction; rounding
        # removes secure aggregation's fixed-point error (a 0.9999999 must not
        # fall below a minimum size of 1).
        counts = np.rint(counts)
    counts = counts.tolist()
    # Segment offsets of every key in the flat layout.
    offsets, start = {}, 0
    for key, arr in arrays.items():
        offsets[key] = slice(start, start + int(np.prod(arr.shape)))
        start = offsets[key].stop
    new = base.copy()
    global_sum = {key: total[sl].copy() for key, sl in offsets.items() if slot_of(key) is None and key != CENTROID_KEY}
    if CENTROID_KEY in offsets:
        # Federated k-means: centroid k = mean profile of the devices that chose
        # k. A slot nobody (noisily) chose keeps its centroid.
        sl = offsets[CENTROID_KEY]
        rows = total[sl].reshape(num_slots, -1) / count_scale(clip_norm)
        centroids = new[sl].reshape(num_slots, -1)
        for k in range(num_slots):
            if counts[k] >= 1:
                centroids[k] = rows[k] / counts[k]
        new[sl] = centroids.reshape(-1)
    folded = []
    for k in range(num_slots):
        keys = [key for key in offsets if slot_of(key) == k]
        if counts[k] >= min_size:
            for key in keys:
                new[offsets[key]] += total[offsets[key]] / counts[k]
        else:
            folded.append(k)
            for key in keys:
                global_sum[f"{GLOBAL}/" + key.split("/", 1)[1]] += total[offsets[key]]
    for key, s in global_sum.items():
        new[offsets[key]] += s / sampled
    return unflatten(new, arrays), SlotRound(counts=counts, folded=folded)


class SlotFedAvg(EvalAtEndFedAvg):
    """Plain (unmasked) rounds: sum the clients' update replies, then :func:`apply_update_sum`."""

    def __init__(
        self,
        *,
        num_rounds: int,
        num_slots: int,
        min_persona_size: float = 1.0,
        user_dp: dict | None = None,
        server_noise: bool = True,
        accountant=None,
        poisson_rate: float | None = None,
        **kwargs,
    ):
        super().__init__(num_rounds=num_rounds, **kwargs)
        # Poisson client sampling (DP-FedAvg, McMahan et al. 2018): FedAvg
        # offers every connected node, and each is kept with this probability.
        self.poisson_rate = poisson_rate
        if min_persona_size < 1:
            raise ValueError("persona-min-size must be >= 1 (it is the denominator's floor)")
        self.num_slots = num_slots
        self.min_persona_size = float(min_persona_size)
        self.user_dp = user_dp  # {"noise_multiplier": z, "clip_norm": C} or None
        self.server_noise = server_noise
        self.accountant = accountant
        self.rng = np.random.default_rng()
        self.slot_rounds: dict[int, SlotRound] = {}
        self._sent: dict = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        sampled = len(messages)
        if self.poisson_rate is not None:
            # The fixed denominator is the *expected* cohort, so the mean's
            # sensitivity does not depend on who happened to be drawn.
            sampled = self.poisson_rate * len(messages)
            messages = [m for m in messages if self.rng.random() < self.poisson_rate]
        self._sent = {"arrays": arrays, "sampled": sampled, "grid": grid}
        return messages

    def privacy_event(self) -> GaussianPrivacyEvent:
        """One round's user-level Gaussian release, for Flower's accountant."""
        pop = self.accountant.config.population_size
        size = pop if self.poisson_rate is None else max(1, round(self.poisson_rate * pop))
        return GaussianPrivacyEvent(noise_multiplier=self.user_dp["noise_multiplier"], sample_size=size, population_size=pop)

    def _sum_updates(self, server_round: int, replies: list[Message], state: dict) -> np.ndarray | None:
        """The sum of the replies' update vectors (layout of the sent arrays + counts)."""
        if not replies:
            return None
        keys = [*state["arrays"].keys(), *([COUNT_KEY] if self.num_slots else [])]
        return sum(flatten(r.content[ARRAYS], keys) for r in replies)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        state, self._sent = self._sent, {}
        replies = [r for r in replies if r.has_content()]
        if self.user_dp and self.accountant is not None:
            # Charged whether or not anything comes back: a round that was
            # sampled may release noise even from an empty cohort.
            self.accountant.compose(self.privacy_event())
        total = self._sum_updates(server_round, replies, state) if state and replies else None
        if total is None:
            return None, None
        clip = None
        if self.user_dp:
            z, clip = self.user_dp["noise_multiplier"], self.user_dp["clip_norm"]
            if self.server_noise:
                total = total + self.rng.normal(0.0, z * clip, size=total.shape)
        arrays, info = apply_update_sum(state["arrays"], total, state["sampled"], self.num_slots, self.min_persona_size, clip)
        self.slot_rounds[server_round] = info
        if info.folded:
            log.info("round %d: persona slot(s) %s below the minimum size, folded into the global tier", server_round, info.folded)
        metrics = self.train_metrics_aggr_fn([r.content for r in replies], self.weighted_by_key) if replies else None
        return arrays, metrics

"""fedpersona ServerApp (Flower Message API).

The server only ever holds the shared tiers (the global adapter and K persona
slots), summed or averaged updates, numeric metrics and its own report. It builds the shared tier's
initial values from the same model construction code the clients use, so both
sides agree on names and shapes.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from common.config import client_config
from common.dp import make_user_accountant, rounds_within_budget
from common.models import AdapterSpec, personal_model
from common.tiers import server_state
from common.wire import train_reply_schema
from server.report import SHARED_TIERS_FILE, save_shared_tiers, write_report
from server.secure_strategy import SecAggFedAvg
from server.slot_strategy import SlotFedAvg
from server.strategy import EvalAtEndFedAvg, GuardedStrategy

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = dict(context.run_config)
    started = time.time()
    spec = AdapterSpec.from_run_config(rc)
    shared = personal_model(spec).shared_state()
    num_slots = int(rc.get("persona-slots", 0))
    initial = ArrayRecord(
        {k: Array(v) for k, v in server_state(shared, num_slots, float(rc.get("persona-init-std", 1e-3)), int(rc.get("seed", 0))).items()}
    )
    planned_rounds = int(rc.get("num-server-rounds", 3))
    num_nodes = int(rc.get("num-supernodes", 2))
    user_dp = bool(rc.get("user-dp", False))
    fraction = float(rc.get("fraction-train", 1.0))
    secagg = bool(rc.get("secagg", False))
    accountant, num_rounds, poisson_rate = None, planned_rounds, None
    if user_dp:
        sample_size = num_nodes
        if fraction < 1.0:
            if not (secagg or num_slots):
                raise ValueError("user-dp with fraction-train < 1 needs the persona tier or secagg: Flower's DP wrapper has no sampling amplification")
            # Poisson client sampling at q = sample_size / N, accounted with amplification.
            sample_size = max(1, round(fraction * num_nodes))
            poisson_rate = sample_size / num_nodes
        budget = float(rc.get("user-max-epsilon", 0.0)) or None
        accountant = make_user_accountant(num_nodes, float(rc["user-delta"]), budget, poisson=poisson_rate is not None)
        num_rounds = rounds_within_budget(accountant, float(rc["user-noise-multiplier"]), sample_size, planned_rounds)
        if num_rounds < planned_rounds:
            log.warning("user-level budget allows %d of %d rounds; stopping there", num_rounds, planned_rounds)
        if num_rounds == 0:
            raise RuntimeError("the user-level privacy budget does not allow a single round")
    fedavg_args = dict(
        num_rounds=num_rounds,
        # With Poisson sampling FedAvg offers every node and SlotFedAvg draws the cohort.
        fraction_train=1.0 if poisson_rate else fraction,
        fraction_evaluate=1.0,
        # FedAvg sizes its sample from the nodes connected *at that instant*,
        # floored by min_train_nodes; if round 1 starts while nodes are still
        # registering it would train on a subset. The floor carries the sample
        # this config intends instead.
        min_train_nodes=num_nodes if poisson_rate else min(num_nodes, max(2, math.ceil(fraction * num_nodes))),
        min_evaluate_nodes=num_nodes,  # the report scores every user (fraction-evaluate is 1)
        # The accounted DP wrapper needs exactly num_nodes replies per round.
        min_available_nodes=num_nodes if user_dp else min(2, num_nodes),
        # DP-FedAvg needs uniform client weights; every client runs the same
        # number of local steps, so weighting by steps is uniform (and Flower's
        # accounted wrapper checks it).
        weighted_by_key="steps" if user_dp else "num-examples",
    )
    dp = {"noise_multiplier": float(rc["user-noise-multiplier"]), "clip_norm": float(rc["user-clip-norm"])} if user_dp else None
    slot_args = dict(
        num_slots=num_slots, min_persona_size=float(rc.get("persona-min-size", 1)), user_dp=dp, accountant=accountant, poisson_rate=poisson_rate
    )
    if secagg:
        # The server only ever holds the unmasked sum: user-level noise comes
        # from the clients' shares ("distributed") or is added to that sum.
        strategy = SecAggFedAvg(
            clip_range=float(rc.get("secagg-clip-range", 1.0)),
            modulus_bits=int(rc.get("secagg-modulus-bits", 32)),
            max_dropout=float(rc.get("secagg-max-dropout", 0.3)),
            server_noise=str(rc.get("secagg-noise", "distributed")) == "server",
            **slot_args,
            **fedavg_args,
        )
    elif num_slots:
        strategy = SlotFedAvg(server_noise=True, **slot_args, **fedavg_args)
    else:
        # No persona tier, no secure aggregation: stock Flower all the way,
        # DP-FedAvg by Flower's own wrapper and fixedclipping_mod.
        strategy = EvalAtEndFedAvg(**fedavg_args)
        if user_dp:
            strategy = DifferentialPrivacyClientSideFixedClipping(
                strategy,
                noise_multiplier=float(rc["user-noise-multiplier"]),
                clipping_norm=float(rc["user-clip-norm"]),
                num_sampled_clients=num_nodes,
                accountant=accountant,
            )
    strategy = GuardedStrategy(
        strategy,
        schema=train_reply_schema({k: tuple(v.shape) for k, v in shared.items()}, num_slots, masked=secagg),
        num_rounds=num_rounds,
        accountant=accountant,
        user_delta=float(rc.get("user-delta", 1e-3)),
    )
    config = ConfigRecord(client_config(rc))
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=num_rounds,
        train_config=config,
        evaluate_config=config,
        timeout=float(rc.get("round-timeout", 3600)),
    )
    run_dir = Path(str(rc.get("run-dir", "runs/latest")))
    write_report(run_dir, rc, strategy, result, wall_s=time.time() - started, planned_rounds=planned_rounds)
    save_shared_tiers(run_dir / SHARED_TIERS_FILE, result.arrays)
    log.info("report written to %s", run_dir)

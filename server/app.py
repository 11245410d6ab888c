"""fedpersona ServerApp (Flower Message API): compose the privacy pipeline and the strategy, run, report.

The server only ever holds the shared tiers (the global adapter, K persona
slots and their centroids), sums of updates, counts of replies and refusals,
and its own report. It builds the shared tiers' initial values with the same
model construction code the devices use, so both sides agree on names and
shapes (``common.kslot``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from common.models import AdapterSpec, personal_model
from common.privacy import build_pipeline, run_codec
from server import checkpoint
from server.report import SHARED_TIERS_FILE, save_shared_tiers, write_report
from server.strategy import TieredFedAvg

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_flat(context.run_config)
    started = time.time()
    shared = personal_model(AdapterSpec.from_config(cfg)).initial_shared_state()
    codec = run_codec(shared, cfg)
    initial = ArrayRecord({k: Array(v) for k, v in codec.initial_state(shared, cfg.persona.init_std, cfg.seed).items()})
    pipeline = build_pipeline(cfg, codec)
    planned = cfg.federation.num_server_rounds
    accounting = pipeline.step("accounting")
    num_rounds = accounting.rounds_allowed(planned) if accounting is not None else planned
    if num_rounds < planned:
        log.warning("user-level budget allows %d of %d rounds; stopping there", num_rounds, planned)
    if num_rounds == 0:
        raise RuntimeError("the user-level privacy budget does not allow a single round")
    connected = len(list(grid.get_node_ids()))
    if connected < cfg.federation.num_supernodes:
        # The strategy waits for every node. Flower's local simulation has 2 unless told otherwise.
        log.warning(
            "num-supernodes=%d but %d node(s) connected; waiting for the rest. On Flower's local simulation, size the "
            "federation to match: flwr federation simulation-config @none/default local --num-supernodes N (once), "
            "or flwr run . --federation-config num-supernodes=N --run-config num-supernodes=N",
            cfg.federation.num_supernodes, connected,
        )
    strategy = TieredFedAvg(cfg, codec, pipeline, num_rounds)
    run_dir = Path(cfg.output.run_dir)
    start_round = 1
    resumed = checkpoint.load(run_dir, cfg.flat())
    if resumed is not None:
        # Continue after the last complete round: its tiers, report rows and accountant.
        done, tensors, state = resumed
        initial = ArrayRecord({k: Array(v) for k, v in tensors.items()})
        strategy.load_state_dict(state)
        start_round = done + 1
        log.warning("resuming after round %d of %d from %s", done, num_rounds, run_dir / checkpoint.CHECKPOINT_FILE)

    def save(server_round: int, arrays: ArrayRecord) -> None:
        checkpoint.save(run_dir, server_round, {k: v.numpy() for k, v in arrays.items()}, strategy.state_dict(), cfg.flat())

    final = strategy.run(grid, initial, start_round=start_round, checkpoint=save)
    write_report(run_dir, cfg, strategy, wall_s=time.time() - started, planned_rounds=planned)
    save_shared_tiers(run_dir / SHARED_TIERS_FILE, final)
    log.info("server report written to %s", run_dir)

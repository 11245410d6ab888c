"""fedpersona ServerApp (Flower Message API).

The server only ever holds the shared tier (the global adapter), averaged
updates, numeric metrics and its own report. It builds the shared tier's
initial values from the same model construction code the clients use, so both
sides agree on names and shapes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common.config import client_config
from common.models import AdapterSpec, personal_model
from common.wire import WireSchema
from server.report import write_report
from server.strategy import GuardedFedAvg

log = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = dict(context.run_config)
    started = time.time()
    spec = AdapterSpec.from_run_config(rc)
    initial = personal_model(spec).shared_state()
    num_rounds = int(rc.get("num-server-rounds", 3))
    num_nodes = int(rc.get("num-supernodes", 2))
    strategy = GuardedFedAvg(
        schema=WireSchema.from_tensors(initial),
        num_rounds=num_rounds,
        fraction_train=float(rc.get("fraction-train", 1.0)),
        fraction_evaluate=1.0,
        min_train_nodes=min(2, num_nodes),
        min_evaluate_nodes=min(2, num_nodes),
        min_available_nodes=min(2, num_nodes),
    )
    config = ConfigRecord(client_config(rc))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=num_rounds,
        train_config=config,
        evaluate_config=config,
        timeout=float(rc.get("round-timeout", 3600)),
    )
    run_dir = Path(str(rc.get("run-dir", "runs/latest")))
    write_report(run_dir, rc, strategy, result, wall_s=time.time() - started)
    log.info("report written to %s", run_dir)

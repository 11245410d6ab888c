"""One poll of Flower's simulation engine at N nodes: Flower's link state against the indexed one.

Flower's engine (``vce_api.add_messages_to_queue``) polls every 0.1 s and asks the link state
for one message per node. With a round's message waiting for each of N nodes, Flower's
``InMemoryLinkState`` walks every stored message for each node; ``simulations.link_state``'s
``IndexedLinkState`` looks only at the asking node's. Both arms run here in one invocation on
the same federation shape: N registered nodes, one message each, then polls in the engine's
pattern over nodes that have already taken their message (what the engine repeats every 0.1 s
while the devices train), timed as the median of a few polls.

    python -m benchmarks.link_state_poll            # N = 100, 300 and 1,000
    python -m benchmarks.link_state_poll --quick    # N = 100 and 1,000 (seconds)
    python -m benchmarks.link_state_poll --smoke    # N = 20 (the test suite runs this)

Last line: ``RESULT link_state_poll key=value ...`` with, per N, each arm's milliseconds per poll
and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks._common import add_size_flags, result_line


def poll_ms(num_nodes: int, indexed: bool, polls: int) -> float:
    """Median milliseconds of one engine poll while every node's message waits for its reply."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from simulations.link_state import bare_federation

    state, grid, nodes = bare_federation(num_nodes, indexed)
    grid.push_messages([Message(RecordDict({"c": ConfigRecord({"i": i})}), dst_node_id=n, message_type="train") for i, n in enumerate(nodes)])
    taken = sum(len(state.get_message_ins(node_id=n, limit=1)) for n in nodes)  # the first poll hands them out
    assert taken == num_nodes, f"{taken} of {num_nodes} messages delivered"
    times = []
    for _ in range(polls):
        t = time.perf_counter()
        for n in nodes:
            state.get_message_ins(node_id=n, limit=1)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="100,300,1000", help="comma-separated N")
    ap.add_argument("--polls", type=int, default=5)
    add_size_flags(ap, quick="N = 100 and 1,000 (seconds)")
    args = ap.parse_args(argv)
    if args.quick:
        args.nodes = "100,1000"
    if args.smoke:
        args.nodes, args.polls = "20", 2
    out: dict = {}
    for n in (int(x) for x in args.nodes.split(",")):
        flower = poll_ms(n, indexed=False, polls=args.polls)
        indexed = poll_ms(n, indexed=True, polls=args.polls)
        out.update({f"n{n}_flower_ms": round(flower, 2), f"n{n}_indexed_ms": round(indexed, 3), f"n{n}_ratio": round(flower / indexed, 1)})
        print(f"N = {n:>5}: Flower's state {flower:9.2f} ms a poll, indexed {indexed:8.3f} ms ({flower / indexed:.0f}x)", flush=True)
    print(result_line("link_state_poll", out))
    return out


if __name__ == "__main__":
    main()

"""The wire recorder: a ClientApp mod that only the simulation harness adds.

It sits outside the device's production mods, so it records exactly what
leaves a device (refusals included), in Flower's protobuf wire format, for the
wire audit. A deployed device never runs it.
"""

from __future__ import annotations

import uuid
from pathlib import Path


def recorder_mod(folder: Path):
    folder = Path(folder)

    def record_wire(msg, context, call_next):
        from flwr.common.serde import recorddict_to_proto

        reply = call_next(msg, context)
        if reply.has_content():
            folder.mkdir(parents=True, exist_ok=True)
            blob = recorddict_to_proto(reply.content).SerializeToString()
            (folder / f"{context.node_id}-{msg.metadata.message_type}-{uuid.uuid4().hex[:12]}.bin").write_bytes(blob)
        return reply

    return record_wire

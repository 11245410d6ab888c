"""The privacy mechanisms as one pipeline of two-sided steps (see ``base.py``)."""

from common.privacy.base import DeviceUpdate, Pipeline, Reply, ServerAggregate, ServerRound, Step
from common.privacy.pipeline import build_pipeline, run_codec

__all__ = ["DeviceUpdate", "Pipeline", "Reply", "ServerAggregate", "ServerRound", "Step", "build_pipeline", "run_codec"]

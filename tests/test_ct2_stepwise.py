"""CTranslate2's token-by-token path (CT2Engine._decode_stepwise): requests PocketLM's sampler
steers (seeded sampling, presence/frequency penalties) give exactly the tokens of the old
definition: at every step the next-token logits teacher-forced over the whole prefix
(`model.logits`), then the request's Sampler (its chain, temperature, top-k, top-p, its seeded
draw), until the end token or the budget."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from parity import WIDE

import pocketlm
from pocketlm.core.generation import GenerationOptions
from pocketlm.core.sampling import Sampler

pytest.importorskip("ctranslate2")

NEW = 24  # tokens per request: several restarts on these random models


@pytest.fixture(scope="module", params=["float32", "int8"])
def model(request, checkpoints):
    """The wide random T5 (d_model 256, vocab 256) in CTranslate2, float32 and int8."""
    summary = checkpoints.converted("t5", WIDE, "ct2", request.param)
    m = pocketlm.load(summary.output, threads=2, parallel=4, backend="ctranslate2")
    yield m
    m.close()


def prompt(seed: int, n: int = 12, vocab: int = 256) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab - 100, n)] + [1]


def reference(model: Any, ids: list[int], options: GenerationOptions, index: int = 0) -> list[int]:
    """The old definition: teacher-forced logits of the whole prefix at every step."""
    engine = model.engine
    sampler = Sampler(options, index, engine.end_ids())
    decoded, out = [engine.start_token], []
    for _ in range(options.max_new_tokens):
        token = sampler(model.logits(ids, decoded)[-1], decoded, generated=decoded[1:])
        out.append(token)
        if engine.is_end(token):
            break
        decoded.append(token)
    return out


def options(**kwargs: Any) -> GenerationOptions:
    return GenerationOptions(max_new_tokens=NEW, **kwargs)


CASES = {
    "greedy-presence": dict(presence_penalty=1.5),
    "greedy-frequency": dict(frequency_penalty=0.7),
    "greedy-presence-frequency-repetition": dict(presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=1.3),
    "seeded-t1": dict(temperature=1.0, seed=3),
    "seeded-topk-topp": dict(temperature=0.8, top_k=20, top_p=0.9, seed=11),
    "seeded-chain": dict(temperature=0.7, seed=5, min_new_tokens=10, no_repeat_ngram_size=2, presence_penalty=0.5),
}


def counts(model: Any) -> dict[str, int]:
    return dict(model.engine.stepwise_counts)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


@pytest.mark.parametrize("case", list(CASES))
def test_one_request_equals_the_teacher_forced_definition(model, case):
    o = options(**CASES[case])
    for seed in (0, 1):
        ids = prompt(seed)
        before = counts(model)
        got = model.generate(ids, o).token_ids
        d = delta(before, counts(model))
        assert got == reference(model, ids, o), f"{case}, prompt {seed}"
        assert d["tokens"] == len(got)
        # one call, then one more after each token the sampler chose against CTranslate2's
        # guess (but the last): restarts happen only where they must
        assert d["tokens"] - d["agreed"] <= d["calls"] <= d["tokens"] - d["agreed"] + 1


def test_greedy_with_penalty_speculates(model):
    """Where the sampler takes CTranslate2's greedy token, decoding goes on in the same call."""
    o = options(presence_penalty=0.2)
    before = counts(model)
    model.generate(prompt(4), o)
    d = delta(before, counts(model))
    assert d["agreed"] > 0 and d["calls"] < d["tokens"]


@pytest.mark.parametrize("case", ["seeded-t1", "seeded-topk-topp", "greedy-presence"])
def test_several_samples(model, case):
    """num_return_sequences=3: sample i is seeded with seed + i; decoded together."""
    o = options(num_return_sequences=3, **CASES[case])
    ids = prompt(7)
    result = model.generate(ids, o)
    got = [s.token_ids for s in result.sequences]
    assert got == [reference(model, ids, o, index=i) for i in range(3)]
    if o.seed is not None:
        assert len({tuple(t) for t in got}) > 1  # the samples differ


def test_batch_of_requests_equals_each_alone(model):
    """Stepwise requests with different options decode in one batch (one translate_batch per
    round, each sequence with its own prefix and restarts); each equals its request alone."""
    requests = [(prompt(20 + i), options(**CASES[case])) for i, case in enumerate(CASES)]
    alone = [model.generate(ids, o).token_ids for ids, o in requests]
    before = counts(model)
    streams = [model.stream_tokens(ids, o) for ids, o in requests]  # submitted before any is read
    together = []
    for stream in streams:
        for _ in stream:
            pass
        together.append(stream.result.token_ids)
    d = delta(before, counts(model))
    assert together == alone
    assert together == [reference(model, ids, o) for ids, o in requests]
    assert d["sequences"] > d["calls"]  # some calls held several sequences


def test_batch_from_threads(model):
    """Requests arriving from several callers at once (the server's case) are still exact."""
    requests = [(prompt(40 + i), options(**CASES[case])) for i, case in enumerate(["seeded-t1", "greedy-presence"] * 2)]
    results: list[Any] = [None] * len(requests)

    def run(i: int) -> None:
        results[i] = model.generate(requests[i][0], requests[i][1]).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [reference(model, ids, o) for ids, o in requests]


def test_budgets_in_one_batch(model):
    """A sequence that reaches its budget ends there; the others of its batch go on."""
    short, long = GenerationOptions(max_new_tokens=3, presence_penalty=1.0), options(presence_penalty=1.0)
    a, b = model.stream_tokens(prompt(50), short), model.stream_tokens(prompt(51), long)
    for s in (a, b):
        for _ in s:
            pass
    assert a.result.token_ids == reference(model, prompt(50), short)
    assert b.result.token_ids == reference(model, prompt(51), long)


def test_callback_logits_are_the_teacher_forced_ones(model, monkeypatch):
    """The rows the sampler sees equal model.logits' rows at the same prefix (within 1e-4
    relative): the seeded tokens above cannot hinge on float noise."""
    from pocketlm.backends import ctranslate2 as backend

    seen: list[np.ndarray] = []
    real = backend._Stepwise.choose

    def record(self: Any, logits: np.ndarray) -> int:
        seen.append(logits.copy())
        return real(self, logits)

    monkeypatch.setattr(backend._Stepwise, "choose", record)
    ids, o = prompt(60), options(**CASES["seeded-t1"])
    tokens = model.generate(ids, o).token_ids
    expected = model.logits(ids, [model.engine.start_token, *tokens])[: len(tokens)]
    got = np.stack(seen)
    assert got.shape == expected.shape
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= 1e-4, err

"""The Model API on a GGUF: streaming, stop sequences, sampling, scoring, caching, errors."""

from __future__ import annotations

import numpy as np
import pytest

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.errors import GenerationError
from pocketlm.converters.synthetic import build_random_bloom

PROMPTS = ["Translate to English: Je t'aime.", "一个传奇的开端，", "def add(a, b):", "Привет, мир! 🙂"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random BLOOM whose (noisy) output is full of multi-byte characters split across tokens."""
    folder = tmp_path_factory.mktemp("rt")
    build_random_bloom(folder / "hf", hidden=128, n_layer=2, n_head=4, vocab_size=768, std=0.2)
    summary = convert(folder / "hf", folder / "m.gguf", quant="f32")
    m = pocketlm.load(summary.output, n_ctx=256)
    yield m
    m.close()


def test_info_describes_the_choice(model):
    info = model.info
    assert (info.format, info.backend, info.device, info.architecture, info.quant) == (
        "gguf",
        "llama.cpp",
        "cpu",
        "bloom",
        "f32",
    )
    assert info.n_ctx == 256 and info.vocab_size == 768 and info.threads >= 1 and info.reasons


@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_concatenates_to_generate(model, prompt):
    result = model.generate(prompt, max_new_tokens=48)
    pieces = list(model.stream(prompt, max_new_tokens=48))
    assert "".join(pieces) == result.text
    assert all(pieces)


def test_stream_never_splits_a_character(model):
    """Find outputs whose token bytes split UTF-8 characters; the text pieces must not."""
    split_seen = False
    for prompt in PROMPTS:
        events = list(model.stream_tokens(prompt, max_new_tokens=64))
        for event in events:
            if event.token_id is None:
                continue
            data = model.token_bytes(event.token_id)
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                split_seen = True
        text = "".join(e.text for e in events)
        assert text.encode("utf-8").decode("utf-8") == text
    assert split_seen, "no token split a character: the test proves nothing with this model"


def test_greedy_is_deterministic_and_stops_at_length(model):
    a = model.generate(PROMPTS[0], max_new_tokens=20)
    b = model.generate(PROMPTS[0], max_new_tokens=20)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20 and a.finish_reason == "length"


def test_stop_sequence_truncates_and_reports_stop(model):
    full = model.generate(PROMPTS[1], max_new_tokens=48)
    assert len(full.text) > 6
    stop = full.text[3:5]
    cut = full.text.index(stop)
    stopped = model.generate(PROMPTS[1], max_new_tokens=48, stop=[stop])
    assert stopped.text == full.text[:cut]
    assert stopped.finish_reason == "stop"
    assert "".join(model.stream(PROMPTS[1], max_new_tokens=48, stop=stop)) == stopped.text


def test_seeded_sampling_is_reproducible(model):
    kw = dict(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95)
    a = model.generate(PROMPTS[0], seed=7, **kw)
    b = model.generate(PROMPTS[0], seed=7, **kw)
    c = model.generate(PROMPTS[0], seed=8, **kw)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_1_sampling_equals_greedy(model):
    greedy = model.generate(PROMPTS[2], max_new_tokens=16)
    sampled = model.generate(PROMPTS[2], max_new_tokens=16, temperature=1.3, top_k=1, seed=3)
    assert sampled.token_ids == greedy.token_ids


def test_logits_follow_generation_and_prefix_cache(model):
    prompt = model.tokenize(PROMPTS[0])
    result = model.generate(prompt, max_new_tokens=10)
    # teacher-forced logits reproduce every greedy choice
    logits = model.logits(prompt + result.token_ids)
    assert logits.shape == (len(prompt) + 10, 768)
    assert list(logits[len(prompt) - 1 : -1].argmax(-1)) == result.token_ids
    # a prompt extending the cached one reuses the KV cache and gives the same answer
    longer = prompt + result.token_ids[:4]
    cached = model.generate(longer, max_new_tokens=6).token_ids
    model.logits([1])  # replace the cache with something unrelated
    fresh = model.generate(longer, max_new_tokens=6).token_ids
    assert cached == fresh == result.token_ids[4:10]


def test_score_is_the_candidates_log_likelihood(model):
    prompt = model.tokenize(PROMPTS[0])
    cands = [[10, 11, 12], [40]]
    scores = model.score(prompt, cands)
    for cand, score in zip(cands, scores):
        logits = model.logits(prompt + cand).astype(np.float64)
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        expected = sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(cand))
        # the prompt and the candidates go in different batches: float32 summation order
        assert score == pytest.approx(expected, rel=1e-6, abs=1e-5)
    assert model.score(PROMPTS[0], ["yes", "no"])[0] < 0


def test_bad_requests_are_generation_errors(model):
    with pytest.raises(GenerationError, match="context holds 256"):
        model.generate(list(range(4, 300)))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        model.generate([5, 99999])
    with pytest.raises(GenerationError, match="empty"):
        model.generate("")
    with pytest.raises(GenerationError, match="top_p"):
        model.generate("x", top_p=0.0)
    assert model.generate("x", max_new_tokens=0).token_ids == []


def test_generation_stops_when_the_context_is_full(model):
    prompt = list(range(4, 250))
    result = model.generate(prompt, max_new_tokens=50)
    assert len(result.token_ids) <= 256 - 246 and result.finish_reason in ("length", "stop")


def test_min_new_tokens_masks_the_end_of_sequence(model):
    assert model.engine.end_ids() == [2]
    result = model.generate(PROMPTS[0], max_new_tokens=30, min_new_tokens=30)
    assert len(result.token_ids) == 30 and 2 not in result.token_ids and result.finish_reason == "length"

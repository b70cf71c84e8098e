"""Beam search, several samples and log-probabilities mean what transformers' generate means.

Tiny f32 models of each architecture, on every backend: the returned sequences, their order
and their scores equal transformers' `generate(num_beams=..., num_return_sequences=...)`.
CTranslate2 searches by itself: it stops once num_beams hypotheses are finished, which is
transformers' early_stopping=True (README: beam search); with early_stopping=False it is
pinned to that. The models' end-of-sequence row is boosted so beams do finish early.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import make_bloom, make_t5

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.errors import GenerationError
from pocketlm.core.generation import GenerationOptions
from pocketlm.core.search import log_softmax

BLOOM_PROMPTS = [[5, 6, 7, 8, 9, 10], [60, 61, 62, 60, 61]]
T5_SOURCES = [[5, 9, 12, 30, 1], [40, 41, 42, 43, 44, 45, 1]]
BLOOM_EOS, T5_EOS = 2, 1

CASES = [  # num_beams, num_return_sequences, length_penalty, no_repeat_ngram_size, early_stopping
    (2, 1, 1.0, 0, False),
    (4, 4, 1.0, 0, False),
    (4, 2, 0.0, 0, True),
    (4, 3, 2.0, 2, False),
    (2, 2, -1.0, 3, "never"),
    (4, 4, 1.0, 2, True),
]


def _boost_eos(model, eos: int, factor: float) -> None:
    """Sharpen the end-of-sequence row of the output head, so beams finish at different steps."""
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        head[eos] *= factor


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    root = tmp_path_factory.mktemp("beams-bloom")
    hf = make_bloom(root / "hf", hidden=64, n_head=4, vocab=96, init=0.3)
    _boost_eos(hf, BLOOM_EOS, 2.5)  # tied: the embedding row too; saved again below
    hf.save_pretrained(root / "hf")
    gguf = convert(root / "hf", root / "bloom-f32.gguf", quant="f32").output
    return hf, gguf


@pytest.fixture(scope="module")
def gentle(tmp_path_factory):
    """Models whose engines match transformers within 1e-5 (BLOOM at the usual scale, a ReLU
    T5): for log-probabilities and sampling, which need no sharp distributions."""
    root = tmp_path_factory.mktemp("beams-gentle")
    make_bloom(root / "bloom", hidden=64, n_head=4, vocab=96)
    make_t5(root / "t5", vocab=96, ff="relu")
    return (
        convert(root / "bloom", root / "bloom.gguf", quant="f32").output,
        convert(root / "t5", root / "t5.gguf", quant="f32", format="gguf").output,
        convert(root / "t5", root / "t5-ct2", quant="float32", format="ct2").output,
    )


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    root = tmp_path_factory.mktemp("beams-t5")
    hf = make_t5(root / "hf", vocab=96)
    _boost_eos(hf, T5_EOS, 3.0)
    hf.save_pretrained(root / "hf")
    gguf = convert(root / "hf", root / "t5-f32.gguf", quant="f32", format="gguf").output
    ct2 = convert(root / "hf", root / "t5-ct2", quant="float32", format="ct2").output
    return hf, gguf, ct2


class _Renormalize:
    """Appended to transformers' processors: what CTranslate2 does, which bans and penalises
    tokens before normalising the log-probabilities (transformers after)."""

    def __call__(self, input_ids, scores):
        return torch.log_softmax(scores, dim=-1)


def _hf_beams(model, ids, seq2seq, n, beams, ret, lp, ngram, early, renormalize=False):
    extra = {"logits_processor": [_Renormalize()]} if renormalize else {}
    kwargs = dict(
        **extra,
        max_new_tokens=n,
        num_beams=beams,
        num_return_sequences=ret,
        length_penalty=lp,
        no_repeat_ngram_size=ngram,
        early_stopping=early,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        if seq2seq:
            out = model.generate(torch.tensor([ids]), use_cache=False, **kwargs)
            rows, eos = out.sequences[:, 1:], T5_EOS
        else:
            mask = torch.ones(1, len(ids), dtype=torch.long)
            out = model.generate(torch.tensor([ids]), attention_mask=mask, **kwargs)
            rows, eos = out.sequences[:, len(ids) :], BLOOM_EOS
    sequences = []
    for row in rows.tolist():
        sequences.append(row[: row.index(eos) + 1] if eos in row else row)
    return sequences, out.sequences_scores.tolist()


def _ours(model, ids, n, beams, ret, lp, ngram, early):
    result = model.generate(
        ids,
        max_new_tokens=n,
        num_beams=beams,
        num_return_sequences=ret,
        length_penalty=lp,
        no_repeat_ngram_size=ngram,
        early_stopping=early,
    )
    return [r.token_ids for r in result.sequences], [r.score for r in result.sequences]


def _check(ours, theirs):
    """Same sequences in the same order; scores as close as the engines' logits allow (these
    sharp models: 2.3e-4 x max|logit| on llama.cpp, whose CPU GELU reads an f16 table)."""
    (seqs, scores), (hf_seqs, hf_scores) = ours, theirs
    assert seqs == hf_seqs
    assert np.allclose(scores, hf_scores, rtol=5e-4, atol=2e-3)


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_bloom_gguf_beams_equal_transformers(bloom, case):
    hf, gguf = bloom
    with pocketlm.load(gguf, threads=2) as model:
        for ids in BLOOM_PROMPTS:
            _check(_ours(model, ids, 12, *case), _hf_beams(hf, ids, False, 12, *case))


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_t5_gguf_beams_equal_transformers(t5, case):
    hf, gguf, _ = t5
    with pocketlm.load(gguf, threads=2) as model:
        for ids in T5_SOURCES:
            _check(_ours(model, ids, 10, *case), _hf_beams(hf, ids, True, 10, *case))


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_t5_ct2_beams_equal_transformers_with_its_stopping_rule(t5, case):
    hf, _, ct2 = t5
    beams, ret, lp, ngram, early = case
    pinned = True if early is False else early  # CTranslate2 stops at num_beams finished
    with pocketlm.load(ct2, threads=2) as model:
        for ids in T5_SOURCES:
            expected = _hf_beams(hf, ids, True, 10, beams, ret, lp, ngram, pinned, renormalize=True)
            _check(_ours(model, ids, 10, *case), expected)


def test_beams_in_the_scheduler_equal_beams_alone(bloom):
    """Beams are sequences of the scheduler: with other requests running they give the same."""
    _, gguf = bloom
    options = GenerationOptions(max_new_tokens=12, num_beams=4, num_return_sequences=4)
    with pocketlm.load(gguf, threads=2) as model:
        alone = [model.generate(p, options) for p in BLOOM_PROMPTS]
    with pocketlm.load(gguf, threads=2, parallel=4) as model:
        others = [model.stream_tokens(p, max_new_tokens=12, temperature=0.8, seed=3) for p in BLOOM_PROMPTS]
        together = model.generate(BLOOM_PROMPTS, options)
        for stream in others:
            list(stream)
        assert not model.engine.busy
    for a, b in zip(alone, together):
        assert [r.token_ids for r in a.sequences] == [r.token_ids for r in b.sequences]
        assert np.allclose([r.score for r in a.sequences], [r.score for r in b.sequences], rtol=1e-5)


def test_logprobs_are_log_softmax_of_the_models_logits(gentle):
    """Per-token log-probabilities (and the top alternatives) on every backend, greedy and
    beams, equal log-softmax of the parity-tested teacher-forced logits."""
    gguf, t5_gguf, t5_ct2 = gentle
    for path, ids, seq2seq in [
        (gguf, BLOOM_PROMPTS[0], False),
        (t5_gguf, T5_SOURCES[0], True),
        (t5_ct2, T5_SOURCES[0], True),
    ]:
        with pocketlm.load(path, threads=2) as model:
            for options in [
                GenerationOptions(max_new_tokens=8, logprobs=3),
                GenerationOptions(max_new_tokens=8, logprobs=2, num_beams=3, num_return_sequences=2),
                GenerationOptions(max_new_tokens=8, logprobs=0, temperature=0.9, seed=1, repetition_penalty=1.3),
            ]:
                for r in model.generate(ids, options).sequences:
                    assert r.logprobs is not None and len(r.logprobs) == len(r.token_ids)
                    rows = (
                        model.logits(ids, [model.engine.start_token, *r.token_ids])
                        if seq2seq
                        else model.logits([*ids, *r.token_ids])[len(ids) - 1 :]
                    )
                    for row, lp in zip(rows, r.logprobs):
                        expected = log_softmax(row)
                        assert abs(lp.logprob - expected[lp.token_id]) <= 1e-4
                        assert [t for t, _ in lp.top] == list(np.argsort(-expected, kind="stable")[: options.logprobs])
                        assert all(abs(v - expected[t]) <= 1e-4 for t, v in lp.top)


def test_seeded_samples_are_reproducible_and_differ(gentle):
    gguf, t5_gguf, t5_ct2 = gentle
    options = GenerationOptions(max_new_tokens=10, temperature=1.0, seed=11, num_return_sequences=4)
    for path, ids in [(gguf, BLOOM_PROMPTS[0]), (t5_gguf, T5_SOURCES[0]), (t5_ct2, T5_SOURCES[0])]:
        with pocketlm.load(path, threads=2) as model:
            first = [r.token_ids for r in model.generate(ids, options).sequences]
            again = [r.token_ids for r in model.generate(ids, options).sequences]
            one = model.generate(ids, GenerationOptions.of(options, num_return_sequences=1)).token_ids
        assert first == again, path
        assert len({tuple(t) for t in first}) == 4, path
        assert first[0] == one, path  # sample 0 is what one sample with the same seed gives


def test_samples_share_the_prompts_cells(gentle):
    """n samples evaluate the prompt once: the others start from a copy of its cells."""
    gguf = gentle[0]
    with pocketlm.load(gguf, threads=2) as model:
        evaluated = []
        evaluate = model.engine.evaluate

        def spy(work):
            evaluated.append(sum(len(tokens) for _, tokens, _ in work))
            return evaluate(work)

        model.engine.evaluate = spy
        result = model.generate(
            BLOOM_PROMPTS[0], max_new_tokens=5, min_new_tokens=5, temperature=1.0, seed=2, num_return_sequences=3
        )
    assert evaluated[0] == len(BLOOM_PROMPTS[0]) and evaluated[1:] == [3] * 4
    assert [len(r.token_ids) for r in result.sequences] == [5, 5, 5]


def test_clear_errors():
    with pytest.raises(GenerationError, match="temperature 0"):
        GenerationOptions(num_beams=2, temperature=0.7)
    with pytest.raises(GenerationError, match="cannot exceed num_beams"):
        GenerationOptions(num_beams=2, num_return_sequences=3)
    with pytest.raises(GenerationError, match="between 1 and 16"):
        GenerationOptions(num_beams=17)
    with pytest.raises(GenerationError, match="early_stopping"):
        GenerationOptions(num_beams=2, early_stopping="sometimes")


def test_beams_that_do_not_fit_the_cache_are_refused(bloom):
    _, gguf = bloom
    with pocketlm.load(gguf, threads=2, n_ctx=256) as model:
        with pytest.raises(GenerationError, match="KV cache cells"):
            model.generate(BLOOM_PROMPTS[0], max_new_tokens=200, num_beams=4)


def test_groups_through_every_scheduler_equal_alone(t5, gentle):
    """Beams and samples through CTranslate2's engine batches and llama.cpp's T5 cohorts give
    what they give alone, next to ordinary requests."""
    _, t5_gguf, t5_ct2 = t5
    asks = [
        GenerationOptions(max_new_tokens=8, num_beams=3, num_return_sequences=2),
        GenerationOptions(max_new_tokens=8, temperature=1.0, seed=4, num_return_sequences=3),
        GenerationOptions(max_new_tokens=8, logprobs=1),
    ]
    for path in (t5_gguf, t5_ct2):
        with pocketlm.load(path, threads=2) as model:
            alone = [[r.token_ids for r in model.generate(T5_SOURCES[0], o).sequences] for o in asks]
        with pocketlm.load(path, threads=2, parallel=4) as model:
            streams = [model.stream_tokens(T5_SOURCES[0], o) for o in asks]
            plain = model.stream_tokens(T5_SOURCES[1], max_new_tokens=8)
            for stream in [*streams, plain]:
                list(stream)
            together = [[r.token_ids for r in s.result.sequences] for s in streams]
        assert together == alone, path


def test_generation_defaults_choose_beams_and_calls_override_them(gentle):
    """A model's generation_config defaults (here num_beams 3) apply to calls that leave them
    out; a call's own options win."""
    gguf = gentle[0]
    with pocketlm.load(gguf, threads=2) as model:
        explicit = model.generate(BLOOM_PROMPTS[0], max_new_tokens=6, num_beams=3, num_return_sequences=2)
        greedy = model.generate(BLOOM_PROMPTS[0], max_new_tokens=6)
        model.generation_defaults = {"num_beams": 3, "num_return_sequences": 2}
        defaulted = model.generate(BLOOM_PROMPTS[0], max_new_tokens=6)
        assert [r.token_ids for r in defaulted.sequences] == [r.token_ids for r in explicit.sequences]
        assert model.generate(BLOOM_PROMPTS[0], max_new_tokens=6, num_beams=1, num_return_sequences=1).token_ids == (
            greedy.token_ids
        )
        sampled = model.generate(BLOOM_PROMPTS[0], max_new_tokens=6, temperature=0.8, seed=1)  # beams give way
        assert sampled.score is None and not sampled.others

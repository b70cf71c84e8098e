"""Structured output and logit_bias (issue 27): every output matches its constraint, on every
engine, greedy, sampled (n = 3) and with beams; what a vocabulary cannot write is refused in one
line; masks filled together equal masks filled one by one; a constrained sequence decoded beside
others is the sequence decoded alone."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from reference import make_t5

import pocketlm
from pocketlm.converters.core.errors import RequestError
from pocketlm.converters.synthetic import build_random_bloom
from pocketlm.core.constraints import allowed, fill_masks

PROMPT = "Review: this movie was great! Is this review positive or negative?"
LABELS = ["positive", "negative", "neutral"]
# letters both test vocabularies have (the T5 one was trained on tests/reference.py's corpus: no digits)
REGEX = r"(yes|no), [a-f]{2,3}"
LARK = 'start: answer " " letter\nanswer: "yes" | "no"\nletter: /[a-f]/'
GBNF = 'root ::= ("yes" | "no") " " [a-f]'
SCHEMA = {  # bounded, so that even a random model completes it
    "type": "object",
    "properties": {"label": {"enum": LABELS}, "score": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["label", "score"],
    "additionalProperties": False,
}
MODES = {
    "greedy": {},
    "sampled": {"temperature": 1.0, "seed": 7, "num_return_sequences": 3},
    "beams": {"num_beams": 3, "num_return_sequences": 3},
}


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bloom")
    hf = build_random_bloom(folder / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512, std=0.2)
    path = pocketlm.convert(hf, folder / "m.gguf", quant="f32").output
    with pocketlm.load(path, n_ctx=512, threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory, t5_tokenizer_files):
    folder = tmp_path_factory.mktemp("t5")
    make_t5(folder / "hf", vocab=300, tokenizer_files={"tokenizer.json": t5_tokenizer_files["tokenizer.json"]})
    return folder


@pytest.fixture(scope="module")
def t5_gguf(t5_folder):
    path = pocketlm.convert(t5_folder / "hf", t5_folder / "m.gguf", format="gguf", quant="f32").output
    with pocketlm.load(path, n_ctx=256, threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def t5_ct2(t5_folder):
    path = pocketlm.convert(t5_folder / "hf", t5_folder / "m-ct2", format="ct2", quant="float32").output
    with pocketlm.load(path, threads=1) as model:
        yield model


@pytest.fixture(params=["bloom", "t5_gguf", "t5_ct2"])
def model(request):
    return request.getfixturevalue(request.param)


def decoded_together(model, prompts, kinds, n):
    """Each request's token ids, all submitted before any is read (decoded together)."""
    streams = [model.stream_tokens(p, model.options(max_new_tokens=n, **k)) for p, k in zip(prompts, kinds)]
    for s in streams:
        with s:
            for _ in s:
                pass
    return [s.result.token_ids for s in streams]


def outputs(result):
    return [result, *(result.others or [])]


def check(results, matches) -> None:
    for r in results:
        assert matches(r.text), (r.text, r.finish_reason)
        assert r.finish_reason == "stop", (r.text, r.finish_reason)  # the constraint was complete


# CTranslate2's own beam search takes no per-step rule: constrained beams are refused there (below)
PATHS = [(e, m) for e in ("bloom", "t5_gguf", "t5_ct2") for m in MODES if (e, m) != ("t5_ct2", "beams")]


@pytest.mark.parametrize("engine, mode", PATHS)
def test_choice_regex_and_grammars_hold_on_every_path(request, engine, mode):
    model = request.getfixturevalue(engine)
    options = MODES[mode]
    for kw, matches in [
        ({"choice": LABELS}, lambda t: t in LABELS),
        ({"regex": REGEX}, lambda t: re.fullmatch(REGEX, t)),
        ({"grammar": LARK}, lambda t: re.fullmatch(r"(yes|no) [a-f]", t)),
        ({"grammar": GBNF}, lambda t: re.fullmatch(r"(yes|no) [a-f]", t)),
    ]:
        result = model.generate(PROMPT, max_new_tokens=40, **kw, **options)
        got = outputs(result)
        assert len(got) == options.get("num_return_sequences", 1) or mode == "beams"
        check(got, matches)


@pytest.mark.parametrize("mode", MODES)
def test_json_schema_output_is_valid_json_under_the_schema(bloom, mode):
    result = bloom.generate(PROMPT, max_new_tokens=60, json_schema=SCHEMA, **MODES[mode])
    for r in outputs(result):
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), SCHEMA)


def test_streamed_text_is_the_constrained_text(bloom):
    whole = bloom.generate(PROMPT, max_new_tokens=40, regex=REGEX)
    pieces = "".join(bloom.stream(PROMPT, max_new_tokens=40, regex=REGEX))
    assert pieces == whole.text and re.fullmatch(REGEX, pieces)


@pytest.mark.parametrize("name", ["t5_gguf", "t5_ct2"])
def test_json_on_a_vocabulary_without_braces_is_refused_naming_them(request, name):
    with pytest.raises(RequestError) as e:
        request.getfixturevalue(name).generate(PROMPT, json_schema=SCHEMA)
    assert str(e.value).count("\n") == 0 and "'{'" in str(e.value), str(e.value)


@pytest.mark.parametrize("name", ["t5_gguf", "t5_ct2"])
def test_a_dead_end_inside_the_constraint_is_refused_naming_what_is_missing(request, name):
    with pytest.raises(RequestError) as e:
        request.getfixturevalue(name).generate(PROMPT, regex=r"(yes|no), [0-9]+")
    assert "'0', '1', '2'" in str(e.value) and "\n" not in str(e.value)


def test_ct2_refuses_constrained_beams_in_one_line(t5_ct2):
    for kw in [{"choice": LABELS}, {"logit_bias": {5: 1}}]:
        with pytest.raises(RequestError, match="beam search with a constraint") as e:
            t5_ct2.generate(PROMPT, num_beams=2, **kw)
        assert "\n" not in str(e.value)


def test_ct2_constrained_requests_decoded_together_equal_each_alone(t5_ct2):
    kinds = [{"regex": REGEX}, {"choice": LABELS}, {"grammar": GBNF}, {"logit_bias": {7: 5.0}}]
    alone = [t5_ct2.generate(PROMPT, max_new_tokens=20, **k).token_ids for k in kinds]
    assert decoded_together(t5_ct2, [PROMPT] * len(kinds), kinds, 20) == alone


def test_invalid_constraints_are_one_line_request_errors(bloom):
    for kw in [{"regex": "(a"}, {"grammar": "start: undefined_rule"}, {"json_schema": '{"type": "nonsense"}'}]:
        with pytest.raises(RequestError) as e:
            bloom.generate(PROMPT, max_new_tokens=4, **kw)
        assert "\n" not in str(e.value) and str(e.value).startswith(next(iter(kw))), str(e.value)


def test_logit_bias_100_makes_greedy_output_that_token(model):
    token = [t for t in model.tokenize("positive") if not model.engine.is_end(t)][-1]
    result = model.generate(PROMPT, max_new_tokens=5, logit_bias={str(token): 100})
    assert result.token_ids == [token] * 5
    banned = model.generate(PROMPT, max_new_tokens=5)
    again = model.generate(PROMPT, max_new_tokens=5, logit_bias={t: -100 for t in set(banned.token_ids)})
    assert not set(again.token_ids) & set(banned.token_ids)


def test_logit_bias_outside_the_vocabulary_is_refused(bloom):
    with pytest.raises(RequestError, match="outside the vocabulary"):
        bloom.generate(PROMPT, max_new_tokens=2, logit_bias={10**6: 5})


def test_masks_filled_together_equal_masks_filled_alone(bloom):
    vocabulary = bloom.engine.vocabulary()
    constraint = vocabulary.constraint("regex", REGEX)
    guides = [constraint.guide() for _ in range(4)]
    tokens = bloom.tokenize("yes, ab")
    for k, g in enumerate(guides):  # guide k has taken the first k tokens
        for token in tokens[:k]:
            g.advance(token)
    alone = []
    for g in guides:
        g.mask = None
        alone.append(g.fill().copy())
        g.mask = None
    fill_masks(guides)
    assert all(np.array_equal(g.mask, a) for g, a in zip(guides, alone))
    assert all(a.any() for a in alone) and not np.array_equal(alone[0], alone[2])
    assert allowed(np.array([5], dtype=np.int32), 4).tolist() == [True, False, True, False]


def test_a_constrained_sequence_among_others_is_the_sequence_alone(tmp_path):
    hf = build_random_bloom(tmp_path / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512, std=0.2)
    path = pocketlm.convert(hf, tmp_path / "m.gguf", quant="f32").output
    prompts = [PROMPT, "Name a colour.", "Is it raining?", "Count: one, two,"]
    kinds = [{"regex": REGEX}, {"choice": LABELS}, {}, {"grammar": GBNF}]
    with pocketlm.load(path, n_ctx=512, threads=1) as alone_model:
        alone = [alone_model.generate(p, max_new_tokens=30, **k).token_ids for p, k in zip(prompts, kinds)]
    with pocketlm.load(path, n_ctx=512, threads=1, parallel=4) as model:
        together = decoded_together(model, prompts, kinds, 30)
    assert together == alone


def test_ct2_appends_forced_tokens_without_a_model_call(t5_ct2):
    counts = t5_ct2.engine.stepwise_counts
    before = dict(counts)
    result = t5_ct2.generate(PROMPT, max_new_tokens=20, choice=["positive"])
    assert result.text == "positive" and result.finish_reason == "stop"
    chosen = counts["tokens"] - before.get("tokens", 0)  # tokens the sampler chose from logits
    assert chosen == 1 and len(result.token_ids) > 1, (chosen, result.token_ids)


@pytest.mark.parametrize("name", ["bloom", "t5_gguf"])
def test_llama_evaluates_forced_tokens_with_the_token_before_them(request, name):
    """On llama.cpp the tokens a constraint forces are evaluated together with the token
    chosen before them (one engine step, no choice of their own), and are the same whether or
    not log-probabilities are asked; those log-probabilities are the model's own (teacher-forced)."""
    model = request.getfixturevalue(name)
    label = "positive" if name == "bloom" else "yes"
    steps = model.scheduler.steps
    result = model.generate(PROMPT, max_new_tokens=20, choice=[label])
    assert result.text == label and result.finish_reason == "stop"
    assert len(result.token_ids) > 1 and model.scheduler.steps - steps == 1, result.token_ids  # the prompt's step

    schema = model.generate(PROMPT, max_new_tokens=40, json_schema=SCHEMA) if name == "bloom" else None
    if schema is not None:
        jsonschema.validate(json.loads(schema.text), SCHEMA)
        scored = model.generate(PROMPT, max_new_tokens=40, json_schema=SCHEMA, logprobs=1)
        assert scored.token_ids == schema.token_ids
        ids = model.tokenize(PROMPT)
        logits = model.logits(ids + scored.token_ids).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
        teacher = [logits[len(ids) - 1 + i, t] for i, t in enumerate(scored.token_ids)]
        got = np.array([lp.logprob for lp in scored.logprobs])
        assert np.abs(got - teacher).max() < 1e-3, np.abs(got - teacher).max()


def test_llguidance_errors_read_as_one_line():
    from pocketlm.core.constraints import one_line

    raw = 'at 1(9): invalid regex "(" (in regex): regex parse error:\n    (\n    ^\nerror: unclosed group\n   1 | /(/\n'
    assert one_line(raw) == 'invalid regex "(": unclosed group'
    assert one_line('unknown name: "foo"') == 'unknown name: "foo"'


def test_a_constraint_only_a_longer_token_spells_is_not_refused():
    """'w13' is one token, and the shorter 'w1' leads nowhere (no token starts with '3')."""
    from pocketlm.core.constraints import Vocabulary

    tokens = [None, b" w1", b" w13", b" w2", b"w", b"1", b"2"]  # id 0: the end token
    vocabulary = Vocabulary(tokens, [0], drops_leading_space=True)
    constraint = vocabulary.constraint("choice", ("w13",))
    guide = constraint.guide()
    guide.advance(2)
    assert guide.stopped
    with pytest.raises(RequestError, match="'3'"):  # no token writes a '3' after 'w1' or alone
        Vocabulary([None, b" w1", b" w2", b"w", b"1"], [0], drops_leading_space=True).constraint("choice", ("w13",))

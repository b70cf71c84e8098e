"""Every registered architecture x format x backend matches transformers on the same token ids.

The cells come from the registries (convert/architectures/, runtime/backends/) and the checks
and tolerances from REFERENCES in tests/parity.py: registering an architecture (or a backend
for a format) adds its rows here; one registered without a reference fails
test_every_registered_pair_has_a_reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from parity import (
    EXEMPT,
    REFERENCES,
    WIDE,
    Causal,
    Cell,
    FormatChecks,
    Pair,
    Probe,
    assert_close,
    checked,
    log_likelihood,
    matrix,
    prefix_kept,
    top1_agreement,
)

from pocketlm.converters.core.errors import GenerationError


@dataclass
class Subject:
    cell: Cell
    hf: Causal  # transformers' side: inputs, logits, greedy ids
    model: Any  # ours, loaded with pocketlm.load
    checks: FormatChecks


def _per_config(*, quants: str = "first", only=lambda pair, checks: True) -> list:
    """pytest params: one Cell per config of every checked pair and backend, at the per-config
    quant ("first") or at each quant with a Logits check ("logits")."""
    params = []
    for pair in checked():
        ref = REFERENCES[pair.arch]
        checks = ref.formats[pair.fmt]
        if not only(pair, checks):
            continue
        for quant in [checks.quant] if quants == "first" else [c.quant for c in checks.logits]:
            for backend in pair.backends:
                for config in ref.configs_for(pair.fmt):
                    cell = Cell(pair.arch, pair.fmt, backend, config, quant)
                    params.append(pytest.param(cell, id=cell.id))
    return params


def _wide(what) -> list:
    """pytest params (pair, backend, item) for each item what(pair, checks) lists."""
    params = []
    for pair in checked():
        for backend in pair.backends:
            for item, name in what(pair, REFERENCES[pair.arch].formats[pair.fmt]):
                params.append(pytest.param(pair, backend, item, id=f"{pair.id}-{backend}-{name}"))
    return params


@pytest.fixture(scope="module")
def subject(request, checkpoints):
    """One Cell's model, loaded once for all the tests of the cell (pytest groups them)."""
    cell: Cell = request.param
    with checkpoints.load(cell) as model:
        yield Subject(cell, checkpoints.hf(cell.arch, cell.config), model, REFERENCES[cell.arch].formats[cell.fmt])


# -- the registries and the table agree ------------------------------------------------------------


@pytest.mark.parametrize("pair", [pytest.param(p, id=p.id) for p in matrix()])
def test_every_registered_pair_has_a_reference(pair: Pair):
    if (pair.arch, pair.fmt) in EXEMPT:
        pytest.skip(f"{pair.id} is exempt from parity tests: {EXEMPT[pair.arch, pair.fmt]}")
    problem = pair.problem()
    assert problem is None, problem


def test_every_reference_is_registered():
    registered = {(p.arch, p.fmt) for p in matrix()}
    stale = [(a, f) for a, ref in REFERENCES.items() for f in ref.formats if (a, f) not in registered]
    stale += [pair for pair in EXEMPT if pair not in registered]
    assert not stale, f"REFERENCES/EXEMPT name pairs no architecture registers: {stale}"


def test_an_architecture_registered_without_a_reference_gets_a_failing_test():
    from pocketlm.backends import backends
    from pocketlm.converters.architectures import Architecture, Target

    def plan(*_):
        raise AssertionError("not converted")

    new = Architecture("newarch", ("NewArchForCausalLM",), {"gguf": Target(plan)})
    more = Architecture("bloom", ("BloomForCausalLM",), {"gguf": Target(plan), "ct2": Target(plan)})
    pairs = {p.id: p for p in matrix([new, more], backends())}
    assert pairs.keys() == {"newarch-gguf", "bloom-gguf", "bloom-ct2"}
    assert "'newarch' is registered but has no parity reference" in pairs["newarch-gguf"].problem()
    assert "has no checks for ct2" in pairs["bloom-ct2"].problem()
    assert pairs["bloom-gguf"].problem() is None and pairs["bloom-gguf"].backends == ("llama.cpp",)
    assert "no registered backend runs gguf" in matrix([more], [])[0].problem()


# -- every config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("subject", _per_config(quants="logits"), indirect=True)
def test_logits_match_transformers(subject):
    hf, model = subject.hf, subject.model
    check = next(c for c in subject.checks.logits if c.quant == subject.cell.quant)
    worst = 0.0
    for case in hf.cases(check.probe):
        expected = hf.logits(*case)
        got = model.logits(*case)
        assert got.dtype == np.float32 and got.shape == (len(case[-1]), hf.vocab)
        worst = max(worst, assert_close(got, expected, check.tolerance, f"{check.quant} logits"))
    print(f"\n{check.quant} logits: max abs diff {worst:.1e} x max|logit|")


@pytest.mark.parametrize("subject", _per_config(), indirect=True)
def test_greedy_equals_transformers(subject):
    hf, model, greedy = subject.hf, subject.model, subject.checks.greedy
    prompts = hf.prompts(greedy.probe)
    for prompt in prompts:
        assert model.generate(prompt, max_new_tokens=greedy.tokens).token_ids == hf.greedy(prompt, greedy.tokens)
    if greedy.penalty is not None:
        expected = hf.greedy(prompts[-1], greedy.tokens, repetition_penalty=greedy.penalty)
        got = model.generate(prompts[-1], max_new_tokens=greedy.tokens, repetition_penalty=greedy.penalty)
        assert got.token_ids == expected
        assert len(set(expected)) >= greedy.distinct, "degenerate reference: the test would prove little"


@pytest.mark.parametrize("subject", _per_config(), indirect=True)
def test_batch_generation_equals_one_by_one(subject):
    hf, model = subject.hf, subject.model
    prompts = [hf.prompts(Probe((n,), n))[0] for n in (4, 9, 15)]
    batch = model.generate(prompts, max_new_tokens=12)
    assert [r.token_ids for r in batch] == [model.generate(p, max_new_tokens=12).token_ids for p in prompts]


@pytest.mark.parametrize("subject", _per_config(only=lambda pair, checks: checks.score is not None), indirect=True)
def test_score_is_the_target_log_likelihood(subject):
    hf, model, score = subject.hf, subject.model, subject.checks.score
    prompt = hf.prompts(score.probe)[0]
    candidates = [list(c) for c in score.candidates]
    for cand, got in zip(candidates, model.score(prompt, candidates)):
        rows = hf.score_rows(prompt, cand).astype(np.float64)
        assert got == pytest.approx(log_likelihood(rows, cand), abs=score.tolerance(cand, rows))


@pytest.mark.parametrize("subject", _per_config(only=lambda pair, checks: pair.encoder_decoder), indirect=True)
def test_decoder_ids_must_start_with_the_start_token(subject):
    hf, model = subject.hf, subject.model
    with pytest.raises(GenerationError, match="decoder start token"):
        model.logits([5, hf.end], [7, 8])
    assert model.logits([5, hf.end]).shape == (1, model.info.vocab_size)


# -- quantized ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pair, backend, agreement", _wide(lambda pair, checks: [(a, a.name) for a in checks.agreements])
)
def test_quantized_agreement(checkpoints, pair, backend, agreement):
    hf = checkpoints.hf(pair.arch, WIDE)
    cell = Cell(pair.arch, pair.fmt, backend, WIDE, agreement.quant)
    summary = checkpoints.converted(pair.arch, WIDE, pair.fmt, agreement.quant)
    agree, kept = [], []
    with checkpoints.load(cell, **dict(agreement.load)) as model:
        info = model.info
        assert (info.quant, info.format, info.architecture) == (agreement.quant, pair.fmt, pair.arch)
        assert agreement.reason in " | ".join(info.reasons), info.reasons
        for case in hf.cases(agreement.probe):
            agree.append(top1_agreement(model.logits(*case), hf.logits(*case)))
            if agreement.kept is not None:
                expected = hf.greedy(case[0], agreement.tokens)
                kept.append(prefix_kept(expected, model.generate(case[0], max_new_tokens=agreement.tokens).token_ids))
    print(
        f"\n{agreement.name}: top-1 agreement {np.mean(agree):.3f}"
        + (f", greedy prefix kept {np.mean(kept):.2f}" if kept else "")
        + f", types {summary.types}"
    )
    assert np.mean(agree) >= agreement.top1, f"{agreement.name}: top-1 agreement {np.mean(agree):.3f}"
    if agreement.kept is not None:
        assert np.mean(kept) >= agreement.kept, f"{agreement.name}: greedy prefix kept {np.mean(kept):.2f}"


def _every_quant(pair: Pair, checks) -> list:
    logits_checked = {c.quant for c in checks.logits}
    return [(q, q) for q in pair.quants if q not in logits_checked]


@pytest.mark.parametrize("pair, backend, quant", _wide(_every_quant))
def test_every_quant_type_converts_loads_and_runs(checkpoints, pair, backend, quant):
    spec = REFERENCES[pair.arch].formats[pair.fmt].every_quant
    hf = checkpoints.hf(pair.arch, WIDE)
    summary = checkpoints.converted(pair.arch, WIDE, pair.fmt, quant)
    assert summary.quant == quant
    if spec.no_fallbacks:
        assert not summary.fallbacks, summary.describe()
    if spec.main_type:
        main_type = quant[:4] if "_k" in quant else quant  # q4_k_m is mostly q4_k tensors
        assert main_type in summary.types, summary.types
    with checkpoints.load(Cell(pair.arch, pair.fmt, backend, WIDE, quant)) as model:
        assert model.info.quant == quant
        result = model.generate(hf.prompts(spec.generate)[0], max_new_tokens=spec.tokens)
        assert len(result.token_ids) == spec.tokens and result.finish_reason == "length"
        case = hf.cases(spec.probe)[0]
        agreement = top1_agreement(model.logits(*case), hf.logits(*case))
    print(f"\n{quant}: top-1 agreement {agreement:.2f}")
    if spec.top1 is not None:
        assert agreement >= spec.top1, f"{quant}: top-1 agreement {agreement:.2f} (broken, not just quantized)"

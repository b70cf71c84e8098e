"""The scheduler decodes many sequences together: each gets exactly what it gets alone.

Tiny f32 models (parity-grade): greedy tokens equal and logits within 1e-4 x max|logit| (the
T5 GGUF path within its parity bound) whatever joins when; seeded sampling reproducible
whatever else runs; closed streams free their slots; long prompts are prefilled in chunks
between decode steps; the KV budget is never overcommitted.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from parity import relative_error
from reference import make_t5
from stepping import advance, start

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.synthetic import build_random_bloom
from pocketlm.core.generation import GenerationOptions

PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 101, 102], [33, 34, 35, 36, 37, 38, 39, 40, 41], [7] * 20]


@pytest.fixture(scope="module")
def bloom(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched")
    folder = build_random_bloom(root / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512, std=0.2)
    return convert(folder, root / "m-f32.gguf", quant="f32").output


@pytest.fixture(scope="module")
def t5_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched-t5")
    make_t5(root / "hf", vocab=140)
    return convert(root / "hf", root / "t5-f32.gguf", quant="f32", format="gguf").output


def _recording(model):
    """Record the logits each sequence was sampled from, by its prompt."""
    seen: dict[tuple[int, ...], list[np.ndarray]] = {}
    accept = model.scheduler._accept

    def record(request, outputs):
        for seq, logits in outputs:
            if logits is not None:
                seen.setdefault(tuple(seq.ids), []).append(logits.copy())
        accept(request, outputs)

    model.scheduler._accept = record
    return seen


def _alone(path, prompts, options, **load):
    """Tokens and per-step logits of each prompt decoded by itself."""
    out = {}
    with pocketlm.load(path, threads=2, **load) as model:
        for p in prompts:
            seq = model.decoding(p, options)
            rows, tokens = [], []
            with model.engine.lock:
                logits = start(model.engine, seq, options.max_new_tokens)
                for i in range(options.max_new_tokens):
                    rows.append(logits)
                    token = seq.sampler(logits, seq.seen)
                    seq.seen.append(token)
                    tokens.append(token)
                    if model.engine.is_end(token) or i + 1 == options.max_new_tokens:
                        break
                    logits = advance(model.engine, [seq], [token])[0]
                model.engine.release(seq)
            out[tuple(seq.ids)] = (tokens, np.stack(rows))
    return out


def _close(a, b, bound):
    return a.shape == b.shape and relative_error(b, a) <= bound


def test_sequences_joining_at_different_steps_match_each_alone(bloom):
    options = GenerationOptions(max_new_tokens=12, min_new_tokens=12)
    alone = _alone(bloom, PROMPTS, options)
    with pocketlm.load(bloom, threads=2, parallel=3) as model:
        assert model.info.parallel == 3 and model.info.kv_cells >= 3 * 1
        logits = _recording(model)
        first = model.stream_tokens(PROMPTS[0], options)
        got = {0: [next(first).token_id for _ in range(3)]}  # the first is 3 tokens in
        second = model.stream_tokens(PROMPTS[1], options)
        got[1] = [next(second).token_id]
        rest = [model.stream_tokens(p, options) for p in PROMPTS[2:]]  # one more than the slots: waits
        got[0] += [e.token_id for e in first if e.token_id is not None]
        got[1] += [e.token_id for e in second if e.token_id is not None]
        for i, stream in enumerate(rest, 2):
            got[i] = [e.token_id for e in stream if e.token_id is not None]
        assert model.scheduler.load == (0, 0) and not model.engine.busy
    for i, prompt in enumerate(PROMPTS):
        tokens, rows = alone[tuple(prompt)]
        assert got[i] == tokens, i
        assert _close(rows, np.stack(logits[tuple(prompt)]), 1e-4), i


def test_seeded_sampling_is_reproducible_whatever_else_runs(bloom):
    seeded = GenerationOptions(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    with pocketlm.load(bloom, threads=2) as model:
        alone = model.generate(PROMPTS[0], seeded).token_ids
    with pocketlm.load(bloom, threads=2, parallel=4) as model:
        others = [model.stream_tokens(p, max_new_tokens=16, temperature=1.3, seed=i) for i, p in enumerate(PROMPTS[1:])]
        mine = model.generate(PROMPTS[0], seeded).token_ids
        for stream in others:
            list(stream)
    assert mine == alone


def test_generate_of_a_list_goes_through_the_scheduler(bloom):
    with pocketlm.load(bloom, threads=2) as model:
        expected = [model.generate(p, max_new_tokens=8).token_ids for p in PROMPTS]
    with pocketlm.load(bloom, threads=2, parallel=2) as model:
        results = model.generate(PROMPTS, max_new_tokens=8)
        assert [r.token_ids for r in results] == expected
        assert model.scheduler.steps < sum(len(r.token_ids) for r in results)  # shared steps


def test_a_closed_stream_frees_its_slot_at_the_next_step(bloom):
    with pocketlm.load(bloom, threads=2, parallel=2) as model:
        a = model.stream_tokens(PROMPTS[0], max_new_tokens=200, min_new_tokens=200)
        b = model.stream_tokens(PROMPTS[1], max_new_tokens=200, min_new_tokens=200)
        next(a), next(b)
        a.close()  # the client went away
        c = model.stream_tokens(PROMPTS[2], max_new_tokens=4)
        assert len([e for e in c if e.token_id is not None]) == 4  # got a's slot while b runs
        b.close()
        model.generate(PROMPTS[3], max_new_tokens=2)
        assert model.scheduler.load == (0, 0) and not model.engine.busy


@pytest.mark.parametrize("kind", ["bloom", "t5_ct2"])
def test_cancel_from_another_thread_ends_a_running_and_a_waiting_request(kind, request):
    """What a server does when a client leaves: the reader is blocked in the stream, another
    thread cancels; the running request stops at the next step, the waiting one leaves the queue."""
    path = request.getfixturevalue(kind)
    prompts = PROMPTS if kind == "bloom" else CT2_SOURCES
    with pocketlm.load(path, threads=2, parallel=1 if kind == "bloom" else 2) as model:
        model.scheduler.window = 0  # CTranslate2: no batch window, so the second request waits
        running = model.stream_tokens(prompts[0], max_new_tokens=200, min_new_tokens=200)
        waiting = model.stream_tokens(prompts[1], max_new_tokens=200, min_new_tokens=200)
        read: dict[str, list] = {"running": [], "waiting": []}

        def reader(name, stream):
            for event in stream:
                read[name].append(event)

        threads = [threading.Thread(target=reader, args=item) for item in (("running", running), ("waiting", waiting))]
        for t in threads:
            t.start()
        while not read["running"]:
            threading.Event().wait(0.01)
        waiting.cancel()
        running.cancel()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert len(read["running"]) < 200 and running.cancelled
        assert model.scheduler.load == (0, 0)
        assert model.generate(prompts[2], max_new_tokens=3).token_ids  # the model is free


def test_a_long_prompt_is_prefilled_between_decode_steps(bloom):
    long_prompt = list(range(20, 420))
    with pocketlm.load(bloom, threads=2, parallel=2, n_ctx=512) as model:
        model.scheduler.prefill_chunk = 64
        fed: list[list[int]] = []
        evaluate = model.engine.evaluate

        def spy(work):
            fed.append([len(tokens) for _, tokens, _ in work])
            return evaluate(work)

        model.engine.evaluate = spy
        # the scheduler decodes ahead of its reader: this one is still running when the long one comes
        running = model.stream_tokens(PROMPTS[0], max_new_tokens=400, min_new_tokens=400)
        next(running)
        long = model.stream_tokens(long_prompt, max_new_tokens=2)
        list(long)
        running.close()
    chunked = [step for step in fed if 64 in step]
    assert len(chunked) == len(long_prompt) // 64  # 400 tokens: 6 chunks of 64, then 16 with logits
    assert all(1 in step for step in chunked)  # the running stream advanced at each of those steps


def test_the_kv_budget_is_never_overcommitted(bloom):
    options = GenerationOptions(max_new_tokens=40, min_new_tokens=40)
    with pocketlm.load(bloom, threads=2) as model:
        expected = [model.generate(p, options).token_ids for p in PROMPTS[:2]]
    # 256 cells: each request reserves prompt + 40; the third of these must wait
    with pocketlm.load(bloom, threads=2, parallel=3, n_ctx=256, kv_cells=100) as model:
        peak = []
        admit = model.engine.admit

        def spy(seq, reserve, followers=()):
            admit(seq, reserve, followers)
            peak.append(sum(model.engine.busy.values()))

        model.engine.admit = spy
        results = model.generate([PROMPTS[0], PROMPTS[1], PROMPTS[0]], options)
        assert [r.token_ids for r in results] == [expected[0], expected[1], expected[0]]
        assert max(peak) <= model.engine.kv_cells


def test_t5_gguf_sequences_arriving_together_match_each_alone(t5_gguf):
    sources = [[5, 9, 12, 1], [40, 41, 42, 43, 44, 45, 1], [77, 1]]
    options = GenerationOptions(max_new_tokens=8, min_new_tokens=8)
    alone = _alone(t5_gguf, sources, options)
    with pocketlm.load(t5_gguf, threads=2, parallel=3) as model:
        logits = _recording(model)
        results = model.generate(sources, options)
        assert model.scheduler.steps == 8  # one engine call per step for the three
    for src, result in zip(sources, results):
        tokens, rows = alone[tuple(src)]
        assert result.token_ids == tokens
        # llama.cpp's f16 GELU table makes summation-order differences visible (ENGINE_FACTS)
        assert _close(rows, np.stack(logits[tuple(src)]), 5e-4)


def test_t5_gguf_requests_arriving_later_wait_for_the_next_cohort(t5_gguf):
    with pocketlm.load(t5_gguf, threads=2) as model:
        expected = [model.generate(s, max_new_tokens=6).token_ids for s in ([5, 9, 1], [40, 41, 1])]
    with pocketlm.load(t5_gguf, threads=2, parallel=2) as model:
        first = model.stream_tokens([5, 9, 1], max_new_tokens=6, min_new_tokens=6)
        next(first)
        later = model.stream_tokens([40, 41, 1], max_new_tokens=6)
        done = threading.Event()
        tokens = []

        def read():
            tokens.extend(e.token_id for e in later if e.token_id is not None)
            done.set()

        threading.Thread(target=read).start()
        assert [e.token_id for e in first if e.token_id is not None][:5] == expected[0][1:6]
        assert done.wait(60) and tokens == expected[1]


@pytest.fixture(scope="module")
def t5_ct2(tmp_path_factory):
    root = tmp_path_factory.mktemp("sched-ct2")
    make_t5(root / "hf", vocab=140, head="untied")
    return convert(root / "hf", root / "ct2", quant="float32").output


CT2_SOURCES = [[5, 9, 12, 1], [40, 41, 42, 43, 44, 45, 1], [77, 1], [3, 4, 5, 6, 1]]


def test_ctranslate2_requests_waiting_together_run_as_one_batch(t5_ct2):
    options = GenerationOptions(max_new_tokens=10)
    with pocketlm.load(t5_ct2) as model:
        alone = [model.generate(s, options) for s in CT2_SOURCES]
    with pocketlm.load(t5_ct2, parallel=4) as model:
        assert model.info.parallel == 4
        batch = model.generate_batch(CT2_SOURCES, options)  # submitted together: one batch
        assert model.scheduler.steps == 1
        streams = [model.stream_tokens(s, options) for s in CT2_SOURCES]  # one by one: the first
        results = []  # starts alone, those arriving meanwhile go together
        for stream in streams:
            list(stream)
            results.append(stream.result)
        assert model.scheduler.steps < 1 + len(CT2_SOURCES)
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    assert [r.text for r in results] == [r.text for r in alone]
    assert [r.finish_reason for r in results] == [r.finish_reason for r in alone]


def test_ctranslate2_batches_stop_each_request_on_its_own(t5_ct2):
    with pocketlm.load(t5_ct2) as model:
        long = model.generate(CT2_SOURCES[1], max_new_tokens=12).token_ids
        short = model.generate(CT2_SOURCES[0], max_new_tokens=3).token_ids
        sampled = model.generate(CT2_SOURCES[2], max_new_tokens=8, temperature=0.8, seed=3).token_ids
    with pocketlm.load(t5_ct2, parallel=4) as model:
        results = model.generate_batch([CT2_SOURCES[1], CT2_SOURCES[0]], GenerationOptions(max_new_tokens=12))
        assert results[0].token_ids == long
        cut = model.stream_tokens(CT2_SOURCES[0], max_new_tokens=3)
        seeded = model.stream_tokens(CT2_SOURCES[2], max_new_tokens=8, temperature=0.8, seed=3)
        gone = model.stream_tokens(CT2_SOURCES[3], max_new_tokens=200, min_new_tokens=200)
        next(gone)
        gone.close()  # stops that entry at its next token
        assert [e.token_id for e in cut if e.token_id is not None] == short
        assert [e.token_id for e in seeded if e.token_id is not None] == sampled  # seeded: exact, alone
        model.generate(CT2_SOURCES[0], max_new_tokens=2)
        assert model.scheduler.load == (0, 0)


def _score_one_by_one(model, prompt, candidates):
    """The definition: each candidate's log-likelihood from its own teacher-forced logits."""
    context = model.prompt_ids(prompt)
    out = []
    for cand in candidates:
        logits = model.engine.continuation_logits(context, cand).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        out.append(float(np.sum(logits[np.arange(len(cand)), cand] - logz)))
    return out


CANDIDATES = [[70], [71, 72], [73, 74, 75, 76], [80, 81, 82], [90, 91]]


@pytest.mark.parametrize("parallel", [1, 6])
def test_score_shares_the_prompt_and_batches_the_candidates(bloom, parallel):
    prompt = list(range(10, 60))
    with pocketlm.load(bloom, threads=2) as model:
        expected = _score_one_by_one(model, prompt, CANDIDATES)
    with pocketlm.load(bloom, threads=2, parallel=parallel) as model:
        calls = []
        evaluate = model.engine._s.evaluate

        def counting(entries, **kw):
            calls.append(sum(len(tokens) for _, tokens, _, _ in entries))
            return evaluate(entries, **kw)

        model.engine._s.evaluate = counting
        got = model.score(prompt, CANDIDATES)
        first = list(calls)
        again = model.score(prompt, CANDIDATES)  # the prompt is still cached: only its last token is read
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-4) and again == pytest.approx(got, rel=1e-5, abs=1e-5)
    tails = sum(len(c) - 1 for c in CANDIDATES)
    assert first[0] == len(prompt) and sum(first[1:]) == tails  # the prompt once, each candidate's tokens once
    assert calls[len(first)] == 1 and sum(calls[len(first) + 1 :]) == tails
    if parallel > 1:
        assert len(first) == 2  # the prompt, then every candidate in one batch


def test_ctranslate2_score_is_one_batch(t5_ct2):
    with pocketlm.load(t5_ct2) as model:
        expected = _score_one_by_one(model, CT2_SOURCES[1], CANDIDATES)
        assert model.score(CT2_SOURCES[1], CANDIDATES) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_ctranslate2_batch_window_gathers_requests_arriving_close_together(t5_ct2):
    with pocketlm.load(t5_ct2, parallel=4) as model:
        model.scheduler.window = 0.5
        first = model.stream_tokens(CT2_SOURCES[0], max_new_tokens=4)
        threading.Event().wait(0.05)
        rest = [model.stream_tokens(s, max_new_tokens=4) for s in CT2_SOURCES[1:]]
        for stream in [first, *rest]:
            list(stream)
        assert model.scheduler.steps == 1  # one batch: the window waited for the other three


def test_info_reports_how_a_server_would_batch(bloom, capsys):
    from pocketlm.cli.main import main

    assert main(["info", str(bloom), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["would_run_on"]
    assert run["serving_parallel"] == 16 and run["serving_kv_cells"] == 16384  # 16 x 2048, capped
    with pocketlm.load(bloom, threads=2, parallel="auto") as model:
        assert model.info.parallel == 16
        assert model.engine.kv_cells == run["serving_kv_cells"] and model.info.kv_bytes == run["serving_kv_bytes"]


def _penalized_greedy(model, prompt, n, presence, frequency):
    """Greedy decoding under OpenAI's penalties, from the model's own teacher-forced logits."""
    from pocketlm.core.sampling import penalize_openai

    tokens: list[int] = []
    for _ in range(n):
        if hasattr(model.engine, "start_token"):
            logits = model.logits(prompt, [model.engine.start_token, *tokens])[-1]
        else:
            logits = model.logits(prompt + tokens)[-1]
        tokens.append(int(np.argmax(penalize_openai(logits, tokens, presence, frequency))))
    return tokens


@pytest.mark.parametrize("kind", ["llama", "ct2"])
def test_presence_and_frequency_penalties_on_every_backend(bloom, t5_ct2, kind):
    path, prompt = (bloom, PROMPTS[0]) if kind == "llama" else (t5_ct2, CT2_SOURCES[1])
    options = GenerationOptions(max_new_tokens=10, min_new_tokens=10, presence_penalty=1.5, frequency_penalty=0.7)
    with pocketlm.load(path, threads=2) as model:
        expected = _penalized_greedy(model, prompt, 10, 1.5, 0.7)
        assert model.generate(prompt, options).token_ids == expected
        plain = model.generate(prompt, max_new_tokens=10, min_new_tokens=10).token_ids
    with pocketlm.load(path, threads=2, parallel=2) as model:  # the scheduler's path too
        assert model.generate([prompt, prompt], options)[1].token_ids == expected
    assert len(set(expected)) > len(set(plain)) or expected != plain  # the penalties changed the text

"""State is per sequence: sequences decoded together in one llama.cpp batch get the logits each
gets alone, and a slot's cache is reused by a later prompt that extends it."""

from __future__ import annotations

import numpy as np
import pytest
from parity import assert_close
from stepping import advance, start

import pocketlm
from pocketlm.converters import convert
from pocketlm.converters.core.errors import GenerationError
from pocketlm.converters.synthetic import build_random_bloom
from pocketlm.core.generation import GenerationOptions

PROMPTS = [[5, 6, 7, 8, 9, 10], [100, 101, 102], [33, 34, 35, 36, 37, 38, 39, 40, 41]]
STEPS = 6


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    folder = build_random_bloom(root / "hf", hidden=64, n_layer=2, n_head=4, vocab_size=512, std=0.2)
    return convert(folder, root / "m-f32.gguf", quant="f32").output


def _greedy(model, seqs, steps):
    """Start every sequence, then advance all of them together; each one's logits per step."""
    with model.engine.lock:  # the primitives are called holding the engine lock
        rows = [[start(model.engine, seq)] for seq in seqs]
        for _ in range(steps):
            tokens = [int(np.argmax(r[-1])) for r in rows]
            for r, out in zip(rows, advance(model.engine, seqs, tokens)):
                r.append(out)
        for seq in seqs:
            model.engine.release(seq)
    return [np.stack(r) for r in rows]


def test_sequences_decoded_together_match_each_alone(gguf):
    options = GenerationOptions(max_new_tokens=STEPS)
    with pocketlm.load(gguf, threads=2) as model:
        alone = [_greedy(model, [model.decoding(p, options)], STEPS)[0] for p in PROMPTS]
    with pocketlm.load(gguf, threads=2, parallel=len(PROMPTS)) as model:
        assert model.parallel_sequences == len(PROMPTS)
        seqs = [model.decoding(p, options) for p in PROMPTS]
        together = _greedy(model, seqs, STEPS)
        assert sorted(seq.slot for seq in seqs) == list(range(len(PROMPTS)))
    for a, b in zip(alone, together):
        assert_close(b, a, 1e-4)
        assert (a.argmax(-1) == b.argmax(-1)).all()


def test_a_free_slot_with_the_longest_shared_prefix_is_reused(gguf):
    options = GenerationOptions(max_new_tokens=4)
    with pocketlm.load(gguf, threads=2, parallel=2) as model:
        first = model.generate(PROMPTS[0], options)
        model.generate(PROMPTS[1], options)  # fills the other slot
        extended = PROMPTS[0] + first.token_ids[:2]
        seq = model.decoding(extended, options)
        with model.engine.lock:
            logits = start(model.engine, seq)
            assert seq.slot == model.engine._slots.index(extended) and model.engine._slots[seq.slot] == extended
            model.engine.release(seq)
        fresh = model.logits(extended)[-1]
        assert_close(logits, fresh, 1e-4)


def test_every_slot_busy_is_a_clear_error(gguf):
    options = GenerationOptions(max_new_tokens=2)
    with pocketlm.load(gguf, threads=2) as model:
        held = [model.decoding(PROMPTS[0], options) for _ in range(model.engine.sequence_slots)]
        with model.engine.lock:
            for seq in held:
                start(model.engine, seq)
            with pytest.raises(GenerationError, match="sequences of the KV cache are in use"):
                start(model.engine, model.decoding(PROMPTS[1], options))
            for seq in held:
                model.engine.release(seq)
        assert model.generate(PROMPTS[1], options).token_ids

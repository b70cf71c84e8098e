"""Embeddings (issue 28, item 3): `Model.embed` equals transformers' mean-pooled
last_hidden_state (BLOOM: BloomModel, after ln_f; T5: T5EncoderModel, after the encoder's final
norm), L2-normalised, with cosine >= 0.999 at f32; inputs embedded together equal each alone;
texts are tokenized as prompts are; CTranslate2 refuses in one line naming the GGUF way; an
embedding call does not disturb generation; `pocketlm embed` prints one JSON line per input.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from parity import WIDE
from reference import make_bloom, make_t5, random_ids

import pocketlm
import pocketlm.backends.llama_common as llama_common
from pocketlm.converters.core.errors import RequestError
from pocketlm.converters.synthetic import SAMPLE_TEXT, train_bloom_tokenizer

F32_COSINE = 0.999  # the issue's bound; measured here: 1 - cosine < 1e-6 for both families
# q8_0 rounds weights and (inside llama.cpp's matmuls) activations to 8 bits; measured on the
# d_model-256 random models: BLOOM 0.9998, T5 0.9997 worst cosine
Q8_COSINE = 0.995
LENGTHS = (1, 4, 23, 60, 9)  # several lengths in one call, one longer than a short call (see below)
T5_CONFIGS = ("flan-t5-gated-untied-deeper-decoder", "t5-original-relu-tied-scaled")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def hf_mean(folder, arch: str, ids: list[int]) -> np.ndarray:
    """transformers' last_hidden_state, mean over the tokens (BloomModel / T5EncoderModel)."""
    from transformers import BloomModel, T5EncoderModel

    cls = BloomModel if arch == "bloom" else T5EncoderModel
    model = _hf_models.get((folder, arch))
    if model is None:
        model = _hf_models[folder, arch] = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0].double().mean(0).numpy()


_hf_models: dict = {}


def inputs_for(arch: str, ref, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    vocab = ref.config.vocab_size
    if arch == "bloom":
        return [random_ids(n, vocab, seed + i) for i, n in enumerate(lengths)]
    # T5 sources end with </s>, as its tokenizer writes them
    return [random_ids(n - 1, vocab, seed + i) + [ref.config.eos_token_id] for i, n in enumerate(lengths)]


def check_against_transformers(model, folder, arch: str, inputs: list[list[int]], bound: float) -> float:
    got = model.embed(inputs)
    assert got.vectors.dtype == np.float32 and got.vectors.shape == (len(inputs), got.vectors.shape[1])
    assert got.tokens == sum(map(len, inputs))
    assert np.allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)
    worst = 1.0
    for i, ids in enumerate(inputs):
        expected = hf_mean(folder, arch, ids)
        assert got.vectors.shape[1] == expected.shape[0]
        worst = min(worst, cosine(got.vectors[i], expected))
    assert worst >= bound, f"{arch}: worst cosine {worst:.6f} < {bound}"
    return worst


CELLS = [
    pytest.param("bloom", "h80-5heads-safetensors", "f32", F32_COSINE, id="bloom-f32"),
    pytest.param("bloom", WIDE, "q8_0", Q8_COSINE, id="bloom-wide-q8_0"),
    *(pytest.param("t5", c, "f32", F32_COSINE, id=f"t5-f32-{c}") for c in T5_CONFIGS),
    pytest.param("t5", WIDE, "q8_0", Q8_COSINE, id="t5-wide-q8_0"),
]


def load_gguf(checkpoints, arch: str, config: str, quant: str, **options):
    summary = checkpoints.converted(arch, config, "gguf", quant)
    return pocketlm.load(summary.output, threads=2, parallel=1, n_ctx=256, **options)


@pytest.mark.parametrize(("arch", "config", "quant", "bound"), CELLS)
def test_embeddings_equal_transformers_and_batch_equals_alone(checkpoints, arch, config, quant, bound):
    folder, ref = checkpoints.reference(arch, config)
    inputs = inputs_for(arch, ref)
    with load_gguf(checkpoints, arch, config, quant) as model:
        worst = check_against_transformers(model, folder / "hf", arch, inputs, bound)
        together = model.embed(inputs).vectors
        alone = np.stack([model.embed([ids]).vectors[0] for ids in inputs])
    apart = min(cosine(a, b) for a, b in zip(together, alone))
    print(f"\n{arch} {quant} {config}: worst cosine {worst:.7f}, together vs alone {apart:.7f}")
    if quant == "f32":  # evaluated in one batch or alone: the same up to float rounding
        np.testing.assert_allclose(together, alone, atol=1e-5)
    else:  # llama.cpp's quantized matmuls take other kernels for other batch sizes
        assert apart >= bound


@pytest.mark.parametrize("arch", ["bloom", "t5"])
def test_inputs_split_over_several_calls(checkpoints, monkeypatch, arch):
    """With llama.cpp's output buffer capped at 16 tokens a call, a BLOOM input spans several
    calls (pooling must run over all of them) and T5 sources are grouped by 16 tokens, a
    longer source encoded alone: the embeddings do not change."""
    config = "h80-5heads-safetensors" if arch == "bloom" else T5_CONFIGS[0]
    folder, ref = checkpoints.reference(arch, config)
    inputs = inputs_for(arch, ref, lengths=(3, 40, 7, 12, 30, 2), seed=50)
    with load_gguf(checkpoints, arch, config, "f32") as model:
        reference = model.embed(inputs).vectors
        per_token = 4 * (model.info.vocab_size + reference.shape[1])  # a logits row and a hidden state
    monkeypatch.setattr(llama_common, "EMBED_OUTPUT_BYTES", 16 * per_token)
    with load_gguf(checkpoints, arch, config, "f32") as model:
        split = model.embed(inputs)
        assert model.engine._s._embedder.call_tokens == 16
    np.testing.assert_allclose(split.vectors, reference, atol=1e-5)
    check_against_transformers_values(split.vectors, folder / "hf", arch, inputs)


def check_against_transformers_values(vectors, folder, arch, inputs):
    for v, ids in zip(vectors, inputs):
        assert cosine(v, hf_mean(folder, arch, ids)) >= F32_COSINE


# -- texts: tokenized as prompts are ------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_with_tokenizer(tmp_path_factory, t5_tokenizer_files):
    folder = tmp_path_factory.mktemp("embed-t5")
    make_t5(folder / "hf", vocab=300, tokenizer_files={"tokenizer.json": t5_tokenizer_files["tokenizer.json"]})
    path = pocketlm.convert(folder / "hf", folder / "m.gguf", format="gguf", quant="f32").output
    return folder / "hf", path


@pytest.fixture(scope="module")
def bloom_with_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed-bloom")
    make_bloom(folder / "hf", vocab=512, tokenizer=train_bloom_tokenizer(SAMPLE_TEXT, 512))
    path = pocketlm.convert(folder / "hf", folder / "m.gguf", quant="f32").output
    return folder / "hf", path


TEXTS = ["Translate to English: Je t'aime.", "Die Katze sitzt auf der Matte.", "a"]


@pytest.mark.parametrize("arch", ["bloom", "t5"])
def test_texts_are_tokenized_as_the_hugging_face_tokenizer_does(request, arch):
    from transformers import AutoTokenizer

    folder, path = request.getfixturevalue(f"{arch}_with_tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected_ids = [tokenizer(t)["input_ids"] for t in TEXTS]  # T5 appends </s>, BLOOM adds nothing
    assert (expected_ids[0][-1] == tokenizer.eos_token_id) == (arch == "t5")
    with pocketlm.load(path, threads=2, n_ctx=256) as model:
        from_text = model.embed(TEXTS)
        from_ids = model.embed(expected_ids)
        one = model.embed(TEXTS[0])  # a single text is one input
    assert from_text.tokens == sum(map(len, expected_ids))
    np.testing.assert_array_equal(from_text.vectors, from_ids.vectors)
    np.testing.assert_allclose(one.vectors, from_text.vectors[:1], atol=1e-6)  # alone vs in a batch
    for v, ids in zip(from_text.vectors, expected_ids):
        assert cosine(v, hf_mean(folder, arch, ids)) >= F32_COSINE


# -- what is refused ------------------------------------------------------------------------------


def test_ctranslate2_refuses_naming_the_gguf_way(checkpoints):
    summary = checkpoints.converted("t5", T5_CONFIGS[0], "ct2", "float32")
    with pocketlm.load(summary.output, threads=2) as model:
        with pytest.raises(RequestError) as caught:
            model.embed([[5, 6, 1]])
    message = str(caught.value)
    assert "\n" not in message and "CTranslate2" in message and "--format gguf" in message


def test_bad_inputs_are_refused_naming_the_input(checkpoints):
    with load_gguf(checkpoints, "bloom", "h80-5heads-safetensors", "f32") as model:
        n_ctx, vocab = model.info.n_ctx, model.info.vocab_size
        cases = {
            "input 1 has 300 tokens; the context holds 256": [[5, 6], [7] * 300],
            "input 0 is empty": [[]],
            f"input 2: token id {vocab} is outside the vocabulary": [[5], [6], [vocab]],
            "no input to embed": [],
        }
        assert n_ctx == 256
        for expected, inputs in cases.items():
            with pytest.raises(RequestError, match=expected):
                model.embed(inputs)
        assert model.embed([[7] * n_ctx]).vectors.shape[0] == 1  # exactly the context is allowed


# -- generation is not disturbed -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bloom", "t5"])
def test_embedding_between_steps_leaves_generation_unchanged(checkpoints, arch):
    """An embedding call made while a request is being decoded (its KV cache, and for T5 the
    encoder output it attends to, in the generation context) changes none of its tokens."""
    config = "h80-5heads-safetensors" if arch == "bloom" else T5_CONFIGS[0]
    _, ref = checkpoints.reference(arch, config)
    prompt, others = inputs_for(arch, ref, lengths=(12,), seed=7)[0], inputs_for(arch, ref, seed=70)
    with load_gguf(checkpoints, arch, config, "f32") as model:
        alone = model.generate(prompt, max_new_tokens=16, min_new_tokens=16).token_ids
        stream = model.stream_tokens(prompt, max_new_tokens=16, min_new_tokens=16)
        for _ in range(5):
            next(stream)
        model.embed(others)
        for _ in stream:
            pass
    assert stream.result.token_ids == alone


# -- the command line -----------------------------------------------------------------------------


def run_cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "pocketlm", *map(str, args)], capture_output=True, text=True, input=stdin, timeout=600
    )


def test_cli_embed_prints_one_json_line_per_input(t5_with_tokenizer, checkpoints):
    _, path = t5_with_tokenizer
    lines = ["first line of text.", "", "second one", "third: Die Katze."]  # blank lines are skipped
    proc = run_cli("embed", path, "--json", "--threads", "2", "--batch-size", "2", stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    texts = [t for t in lines if t]
    assert [r["index"] for r in rows] == list(range(len(texts)))
    with pocketlm.load(path, threads=2) as model:
        expected = model.embed(texts).vectors
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-5)  # other batches

    proc = run_cli("embed", path, "one text.", "--ids", "5,6,1", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 3 and out[0].startswith("0: dim 64, norm 1.0000") and out[-1].startswith("2 inputs")

    proc = run_cli("embed", path, "--ids", "5,6,1", "--ids", ",".join(["5"] * 2000), "--threads", "2")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1
    assert "input 1 has 2000 tokens; the context holds" in proc.stderr

    ct2 = checkpoints.converted("t5", T5_CONFIGS[0], "ct2", "float32").output
    proc = run_cli("embed", ct2, "--ids", "5,6,1", "--threads", "2")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1 and "--format gguf" in proc.stderr

    assert "--json" in run_cli("embed", "--help").stdout

"""Parity with transformers: the shared checks, each architecture's reference table, the matrix.

- `relative_error` / `assert_close`: the one relative-error check every parity test uses
  (max |got - expected| over max |expected|).
- `REFERENCES`: per architecture, by the name it registers under (convert/architectures/),
  its reference builder (tests/reference.py), the configs it is checked on and, per output
  format, which checks run with which tolerances: every tolerance of the matrix is here.
- `matrix()`: the registered (architecture, format) pairs with the backends that run each
  format, read from the two registries (`architectures()` and their targets, `backends()` and
  their formats). tests/test_parity.py parametrizes every check over them, so a newly
  registered architecture (with its entry here) or backend gets the parity tests without
  touching a test; a registered pair with no entry here gets a test that fails saying so
  (unless it is in `EXEMPT`, with the reason).
- `Checkpoints`: the session's cache of built checkpoints and their conversions (each built
  and converted once, whichever test module asks first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from reference import hf_greedy, hf_logits, hf_seq2seq_greedy, hf_seq2seq_logits, make_bloom, make_t5, random_ids

# -- the checks ----------------------------------------------------------------------------


def relative_error(got: Any, expected: Any) -> float:
    """max |got - expected| / max |expected|: the error relative to the scale of the values."""
    got, expected = np.asarray(got), np.asarray(expected)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def assert_close(got: Any, expected: Any, tolerance: float, what: str = "logits") -> float:
    """Assert the shapes agree and relative_error(got, expected) <= tolerance; return the error."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    err = relative_error(got, expected)
    assert err <= tolerance, f"{what}: max |difference| is {err:.2e} x max |expected|, above {tolerance:g}"
    return err


def top1_agreement(got: np.ndarray, expected: np.ndarray) -> float:
    """Share of positions whose most likely token is the same."""
    return float((np.asarray(got).argmax(-1) == np.asarray(expected).argmax(-1)).mean())


def prefix_kept(expected: Sequence[int], got: Sequence[int]) -> float:
    """Share of the expected greedy tokens produced before the first difference."""
    same = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    return same / max(len(expected), 1)


def log_likelihood(rows: np.ndarray, tokens: Sequence[int]) -> float:
    """sum of log p(token) over rows of logits predicting each token (in float64)."""
    logits = np.asarray(rows, dtype=np.float64)[: len(tokens)]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(sum(logp[i, t] for i, t in enumerate(tokens)))


# -- inputs, by kind of model ----------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Random token ids fed to both models, one input per seed: `length` prompt ids (causal),
    or `length` source ids + end token and [start] + `decoder` ids drawn with seed +
    `decoder_seed` (encoder-decoder)."""

    seeds: tuple[int, ...]
    length: int
    decoder: int = 0
    decoder_seed: int = 10


class Causal:
    """transformers' side of a decoder-only model: inputs are prompt ids. Its logits and greedy
    ids are computed once per input (several checks and quant types compare with them)."""

    def __init__(self, ref: Any):
        self.ref, self.vocab = ref, ref.config.vocab_size
        self._memo: dict[Any, Any] = {}

    def prompts(self, probe: Probe) -> list[list[int]]:
        return [random_ids(probe.length, self.vocab, seed) for seed in probe.seeds]

    def cases(self, probe: Probe) -> list[tuple[list[int], ...]]:
        """Arguments of `model.logits` for each seed."""
        return [(ids,) for ids in self.prompts(probe)]

    def logits(self, *case: list[int]) -> np.ndarray:
        return self._once(("logits", *map(tuple, case)), lambda: self._logits(*case))

    def greedy(self, prompt: list[int], n: int, **kwargs: Any) -> list[int]:
        key = ("greedy", tuple(prompt), n, *sorted(kwargs.items()))
        return list(self._once(key, lambda: self._greedy(prompt, n, **kwargs)))

    def score_rows(self, prompt: list[int], candidate: Sequence[int]) -> np.ndarray:
        """transformers' logits rows predicting each candidate token after the prompt."""
        return self.logits([*prompt, *candidate])[len(prompt) - 1 : -1]

    def _once(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def _logits(self, ids: list[int]) -> np.ndarray:
        return hf_logits(self.ref, ids)

    def _greedy(self, prompt: list[int], n: int, **kwargs: Any) -> list[int]:
        return hf_greedy(self.ref, prompt, n, **kwargs)


class Seq2Seq(Causal):
    """transformers' side of an encoder-decoder: inputs are source ids (ending with the end
    token) and decoder ids (starting with the decoder start token)."""

    def __init__(self, ref: Any):
        super().__init__(ref)
        self.end, self.start = ref.config.eos_token_id, ref.config.decoder_start_token_id

    def prompts(self, probe: Probe) -> list[list[int]]:
        return [random_ids(probe.length, self.vocab, seed) + [self.end] for seed in probe.seeds]

    def cases(self, probe: Probe) -> list[tuple[list[int], ...]]:
        return [
            (src, [self.start] + random_ids(probe.decoder, self.vocab, seed + probe.decoder_seed))
            for seed, src in zip(probe.seeds, self.prompts(probe))
        ]

    def score_rows(self, prompt: list[int], candidate: Sequence[int]) -> np.ndarray:
        return self.logits(prompt, [self.start, *candidate])[: len(candidate)]

    def _logits(self, src: list[int], dec: list[int]) -> np.ndarray:  # type: ignore[override]
        return hf_seq2seq_logits(self.ref, src, dec)

    def _greedy(self, prompt: list[int], n: int, **kwargs: Any) -> list[int]:
        return hf_seq2seq_greedy(self.ref, prompt, n, **kwargs)


# -- what each architecture is checked on ------------------------------------------------------


@dataclass(frozen=True)
class Logits:
    """On every config: `quant`'s logits within `tolerance` (relative error) of transformers'."""

    quant: str
    tolerance: float
    probe: Probe


@dataclass(frozen=True)
class Greedy:
    """On every config: greedy decoding of `tokens` tokens gives transformers' ids; with
    `penalty`, also with that repetition penalty on the last prompt, visiting at least
    `distinct` different tokens (else the reference proves little)."""

    probe: Probe
    tokens: int
    penalty: float | None = None
    distinct: int = 0


@dataclass(frozen=True)
class Score:
    """On every config: `score(prompt, candidates)` equals transformers' log-likelihood, within
    tolerance(candidate, transformers' logits rows) (absolute)."""

    probe: Probe
    candidates: tuple[tuple[int, ...], ...]
    tolerance: Callable[[Sequence[int], np.ndarray], float]


@dataclass(frozen=True)
class Agreement:
    """On the quantization config: top-1 agreement with transformers' logits >= `top1` and,
    when `kept` is set, the share of the greedy prefix (`tokens` tokens) kept >= `kept`
    (averaged over the probe's inputs). `load`: options of pocketlm.load; `reason`: a phrase
    the model's info.reasons must contain."""

    quant: str
    top1: float
    probe: Probe
    kept: float | None = None
    tokens: int = 10
    load: tuple[tuple[str, Any], ...] = ()
    reason: str = ""

    @property
    def name(self) -> str:
        return "-".join([self.quant, *(f"{k}-{v}" for k, v in self.load)])


@dataclass(frozen=True)
class EveryQuant:
    """Every quant type the registry allows (except those with a `Logits` check) converts,
    loads as that quant, generates `tokens` tokens from the first prompt of `generate`, and
    (when `top1` is set) agrees with transformers on the probe's first input at least that
    much. `no_fallbacks`: no tensor falls back to another type; `main_type`: the quant's main
    tensor type is among those written."""

    probe: Probe
    generate: Probe
    tokens: int
    top1: float | None = None
    no_fallbacks: bool = False
    main_type: bool = False


@dataclass(frozen=True)
class FormatChecks:
    """What one format of an architecture is checked on (besides what every cell gets: batch
    generation equal to one by one, and for encoder-decoders the decoder start token)."""

    logits: tuple[Logits, ...]
    greedy: Greedy
    agreements: tuple[Agreement, ...]
    every_quant: EveryQuant
    score: Score | None = None

    @property
    def quant(self) -> str:
        """The quant the per-config checks run on (the first logits check's)."""
        return self.logits[0].quant


@dataclass(frozen=True)
class Reference:
    """An architecture's reference: how to build a checkpoint, the configs (build keyword
    arguments by name), the wide config the quantized checks use (rows every block size fits),
    options of pocketlm.load, and the checks per format."""

    build: Callable[..., Any]
    configs: dict[str, dict[str, Any]]
    wide: dict[str, Any]
    formats: dict[str, FormatChecks]
    load: dict[str, Any] = field(default_factory=dict)
    not_in: dict[str, dict[str, str]] = field(default_factory=dict)  # config -> {format: why not checked there}

    def config(self, name: str) -> dict[str, Any]:
        return self.wide if name == WIDE else self.configs[name]

    def configs_for(self, fmt: str) -> list[str]:
        return [name for name in self.configs if fmt not in self.not_in.get(name, {})]


WIDE = "wide"

T5_CANDIDATES = ((5, 6, 1), (7, 1))
T5_AGREEMENT = Probe(tuple(range(12)), 12, decoder=15, decoder_seed=100)
T5_EVERY_QUANT = Probe((7,), 12, decoder=15, decoder_seed=1), Probe((7,), 12)  # logits input, prompt

REFERENCES: dict[str, Reference] = {
    "bloom": Reference(
        build=make_bloom,
        # odd widths, 5 heads, eps 1e-6, every storage layout and dtype
        configs={
            "h80-5heads-safetensors": dict(hidden=80, n_head=5, n_layer=2, eps=1e-6),
            "h96-3heads-sharded": dict(hidden=96, n_head=3, n_layer=3, storage="sharded"),
            "h64-4heads-bin": dict(hidden=64, n_head=4, n_layer=2, storage="bin"),
            "h40-5heads-bin-sharded": dict(hidden=40, n_head=5, n_layer=3, storage="bin-sharded", vocab=257),
            "h80-bf16": dict(hidden=80, n_head=5, dtype="bf16"),
            "h80-f16-bin": dict(hidden=80, n_head=5, dtype="f16", storage="bin"),
        },
        wide=dict(hidden=256, n_head=4, n_layer=2, vocab=512, init=0.05),  # rows of 256: each quant type applies
        load=dict(n_ctx=256),
        formats={
            "gguf": FormatChecks(
                logits=(Logits("f32", 1e-4, Probe((0,), 48)), Logits("f16", 1e-2, Probe((2,), 48))),
                # Random BLOOMs tend to repeat one token; a strong repetition penalty (same rule
                # as transformers) makes the greedy path visit many different tokens.
                greedy=Greedy(Probe((1,), 12), tokens=40, penalty=10.0, distinct=20),
                agreements=(Agreement("q8_0", top1=0.98, probe=Probe((3,), 200)),),
                # the model is broken, not just quantized, below 0.5
                every_quant=EveryQuant(
                    Probe((4,), 64), Probe((0,), 8), tokens=8, top1=0.5, no_fallbacks=True, main_type=True
                ),
            ),
        },
    ),
    "t5": Reference(
        build=make_t5,
        configs={
            "t5-original-relu-tied-scaled": dict(ff="relu", head="tied-scaled"),
            "flan-t5-gated-untied-deeper-decoder": dict(ff="gated-gelu", head="untied", n_layers=2, n_dec=3),
            "deeper-encoder": dict(ff="gated-gelu", head="untied", n_layers=3, n_dec=2),
            "mt5-gated-untied": dict(model_type="mt5", ff="gated-gelu", head="untied", vocab=300),
            "t5v11-saved-by-transformers5": dict(ff="gated-gelu", head="tied-unscaled"),
            "dkv-x-heads-ne-dmodel": dict(d_model=72, d_kv=20, n_heads=3, d_ff=80, ff="relu", head="untied"),
            "buckets16-distance20": dict(buckets=16, max_distance=20, head="untied"),
            "bin-f16": dict(storage="bin", dtype="f16", head="untied"),
            "bin-tied-scaled": dict(storage="bin", head="tied-scaled", ff="relu"),
            "bin-sharded-tied": dict(storage="bin-sharded", head="tied-scaled", ff="relu"),
            "sharded-bf16": dict(storage="sharded", dtype="bf16", head="untied"),
        },
        not_in={
            "buckets16-distance20": {
                "gguf": "llama.cpp's t5 graph assumes max_distance 128: the converter refuses it (test_t5_gguf.py)"
            },
        },
        # d_model 256: per-row int8 has realistic room (tiny widths exaggerate rounding)
        wide=dict(d_model=256, d_kv=64, n_heads=4, d_ff=512, vocab=256, head="untied"),
        formats={
            "ct2": FormatChecks(
                logits=(Logits("float32", 1e-3, Probe((0, 1, 2), 45, decoder=30)),),  # 45 > max_distance 20
                greedy=Greedy(Probe((20, 21, 22), 10), tokens=24),
                score=Score(Probe((30,), 8), T5_CANDIDATES, tolerance=lambda cand, logits: 1e-3),
                agreements=(
                    # the converted int8 weights, computed in float32: the conversion's own error
                    Agreement("int8", top1=0.95, kept=0.5, probe=T5_AGREEMENT, load=(("compute_type", "float32"),)),
                    # the runtime's default on CPU for int8 models: int8 compute also quantizes
                    # activations (CTranslate2's dynamic activation quantization on a random model)
                    Agreement("int8", top1=0.85, kept=0.3, probe=T5_AGREEMENT, reason="compute type int8"),
                ),
                every_quant=EveryQuant(*T5_EVERY_QUANT, tokens=6, top1=0.75),
            ),
            "gguf": FormatChecks(
                logits=(Logits("f32", 1e-3, Probe((0, 1, 2), 45, decoder=30)),),
                # a strong repetition penalty walks through many tokens; it applies to decoder tokens only
                greedy=Greedy(Probe((20, 21), 10), tokens=24, penalty=5.0, distinct=10),
                # each log-probability is off by at most twice the logits' error (1e-3 x max|logit|)
                score=Score(
                    Probe((30,), 8),
                    T5_CANDIDATES,
                    tolerance=lambda cand, logits: 2 * len(cand) * 1e-3 * np.abs(logits).max(),
                ),
                # Top-1 agreement and share of the greedy prefix kept, measured on this random
                # d_model-256 model (deterministic): f16 1.000/1.00, q8_0 0.943/0.82, q4_k_m
                # 0.698/0.38. q8_0 also rounds activations to 8 bits inside llama.cpp's matmuls.
                agreements=(
                    Agreement("f16", top1=0.98, kept=0.9, probe=T5_AGREEMENT),
                    Agreement("q8_0", top1=0.9, kept=0.7, probe=T5_AGREEMENT),
                    Agreement("q4_k_m", top1=0.6, kept=0.3, probe=T5_AGREEMENT),
                ),
                # no top-1 floor: the types without an Agreement above are only checked to convert,
                # load and run (2-3 bit types keep little of a d_model-256 model: q2_k 12% top-1)
                every_quant=EveryQuant(*T5_EVERY_QUANT, tokens=6),
            ),
        },
    ),
}

# (architecture, format) pairs that are registered but deliberately have no parity tests: why.
EXEMPT: dict[tuple[str, str], str] = {}


# -- the matrix ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One model the matrix checks: an architecture's config converted to `fmt` as `quant`,
    run by `backend`. Hashable: pytest groups the tests of one cell around one loaded model."""

    arch: str
    fmt: str
    backend: str
    config: str
    quant: str

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.fmt}-{self.backend}-{self.quant}-{self.config}"


@dataclass(frozen=True)
class Pair:
    """A registered (architecture, format) with the backends that run the format."""

    arch: str
    fmt: str
    backends: tuple[str, ...]
    encoder_decoder: bool
    quants: tuple[str, ...]  # every quant type the architecture allows in this format

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.fmt}"

    def problem(self) -> str | None:
        """Why this pair cannot be checked, or None."""
        ref = REFERENCES.get(self.arch)
        if ref is None:
            return (
                f"architecture {self.arch!r} is registered but has no parity reference: add it to "
                "REFERENCES in tests/parity.py (a builder in tests/reference.py, configs, checks per "
                f"format), or to EXEMPT with the reason"
            )
        if self.fmt not in ref.formats:
            return (
                f"architecture {self.arch!r} converts to {self.fmt} but REFERENCES[{self.arch!r}] has no "
                f"checks for {self.fmt}: add them to its formats, or the pair to EXEMPT with the reason"
            )
        if not self.backends:
            return f"no registered backend runs {self.fmt} ({self.arch} converts to it)"
        return None


def matrix(architectures: Sequence[Any] | None = None, backends: Sequence[Any] | None = None) -> list[Pair]:
    """Every (architecture, format) the registries hold (the real ones unless given)."""
    from pocketlm.converters.architectures import architectures as registered
    from pocketlm.converters.core.formats import FORMATS

    if architectures is None:
        architectures = registered()
    if backends is None:
        from pocketlm.backends import backends as registered_backends

        backends = registered_backends()
    pairs = []
    for arch in architectures:
        for fmt, target in arch.targets.items():
            runners = tuple(b.name for b in backends if fmt in b.formats)
            quants = tuple(target.quants if target.quants is not None else FORMATS[fmt].quants)
            pairs.append(Pair(arch.name, fmt, runners, arch.encoder_decoder, quants))
    return pairs


def checked() -> list[Pair]:
    """The registered pairs with a reference (test_parity.py fails for the others, unless exempt)."""
    return [p for p in matrix() if p.problem() is None and (p.arch, p.fmt) not in EXEMPT]


# -- checkpoints and conversions, once per session -------------------------------------------------


class Checkpoints:
    """Each (architecture, config) checkpoint built once, each conversion done once."""

    def __init__(self, root: Path):
        self.root = root
        self._refs: dict[tuple[str, str], tuple[Path, Any]] = {}
        self._hf: dict[tuple[str, str], Causal] = {}
        self._converted: dict[tuple[str, str, str, str], Any] = {}

    def reference(self, arch: str, config: str) -> tuple[Path, Any]:
        """(folder holding the checkpoint in hf/, transformers' model loaded from it)."""
        key = (arch, config)
        if key not in self._refs:
            folder = self.root / arch / config
            ref = REFERENCES[arch].build(folder / "hf", **REFERENCES[arch].config(config))
            self._refs[key] = folder, ref
        return self._refs[key]

    def hf(self, arch: str, config: str) -> Causal:
        """transformers' side of the checkpoint (its outputs computed once per input)."""
        from pocketlm.converters.architectures import get

        key = (arch, config)
        if key not in self._hf:
            _, ref = self.reference(arch, config)
            self._hf[key] = (Seq2Seq if get(arch).encoder_decoder else Causal)(ref)
        return self._hf[key]

    def converted(self, arch: str, config: str, fmt: str, quant: str) -> Any:
        """The ConversionSummary of the checkpoint converted to `fmt` as `quant`."""
        from pocketlm.converters import convert
        from pocketlm.converters.core.formats import FORMATS

        key = (arch, config, fmt, quant)
        if key not in self._converted:
            folder, _ = self.reference(arch, config)
            out = folder / FORMATS[fmt].output_name("model", quant)
            self._converted[key] = convert(folder / "hf", out, format=fmt, quant=quant)
        return self._converted[key]

    def load(self, cell: Cell, **options: Any) -> Any:
        """The cell's model, through the public API."""
        import pocketlm

        summary = self.converted(cell.arch, cell.config, cell.fmt, cell.quant)
        return pocketlm.load(
            summary.output, threads=2, parallel=1, backend=cell.backend, **REFERENCES[cell.arch].load, **options
        )

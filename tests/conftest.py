"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
from reference import T5_CORPUS, T5_PIECES, make_t5_tokenizer


@pytest.fixture(scope="session")
def t5_tokenizer_files(tmp_path_factory):
    """A trained SentencePiece model and the tokenizer.json transformers builds from it."""
    return make_t5_tokenizer(tmp_path_factory.mktemp("spm"), T5_CORPUS, pieces=T5_PIECES)


@pytest.fixture(scope="session")
def hf_t5_tokenizer(t5_tokenizer_files):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(t5_tokenizer_files["tokenizer.json"]))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """tests/parity.py's reference checkpoints and their conversions, each made once per session."""
    from parity import Checkpoints

    return Checkpoints(tmp_path_factory.mktemp("parity"))

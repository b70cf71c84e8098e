"""The shared checkpoint reader: every layout and dtype, and refusing what it must refuse."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from reference import STORAGES, make_bloom, save

from pocketlm.converters import convert
from pocketlm.converters.checkpoint import Checkpoint, write_safetensors
from pocketlm.converters.core.errors import CheckpointError, UnsafePickleError, UnsupportedModelError
from pocketlm.converters.torch_pickle import TorchZipFile


def _torch_state(folder):
    from transformers import BloomForCausalLM

    return BloomForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("storage", STORAGES)
def test_reader_returns_the_stored_values(tmp_path, storage, dtype):
    make_bloom(tmp_path, storage=storage, dtype=dtype, hidden=40, n_head=5)
    state = _torch_state(tmp_path)
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.storage_format == ("safetensors" if "bin" not in storage else "pytorch")
        names = [n for n in ckpt.names() if n != "lm_head.weight"]
        assert set(names) == {n for n in state if n != "lm_head.weight"}
        for name in names:
            info = ckpt.info(name)
            assert info.dtype == {"f32": "F32", "f16": "F16", "bf16": "BF16"}[dtype]
            got = np.asarray(ckpt.get(name), dtype=np.float32)
            # widening bf16/f16 to float32 is exact, so equality is exact
            np.testing.assert_array_equal(got, state[name].numpy(), err_msg=name)


def test_bf16_rows_widen_lazily(tmp_path):
    make_bloom(tmp_path, dtype="bf16", hidden=40, n_head=5)
    with Checkpoint(tmp_path) as ckpt:
        emb = ckpt.get("transformer.word_embeddings.weight")
        assert emb.dtype == np.float32 and emb.shape == (320, 40)
        np.testing.assert_array_equal(emb[10:12], np.asarray(emb)[10:12])


def test_non_contiguous_and_offset_tensors_in_bin(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {"t": base.t(), "view": base[2:4], "scalar": torch.tensor(3.5)}
    torch.save(state, tmp_path / "x.bin")
    f = TorchZipFile(tmp_path / "x.bin")
    for name, tensor in state.items():
        np.testing.assert_array_equal(f.array(name), tensor.numpy())


class _Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return (self.call, (self.arg,))


def _malicious_bin(path, payload):
    """A real torch.save zip whose data.pkl is replaced by `payload`'s pickle."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps({"w": payload}, protocol=2)
            dst.writestr(item, data)


@pytest.mark.parametrize("call", [os.system, eval, __import__("subprocess").getoutput])
def test_restricted_unpickler_refuses_code(tmp_path, call):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if call is not eval else f"open({str(marker)!r}, 'w')"
    _malicious_bin(tmp_path / "pytorch_model.bin", _Evil(call, arg))
    with pytest.raises(UnsafePickleError, match="not a tensor type"):
        TorchZipFile(tmp_path / "pytorch_model.bin")
    assert not marker.exists(), "the pickle's code ran"


def _out(folder):
    """An output beside the checkpoint folder (one inside it is refused)."""
    return folder.parent / f"{folder.name}-out.gguf"


def test_malicious_checkpoint_fails_conversion_with_one_line(tmp_path):
    make_bloom(tmp_path, storage="bin", hidden=40, n_head=5)
    marker = tmp_path / "pwned"
    _malicious_bin(tmp_path / "pytorch_model.bin", _Evil(os.system, f"touch {marker}"))
    with pytest.raises(UnsafePickleError) as e:
        convert(tmp_path, _out(tmp_path), quant="f16")
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)
    assert not marker.exists() and not (_out(tmp_path)).exists()


def test_legacy_torch_format_is_refused_clearly(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .*re-save it as safetensors"):
        TorchZipFile(tmp_path / "old.bin")


def test_index_cannot_point_outside_the_folder(tmp_path):
    make_bloom(tmp_path, storage="sharded", hidden=40, n_head=5)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model folder"):
        Checkpoint(tmp_path)


def _rewrite_safetensors(folder, edit):
    with Checkpoint(folder) as ckpt:
        tensors = {n: np.array(ckpt.get(n)) for n in ckpt.names()}
    edit(tensors)
    write_safetensors(folder / "model.safetensors", tensors)


def test_missing_tensor_is_named(tmp_path):
    make_bloom(tmp_path, hidden=40, n_head=5)
    _rewrite_safetensors(tmp_path, lambda t: t.pop("transformer.h.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(CheckpointError, match=r"tensor transformer\.h\.1\.mlp\.dense_4h_to_h\.bias is missing"):
        convert(tmp_path, _out(tmp_path), quant="f16")


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    make_bloom(tmp_path, hidden=40, n_head=5)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_layer"] = 1
    config["hidden_size"] = 45
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor .* has shape \[320, 40\], expected \[320, 45\]"
    ):
        convert(tmp_path, _out(tmp_path), quant="f16")


def test_unmapped_tensor_is_an_error(tmp_path):
    make_bloom(tmp_path, hidden=40, n_head=5)
    _rewrite_safetensors(tmp_path, lambda t: t.update({"transformer.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(UnsupportedModelError, match="transformer.extra.weight"):
        convert(tmp_path, _out(tmp_path), quant="f16")


def test_unknown_architecture_lists_supported(tmp_path):
    make_bloom(tmp_path, hidden=40, n_head=5)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: .*BloomForCausalLM"):
        convert(tmp_path, _out(tmp_path))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b[:5],  # truncated before the header length
        lambda b: struct.pack("<Q", 10**12) + b[8:],  # header longer than the file
        lambda b: b[:8] + b"{not json" + b[17:],
        lambda b: b[: len(b) // 2],  # tensor data cut off
    ],
    ids=["tiny", "huge-header", "bad-json", "truncated-data"],
)
def test_corrupt_safetensors_gives_a_checkpoint_error(tmp_path, corrupt):
    make_bloom(tmp_path, hidden=40, n_head=5)
    path = tmp_path / "model.safetensors"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Checkpoint(tmp_path)


def test_no_weights_and_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        Checkpoint(tmp_path)


def test_safetensors_preferred_when_both_formats_exist(tmp_path):
    model_dir = tmp_path
    make_bloom(model_dir, hidden=40, n_head=5)
    from transformers import BloomForCausalLM

    save(BloomForCausalLM.from_pretrained(model_dir), tmp_path / "bin", "bin")
    (tmp_path / "bin" / "pytorch_model.bin").rename(model_dir / "pytorch_model.bin")
    with Checkpoint(model_dir) as ckpt:
        assert ckpt.weight_files == [model_dir / "model.safetensors"]

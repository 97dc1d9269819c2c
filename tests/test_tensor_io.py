"""deltajax/io/tensor_io.py: safetensors headers parsed and checked, tensors read back, errors
naming the file and key; `write_safetensors` streams a file the reference reader accepts."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from deltajax.io import tensor_io
from deltajax.io.params_ckpt import CheckpointError


def _scan(path):
    problems, unreadable = [], set()
    refs = tensor_io.scan_safetensors(path, problems, unreadable)
    return refs, problems, unreadable


def _tensors(rng):
    return {
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((16, 32)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(32).astype(np.float16),
        "ids": rng.integers(-5, 5, (3, 4)).astype(np.int32),
        "flags": rng.random(7) < 0.5,
        "scalar": np.asarray(rng.standard_normal(), np.float64),
    }


def _raw_file(path, header: dict, data: bytes):
    hb = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def test_scan_and_read_safetensors_roundtrip(tmp_path, rng):
    ts = _tensors(rng)
    p = tmp_path / "model.safetensors"
    save_file(ts, str(p), metadata={"format": "pt"})
    refs, problems, unreadable = _scan(p)
    assert problems == [] and unreadable == set()
    assert set(refs) == set(ts)  # __metadata__ is not a tensor
    for k, want in ts.items():
        ref = refs[k]
        assert ref.file == p and ref.key == k
        assert ref.dtype == want.dtype and ref.shape == want.shape
        assert ref.end - ref.start == want.nbytes
        got = tensor_io.read_tensor(ref)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    # a ref's byte range is exactly that tensor's data
    ref = refs["ids"]
    raw = p.read_bytes()[ref.start:ref.end]
    np.testing.assert_array_equal(np.frombuffer(raw, "<i4").reshape(3, 4), ts["ids"])


def test_write_safetensors_roundtrip_and_casts(tmp_path, rng):
    a = rng.standard_normal((16, 32)).astype(np.float32)
    b = rng.standard_normal((5, 3)).astype(np.float32)
    p = tmp_path / "out.safetensors"
    seen = []
    tensor_io.write_safetensors(p, [("a", a), ("b", b)], {"a": np.float32, "b": np.float16},
                                on_tensor=seen.append)
    assert seen == ["a", "b"]
    back = load_file(str(p))  # the reference reader accepts it
    np.testing.assert_array_equal(back["a"], a)
    assert back["b"].dtype == np.float16
    np.testing.assert_array_equal(back["b"], b.astype(np.float16))
    (hlen,) = struct.unpack("<Q", p.read_bytes()[:8])
    assert hlen % 8 == 0  # 8-byte aligned data


def test_bfloat16_roundtrip(tmp_path, rng):
    x = rng.standard_normal((16, 32)).astype(np.float32)
    p = tmp_path / "bf16.safetensors"
    tensor_io.write_safetensors(p, [("w", x)], {"w": ml_dtypes.bfloat16})
    refs, problems, _ = _scan(p)
    assert problems == []
    got = tensor_io.read_tensor(refs["w"])
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got, x.astype(ml_dtypes.bfloat16))
    assert not np.array_equal(got.astype(np.float32), x)  # it really is rounded to bf16


def test_missing_file_names_it(tmp_path):
    refs, problems, _ = _scan(tmp_path / "nope.safetensors")
    assert refs is None
    assert len(problems) == 1 and problems[0].startswith("nope.safetensors: cannot read")


def test_too_short_file(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02")
    refs, problems, _ = _scan(p)
    assert refs is None
    assert problems == ["short.safetensors: 2 bytes, too short to be a safetensors file"]


def test_header_longer_than_file(tmp_path):
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    refs, problems, _ = _scan(p)
    assert refs is None
    assert "big.safetensors: header claims 10000 bytes but the file has 10 bytes" in problems[0]


@pytest.mark.parametrize("header,why", [(b"{not json", "corrupt safetensors header"),
                                        (b"[1, 2]", "not a JSON object"),
                                        (b"\xff\xfe{}", "corrupt safetensors header")])
def test_corrupt_header_names_file(tmp_path, header, why):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    refs, problems, _ = _scan(p)
    assert refs is None
    assert len(problems) == 1 and problems[0].startswith("bad.safetensors: ")
    assert why in problems[0]


def test_bad_entries_name_file_and_key_and_keep_the_rest(tmp_path, rng):
    good = rng.standard_normal(4).astype(np.float32)
    header = {
        "good": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "no_dtype": {"shape": [4], "data_offsets": [0, 16]},
        "odd_dtype": {"dtype": "F7", "shape": [4], "data_offsets": [0, 16]},
        "wrong_span": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]},
        "negative": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 16]},
    }
    p = tmp_path / "entries.safetensors"
    _raw_file(p, header, good.tobytes())
    refs, problems, unreadable = _scan(p)
    assert set(refs) == {"good"}
    np.testing.assert_array_equal(tensor_io.read_tensor(refs["good"]), good)
    assert unreadable == {"no_dtype", "odd_dtype", "wrong_span", "negative"}
    assert len(problems) == 4 and all(q.startswith("entries.safetensors: ") for q in problems)
    for key in unreadable:
        assert sum(f"'{key}'" in q for q in problems) == 1, key
    assert any("'wrong_span' F32[3] needs 12 bytes but its data_offsets span 16" in q
               for q in problems)


def test_truncated_data_lists_unreadable_tensors(tmp_path, rng):
    ts = {"a": rng.standard_normal(8).astype(np.float32),
          "b": rng.standard_normal(64).astype(np.float32)}
    p = tmp_path / "trunc.safetensors"
    save_file(ts, str(p))
    full = p.read_bytes()
    p.write_bytes(full[:-16])
    refs, problems, unreadable = _scan(p)
    # keys are stored sorted: "a" first (intact), "b" last (cut)
    assert set(refs) == {"a"} and unreadable == {"b"}
    np.testing.assert_array_equal(tensor_io.read_tensor(refs["a"]), ts["a"])
    assert len(problems) == 1
    assert problems[0].startswith(f"trunc.safetensors: truncated: {len(full) - 16} bytes but "
                                  f"the header needs at least {len(full)}")
    assert problems[0].endswith("unreadable tensors: b")


def test_read_tensor_of_a_file_that_shrank(tmp_path, rng):
    ts = {"w": rng.standard_normal((16, 32)).astype(np.float32)}
    p = tmp_path / "shrank.safetensors"
    save_file(ts, str(p))
    refs, problems, _ = _scan(p)
    assert problems == []
    p.write_bytes(p.read_bytes()[:-100])  # changed after the scan
    with pytest.raises(CheckpointError, match="shrank.safetensors") as e:
        tensor_io.read_tensor(refs["w"])
    assert e.value.problems == [f"'w': read {2048 - 100} of 2048 bytes (file changed while "
                                "loading?)"]


def test_short_list():
    assert tensor_io.short_list(["a", "b"]) == "a, b"
    assert tensor_io.short_list([str(i) for i in range(9)]) == "0, 1, 2, 3, ... (9 in all)"


def test_bin_roundtrip_and_corrupt(tmp_path, rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((16, 32)).astype(np.float32)
    sd = {"w": torch.from_numpy(x), "h": torch.from_numpy(x).to(torch.bfloat16),
          "i": torch.arange(5, dtype=torch.int64)}
    p = tmp_path / "pytorch_model.bin"
    torch.save(sd, p)
    problems, unreadable = [], set()
    refs = tensor_io.scan_bin(p, problems, unreadable)
    assert problems == [] and unreadable == set() and set(refs) == {"w", "h", "i"}
    np.testing.assert_array_equal(tensor_io.read_tensor(refs["w"]), x)
    h = tensor_io.read_tensor(refs["h"])
    assert h.dtype == np.dtype(ml_dtypes.bfloat16) and h.shape == (16, 32)
    np.testing.assert_array_equal(h, x.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(tensor_io.read_tensor(refs["i"]), np.arange(5))

    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"not a torch file at all")
    problems = []
    assert tensor_io.scan_bin(bad, problems, set()) is None
    assert len(problems) == 1 and problems[0].startswith("broken.bin: cannot load with torch")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e5m2",
                                   "float8_e4m3fn", "float64"])
def test_count_nonfinite_every_float_format(dtype, seed):
    from deltajax.errors import NonFiniteError, check_finite_host, count_nonfinite

    dt = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(1000).astype(np.float32)
    bad = rng.choice(1000, 7, replace=False)
    x[bad[:4]] = np.nan
    x[bad[4:]] = [np.inf, -np.inf, np.inf]
    y = x.astype(dt)
    want = int((~np.isfinite(y.astype(np.float32))).sum())
    assert want == 7 and count_nonfinite(y) == want, f"seed {seed}"
    assert count_nonfinite(np.where(np.isfinite(x), x, 0.0).astype(dt)) == 0
    assert count_nonfinite(np.arange(5)) == 0
    with pytest.raises(NonFiniteError, match="'w' holds 7 NaN/Inf entries of 1000") as e:
        check_finite_host(y, "w")
    assert e.value.name == "w" and e.value.count == 7

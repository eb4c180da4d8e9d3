"""Reading and writing safetensors files and model directories: every dtype of the format, malformed files,
atomic shard writes, weight hashes.  Fast: real files in tmp_path, safetensors itself as the reference."""

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergescale.checkpoints import ModelDir, SafetensorsFile, publish, staging_dir, weights_sha256, write_shard
from mergescale.errors import ModelError

# every safetensors dtype torch can hold (F6_E2M3 / F6_E3M2 have no torch dtype: see the malformed cases)
DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F4": torch.float4_e2m1fn_x2,
    "C64": torch.complex64,
}
FIX = re.compile(r"; (re-save|re-download|dequantize|cast|reshape)")


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns (NaNs included) of ``dtype``; bools are 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel() * dtype.itemsize
    bits = torch.randint(0, 2 if dtype == torch.bool else 256, (n,), dtype=torch.uint8, generator=g)
    return bits.view(dtype).reshape(shape)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


def tensors_of(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {
        "model.layers.0.mlp.up_proj.weight": random_tensor(dtype, (7, 3, 4), 1),
        "model.norm.weight": random_tensor(dtype, (6,), 2),
        "model.empty": random_tensor(dtype, (0, 4), 3),
    }
    if dtype != torch.float4_e2m1fn_x2:  # a 0-d F4 tensor (one byte, two values) has no safetensors shape
        out["model.scalar"] = random_tensor(dtype, (), 4)
    return out


def model_dir(path, tensors: dict[str, torch.Tensor]):
    path.mkdir()
    (path / "config.json").write_text("{}")
    save_file(tensors, path / "model.safetensors")
    return path


def header_of(path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


@pytest.mark.parametrize("code", DTYPES)
def test_reads_every_safetensors_dtype_bit_for_bit_whole_and_by_rows(tmp_path, code):
    dtype = DTYPES[code]
    tensors = tensors_of(dtype)
    d = model_dir(tmp_path / "m", tensors)
    assert {e["dtype"] for k, e in header_of(d / "model.safetensors").items() if k != "__metadata__"} == {code}
    f = SafetensorsFile(d / "model.safetensors")
    m = ModelDir(d)
    assert sorted(m.names) == sorted(tensors)
    for name, t in tensors.items():
        assert f.dtype(name) == m.dtype(name) == dtype
        assert f.shape(name) == m.shape(name) == tuple(t.shape)
        assert same_bits(f.read(name), t) and same_bits(m.tensor(name), t)
    w = tensors["model.layers.0.mlp.up_proj.weight"]
    assert same_bits(f.read("model.layers.0.mlp.up_proj.weight", 2, 5), w[2:5])
    assert same_bits(m.rows("model.layers.0.mlp.up_proj.weight", 5, 99), w[5:])  # clamped to the rows there are
    assert same_bits(m.rows("model.layers.0.mlp.up_proj.weight", 3, 3), w[3:3])
    assert same_bits(m.rows("model.layers.0.mlp.up_proj.weight", 9, 12), w[9:12])  # past the end: no rows
    assert same_bits(m.rows("model.norm.weight", 1, 4), tensors["model.norm.weight"][1:4])


@pytest.mark.parametrize("code", DTYPES)
def test_write_shard_round_trips_every_dtype_through_safetensors(tmp_path, code):
    dtype = DTYPES[code]
    tensors = tensors_of(dtype)
    info = write_shard(tmp_path, "shard.safetensors", tensors)
    path = tmp_path / "shard.safetensors"
    assert info.names == tuple(sorted(tensors)) and info.nbytes == path.stat().st_size
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for name, t in tensors.items():
            assert same_bits(f.get_tensor(name), t), name
    ours = SafetensorsFile(path)
    assert all(same_bits(ours.read(name), t) for name, t in tensors.items())
    # the header counts values: for F4 (two a byte) that is twice torch's last dimension
    per_value = 2 if code == "F4" else 1
    assert header_of(path)["model.layers.0.mlp.up_proj.weight"] == {
        "dtype": code,
        "shape": [7, 3, 4 * per_value],
        "data_offsets": [0, 7 * 3 * 4 * dtype.itemsize],
    }


def test_write_shard_bytes_and_sha256_are_deterministic(tmp_path):
    import hashlib

    tensors = {"b": random_tensor(torch.bfloat16, (4, 4), 1), "a": random_tensor(torch.float8_e4m3fn, (3,), 2)}
    one = write_shard(tmp_path, "one.safetensors", tensors)
    two = write_shard(tmp_path, "two.safetensors", dict(reversed(tensors.items())))
    data = (tmp_path / "one.safetensors").read_bytes()
    assert data == (tmp_path / "two.safetensors").read_bytes()
    assert one.sha256 == two.sha256 == hashlib.sha256(data).hexdigest()


def _raw(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


W = "model.layers.0.mlp.up_proj.weight"


def _f32(shape, offsets):
    return {W: {"dtype": "F32", "shape": shape, "data_offsets": offsets}}


MALFORMED = {
    # case: (file bytes, tensor named in the message or None, key phrase)
    "empty file": (b"", None, "truncated: 0 bytes"),
    "shorter than 8 bytes": (b"\x10\x00\x00", None, "truncated: 3 bytes"),
    "header length zero": (bytes(8) + b"{}", None, "bad header length 0"),
    "header length beyond the file": (_raw({}, length=1000), None, "the header says it has 1000 bytes"),
    "header not JSON": (_raw(b"{not json}"), None, "not JSON"),
    "header not UTF-8": (_raw(b'{"\xff": 1}'), None, "not JSON"),
    "header JSON an array": (_raw([1, 2]), None, "JSON list, not an object"),
    "entry not an object": (_raw({W: [0, 16]}), W, "no dtype, shape, data_offsets"),
    "entry without dtype": (_raw({W: {"shape": [4], "data_offsets": [0, 16]}}, bytes(16)), W, "no dtype"),
    "entry without shape": (_raw({W: {"dtype": "F32", "data_offsets": [0, 16]}}, bytes(16)), W, "no shape"),
    "entry without data_offsets": (_raw({W: {"dtype": "F32", "shape": [4]}}, bytes(16)), W, "no data_offsets"),
    "unknown dtype": (
        _raw({W: {"dtype": "F12", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
        W,
        "'F12', which is not a safetensors dtype",
    ),
    "6-bit float E2M3": (
        _raw({W: {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [0, 3]}}, bytes(3)),
        W,
        "F6_E2M3, which torch",
    ),
    "6-bit float E3M2": (
        _raw({W: {"dtype": "F6_E3M2", "shape": [4], "data_offsets": [0, 3]}}, bytes(3)),
        W,
        "F6_E3M2, which torch",
    ),
    "F4 with an odd last dimension": (
        _raw({W: {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}}, bytes(3)),
        W,
        "must be a multiple of 2",
    ),
    "negative dimension": (_raw(_f32([-1, 4], [0, 16]), bytes(16)), W, "not a list of non-negative integers"),
    "shape not a list": (_raw(_f32("4x4", [0, 64]), bytes(64)), W, "not a list of non-negative integers"),
    "negative offset": (_raw(_f32([4], [-16, 0]), bytes(16)), W, "0 <= begin <= end"),
    "offsets reversed": (_raw(_f32([4], [16, 0]), bytes(16)), W, "0 <= begin <= end"),
    "offsets not a pair": (_raw(_f32([4], [16]), bytes(16)), W, "0 <= begin <= end"),
    "offsets disagree with shape and dtype": (_raw(_f32([2, 2], [0, 12]), bytes(16)), W, "span 12 bytes"),
    "offsets overlap": (
        _raw(
            {
                "model.a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "model.b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            bytes(24),
        ),
        "model.a and model.b",
        "overlap",
    ),
    "data shorter than the header says": (_raw(_f32([4], [0, 16]), bytes(10)), W, "truncated: tensor"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_safetensors_file_is_refused_with_one_line_naming_file_tensor_and_fix(tmp_path, case):
    raw, tensor, phrase = MALFORMED[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw)
    with pytest.raises(ModelError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert str(path) in msg and phrase in msg and "\n" not in msg and FIX.search(msg), msg
    if tensor is not None:
        assert tensor in msg


def test_valid_hand_written_file_with_metadata_gaps_and_empty_tensors_is_read(tmp_path):
    """The malformed cases' builder makes readable files too: only the flaw in each case is refused."""
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        W: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "model.empty": {"dtype": "F32", "shape": [0, 2], "data_offsets": [16, 16]},
    }
    path = tmp_path / "model.safetensors"
    path.write_bytes(_raw(header, data))
    f = SafetensorsFile(path)
    assert torch.equal(f.read(W), torch.arange(4, dtype=torch.float32).reshape(2, 2))
    assert f.read("model.empty").shape == (0, 2)


@pytest.mark.parametrize(
    ("file", "text", "phrase"),
    [
        ("config.json", "{oops", "not valid JSON"),
        ("config.json", "[]", "JSON list, not an object"),
        ("model.safetensors.index.json", "{}", 'no "weight_map"'),
        ("model.safetensors.index.json", '{"weight_map": {"w": 3}}', 'no "weight_map"'),
    ],
)
def test_corrupt_config_or_index_is_refused_naming_the_file(tmp_path, file, text, phrase):
    d = model_dir(tmp_path / "m", {"w": torch.zeros(2)})
    (d / file).write_text(text)
    with pytest.raises(ModelError, match=re.escape(phrase)) as e:
        ModelDir(d)
    assert str(d / file) in str(e.value) and FIX.search(str(e.value))


def test_pickled_checkpoint_is_refused_unless_allowed_then_read(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    w = torch.randn(3, 2)
    torch.save({"w": w}, d / "pytorch_model.bin")
    with pytest.raises(ModelError, match="--allow-pickle"):
        ModelDir(d)
    m = ModelDir(d, allow_pickle=True)
    assert torch.equal(m.tensor("w"), w) and torch.equal(m.rows("w", 1, 3), w[1:3])


@pytest.mark.parametrize("dtype", [torch.complex128, torch.uint4, torch.bits8])
def test_write_shard_refuses_a_dtype_safetensors_lacks_and_writes_nothing(tmp_path, dtype):
    tensors = {"a": torch.zeros(4), "b": torch.empty(2, dtype=dtype)}
    with pytest.raises(ModelError, match=rf"shard\.safetensors: tensor b has dtype {dtype}, which safetensors cannot"):
        write_shard(tmp_path, "shard.safetensors", tensors)
    assert list(tmp_path.iterdir()) == []


def test_write_shard_refuses_a_0d_f4_tensor(tmp_path):
    t = torch.zeros((), dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    with pytest.raises(ModelError, match="0-dimensional"):
        write_shard(tmp_path, "shard.safetensors", {"t": t})
    assert list(tmp_path.iterdir()) == []


def test_write_shard_failing_mid_write_leaves_neither_the_file_nor_its_partial(tmp_path):
    # "a" is written, then "b" (a meta tensor: shape and dtype, no data) cannot be copied out
    tensors = {"a": torch.ones(1000), "b": torch.empty(1000, device="meta")}
    with pytest.raises(NotImplementedError):
        write_shard(tmp_path, "shard.safetensors", tensors)
    assert list(tmp_path.iterdir()) == []


def test_publish_drops_partials_of_killed_writers_and_renames_staging_into_place(tmp_path):
    out = tmp_path / "merged"
    staging = staging_dir(out)
    shard = write_shard(staging, "model.safetensors", {"w": torch.ones(2)})
    (staging / ".model.safetensors.tmp-12345").write_bytes(b"half")
    publish(staging, out, [shard], {"model_type": "x"}, None, "card\n")
    assert not staging.exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    ]
    assert torch.equal(ModelDir(out).tensor("w"), torch.ones(2))


def test_weights_sha256_depends_on_the_bytes_not_the_directory_name(tmp_path):
    a = model_dir(tmp_path / "a", {"w": random_tensor(torch.bfloat16, (8, 8), 1)})
    b = tmp_path / "some other name"
    shutil.copytree(a, b)
    (b / "config.json").write_text('{"different": "config"}')  # only the weights count
    assert weights_sha256(a) == weights_sha256(b)
    raw = bytearray((b / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (b / "model.safetensors").write_bytes(bytes(raw))
    assert weights_sha256(a) != weights_sha256(b)


def test_weights_sha256_of_a_directory_without_weights_is_refused(tmp_path):
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights"):
        weights_sha256(tmp_path)

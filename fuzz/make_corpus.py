#!/usr/bin/env python3
"""Writes the committed seed corpus under fuzz/corpus/<target>/ (small, realistic requests).

Run from anywhere: python3 fuzz/make_corpus.py. Files are named after their content's purpose and
rewritten in place, so the corpus in git is reproducible. libFuzzer adds what it finds to a working
corpus under fuzz/target, never here.
"""

import gzip
import json
import struct
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "corpus"


def write(target: str, name: str, data: bytes) -> None:
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def j(v) -> bytes:
    return json.dumps(v, separators=(",", ":")).encode()


def bytes_wire(items) -> bytes:
    """The binary extension's BYTES encoding: 4-byte little-endian length, then the bytes."""
    return b"".join(struct.pack("<I", len(s)) + s for s in items)


# --- v2_json: the request body alone -------------------------------------------------------------
V2 = {
    "fp32_flat": {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2.5, -3, 4e-3, 0, 1e30, -0.0, 7]}]},
    "fp32_nested": {
        "id": "req-1",
        "inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]}],
        "outputs": [{"name": "y"}],
    },
    "fp32_special": {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["NaN", "inf", "-inf", 1]}]},
    "int64": {"inputs": [{"name": "ids", "shape": [2, 3], "datatype": "INT64", "data": [[1, -2, 9223372036854775807], [-9223372036854775808, 0, 5]]}]},
    "bytes": {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["hello", "", "w\u00f6rld \\u0000"]}]},
    "bool": {"inputs": [{"name": "mask", "shape": [2, 3], "datatype": "BOOL", "data": [[True, False, True], [False, False, True]]}]},
    "fp16_u64": {
        "inputs": [
            {"name": "half", "shape": [2], "datatype": "FP16", "data": [0.5, 65504]},
            {"name": "big", "shape": [2], "datatype": "UINT64", "data": [18446744073709551615, 0]},
        ]
    },
    "all_inputs": {
        "id": "all",
        "parameters": {"binary_data_output": False, "timeout": 1000},
        "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [7, 8]},
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]},
            {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "data": [True, False, True]},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    },
    "empty_tensor": {"inputs": [{"name": "x", "shape": [0, 4], "datatype": "FP32", "data": []}]},
    "wrong_count": {"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": [1, 2]}]},
    "huge_shape": {"inputs": [{"name": "x", "shape": [4294967296, 4294967296], "datatype": "FP32", "data": [1]}]},
    "negative_dim": {"inputs": [{"name": "x", "shape": [-1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
    "unknown_input": {"inputs": [{"name": "nope", "shape": [1], "datatype": "FP32", "data": [1]}]},
    "wrong_dtype": {"inputs": [{"name": "ids", "shape": [1], "datatype": "FP32", "data": [1.5]}]},
    "deep_nesting": {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]},
}
for name, v in V2.items():
    write("v2_json", name + ".json", j(v))
write("v2_json", "not_json.txt", b'{"inputs": [{"name": "x", "shape": [1,4], ')


# --- v2_binary: mode byte, then (framing) u16 header length + body, or (from_binary) dtype, rank,
# dims, raw bytes ------------------------------------------------------------------------------------
def framing(header: dict, blobs: bytes, json_len: int | None = None) -> bytes:
    h = j(header)
    n = len(h) if json_len is None else json_len
    return b"\x00" + struct.pack("<H", n) + h + blobs


x = struct.pack("<8f", *range(8))
ids = struct.pack("<3q", 1, -1, 2**62)
text = bytes_wire([b"hello", b"", b"\xff\x00bin"])
mask = bytes([1, 0, 1])
write("v2_binary", "fp32_binary.bin", framing({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": len(x)}}]}, x))
write(
    "v2_binary",
    "mixed_binary_json.bin",
    framing(
        {
            "inputs": [
                {"name": "ids", "shape": [1, 3], "datatype": "INT64", "parameters": {"binary_data_size": len(ids)}},
                {"name": "text", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(text)}},
                {"name": "mask", "shape": [1, 3], "datatype": "BOOL", "data": [True, False, True]},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
            "parameters": {"binary_data_output": True},
        },
        ids + text,
    ),
)
write("v2_binary", "bool_binary.bin", framing({"inputs": [{"name": "mask", "shape": [1, 3], "datatype": "BOOL", "parameters": {"binary_data_size": 3}}]}, mask))
write("v2_binary", "short_blob.bin", framing({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}}]}, x[:20]))
write("v2_binary", "trailing_bytes.bin", framing({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}, x))
write("v2_binary", "header_len_past_end.bin", framing({"inputs": []}, b"", json_len=60000))
write("v2_binary", "bad_bytes_prefix.bin", framing({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}, struct.pack("<I", 1000) + b"ab"))


def direct(dtype_index: int, shape, raw: bytes) -> bytes:
    return b"\x01" + bytes([dtype_index, len(shape)]) + b"".join(struct.pack("<I", d) for d in shape) + raw


# DTYPES order in fuzz/src/lib.rs: BOOL U8 U16 U32 U64 I8 I16 I32 I64 F16 BF16 F32 F64 BYTES
write("v2_binary", "direct_fp32.bin", direct(11, [2, 2], struct.pack("<4f", 1, 2, 3, 4)))
write("v2_binary", "direct_bytes.bin", direct(13, [3], text))
write("v2_binary", "direct_bool_bad.bin", direct(0, [2], b"\x01\x02"))
write("v2_binary", "direct_huge_shape.bin", direct(13, [0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF], bytes_wire([b"a"])))
write("v2_binary", "direct_scalar_i64.bin", direct(8, [], struct.pack("<q", -5)))

# --- v1_json: TF-Serving :predict bodies -----------------------------------------------------------
V1 = {
    "instances_rows": {"instances": [[1, 2, 3, 4], [5.5, 6, 7, 8]]},
    "instances_named": {"instances": [{"x": [1, 2, 3, 4], "ids": [1, 2], "text": "a", "mask": [True, False, True]}, {"x": [5, 6, 7, 8], "ids": [3, 4], "text": "b", "mask": [False, False, True]}]},
    "instances_b64": {"instances": [{"text": {"b64": "aGVsbG8="}, "x": [0, 0, 0, 0]}]},
    "inputs_columnar": {"inputs": {"x": [[1, 2, 3, 4]], "ids": [[1, 2]], "text": ["a", "b"], "mask": [[True, False, True]]}},
    "inputs_single": {"inputs": [[1.5, 2, 3, 4]]},
    "inputs_b64": {"inputs": {"text": [{"b64": "AAEC"}, {"b64": "////"}]}},
    "big_uint": {"inputs": {"big": [18446744073709551615, 1]}},
    "ragged": {"instances": [[1, 2, 3, 4], [5, 6]]},
    "both_keys": {"instances": [[1]], "inputs": [[1]]},
    "special_floats": {"instances": [["NaN", "inf", "-inf", 1e308]]},
    "bad_b64": {"instances": [{"text": {"b64": "%%%"}}]},
    "null_element": {"inputs": {"x": [[1, None, 3, 4]]}},
    "empty_instances": {"instances": []},
}
for name, v in V1.items():
    write("v1_json", name + ".json", j(v))
# An ignored key holding a number no f64 can hold: skipped, not parsed.
write("v1_json", "ignored_key_huge_number.json", b'{"nistances":[[1e3081]],"inputs":[[1,2,3,4]]}')
write("v1_json", "signature_name.json", b'{"signature_name":"serving_default","instances":[[1,2,3,4]]}')

# --- router: HTTP requests (see src/router.rs for the format) ---------------------------------------
infer = j({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
ROUTER = {
    "health_live": b"GET /v2/health/live\n\n",
    "health_ready": b"GET /v2/health/ready\n\n",
    "server_meta": b"GET /v2\n\n",
    "metrics": b"GET /metrics\n\n",
    "metrics_port": b"GET /metrics m\n\n",
    "metrics_port_post": b"POST /v2/models/m/infer m\n\n" + infer,
    "index": b"POST /v2/repository/index\ncontent-type: application/json\n\n{}",
    "model_meta": b"GET /v2/models/m\n\n",
    "model_version_ready": b"GET /v2/models/m/versions/2/ready\n\n",
    "model_config": b"GET /v2/models/resnet/config\n\n",
    "stats": b"GET /v2/models/stats\n\n",
    "model_stats": b"GET /v2/models/m/versions/1/stats\n\n",
    "infer": b"POST /v2/models/m/infer\r\ncontent-type: application/json\r\n\r\n" + infer,
    "infer_binary": b"POST /v2/models/m/versions/1/infer\nInference-Header-Content-Length: 10\n\n" + infer,
    "infer_get": b"GET /v2/models/m/infer\n\n",
    "v1_status": b"GET /v1/models/m\n\n",
    "v1_version_status": b"GET /v1/models/m/versions/2\n\n",
    "v1_metadata": b"GET /v1/models/resnet/metadata\n\n",
    "v1_predict": b"POST /v1/models/m:predict\n\n" + j({"instances": [[1, 2, 3, 4]]}),
    "v1_version_predict": b"POST /v1/models/m/versions/1:predict\n\n" + j({"inputs": [[1, 2, 3, 4]]}),
    "v1_classify": b"POST /v1/models/m:classify\n\n{}",
    "keys_missing": b"GET /v2/models/m k\n\n",
    "keys_ok": b"POST /v2/models/m/infer ka\nAuthorization: Bearer s3cret\n\n" + infer,
    "keys_forbidden": b"GET /v2/models/m/config k\nauthorization: bearer k2\n\n",
    "keys_open_ready": b"GET /v2/models/m/ready k\n\n",
    "audit": b"GET /v1/models/resnet a\n\n",
    "absolute_uri": b"GET http://example.com/v2/health/ready?x=1\n\n",
    "odd_path": b"DELETE //v2//models/%2e%2e/ready/\n\n",
    "unknown": b"PATCH /v3/anything?q=1\nX-Custom: 1\n\nbody",
    "keys_extension_method": b"yET /v2/models/m k\n\n",
    "put_known_route": b"PUT /v2/models/m/versions/1/infer\n\n",
    "shm_status": b"GET /v2/systemsharedmemory/status s\n\n",
    "shm_register": b"POST /v2/systemsharedmemory/region/r/register s\n\n"
    + j({"key": "/kubemaas-fuzz-none", "offset": 0, "byte_size": 16}),
    "shm_unregister_all": b"POST /v2/systemsharedmemory/unregister s\n\n",
    "shm_not_allowed": b"POST /v2/systemsharedmemory/region/r/register\n\n" + j({"key": "/k", "byte_size": 4}),
    "cuda_shm_status": b"GET /v2/cudasharedmemory/status s\n\n",
    "infer_gzip_body": b"POST /v2/models/m/infer\ncontent-encoding: gzip\n\n" + gzip.compress(infer, mtime=0),
    "infer_deflate_body": b"POST /v2/models/m/infer\ncontent-encoding: deflate\n\n" + zlib.compress(infer),
    "infer_unknown_encoding": b"POST /v2/models/m/infer\ncontent-encoding: br\n\n" + infer,
    "infer_accepts_gzip": b"POST /v2/models/m/infer z\naccept-encoding: gzip;q=1, deflate;q=0\n\n" + infer,
}
for name, data in ROUTER.items():
    write("router", name + ".http", data)

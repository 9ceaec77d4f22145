#!/usr/bin/env python3
"""The `safetensors` package (the Rust crate's Python binding) as the reference for lmforge's
safetensors reader and writer (tests/io/test_safetensors_reference.cpp).

  safetensors_ref.py corpus --out DIR
      Writes ~330 files, valid ones and mutations of them (hand-written edge cases, then seeded
      random byte flips, truncations, header edits), into DIR, and DIR/verdicts.json:
      [{"file", "ok", "error", "tensors": {name: [dtype, shape]}}], the package's decision on
      each (safe_open and deserialize must agree, else this script fails).

  safetensors_ref.py read --path P --out JSON [--order FILE --max-shard-bytes N]
      Loads a file, or a directory as Hugging Face stores weights (model.safetensors, or the
      index and its shards), with the package and writes {name: {dtype, shape, hex}} under
      "tensors", plus "metadata", "index" (the index file, if any) and "hf_split": how
      huggingface_hub.split_torch_state_dict_into_shards would shard these tensors, in the order
      of FILE (one name per line), at N bytes per shard.
"""

import argparse
import json
import os
import random
import struct
import sys

import safetensors
from safetensors import deserialize, safe_open

DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
              "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16,
              "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64,
              "F64": 64, "I64": 64, "U64": 64}


def frame(header, data=b"", n=None):
    """8-byte length + header (bytes, str or a dict dumped compactly) + data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def padded(header_dict, data, ensure_ascii=True):
    """As the writers do: the header padded with spaces to a multiple of 8."""
    h = json.dumps(header_dict, separators=(",", ":"), ensure_ascii=ensure_ascii).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + data


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def nbytes(dtype, shape):
    n = 1
    for d in shape:
        n *= d
    return n * DTYPE_BITS[dtype] // 8


def build(tensors, metadata=None):
    """A valid file from [(name, dtype, shape)], data bytes counting up."""
    header, off = {}, 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape in tensors:
        n = nbytes(dtype, shape)
        header[name] = entry(dtype, shape, off, off + n)
        off += n
    return header, bytes(i % 251 for i in range(off))


def bases():
    """Valid files: from the package's own writers and hand-made ones."""
    import numpy as np
    import torch
    from safetensors.numpy import save as np_save
    from safetensors.torch import save as torch_save

    g = torch.Generator().manual_seed(0)
    out = {}
    out["torch"] = torch_save({
        "w.f32": torch.randn(3, 4, generator=g),
        "w.bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(2, 3, generator=g).to(torch.float16),
        "ids.i64": torch.arange(3),
        "bytes.u8": torch.arange(7, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True, True]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3, dtype=torch.int32),
        "fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
    }, metadata={"format": "pt"})
    rs = np.random.default_rng(0)
    out["numpy"] = np_save({
        "u16": np.arange(6, dtype=np.uint16).reshape(2, 3),
        "u32": np.arange(4, dtype=np.uint32),
        "i16": np.arange(5, dtype=np.int16),
        "i8": np.arange(3, dtype=np.int8),
        "c64": (rs.standard_normal(2) + 1j).astype(np.complex64),
        "f64": rs.standard_normal((2, 2)),
    })
    # Every dtype of the format, keys out of data order.
    tensors = [(f"t.{d}", d, [2, 4] if DTYPE_BITS[d] < 8 else [3]) for d in DTYPE_BITS]
    header, data = build(tensors, {"note": "all dtypes"})
    items = list(header.items())
    random.Random(1).shuffle(items)
    out["alldtypes"] = padded(dict(items), data)
    out["empty"] = frame("{}")
    out["metaonly"] = padded({"__metadata__": {"a": "b", "c": ""}}, b"")
    header, data = build([(f"layer.{i}.w", "F32" if i % 2 else "BF16", [i % 3 + 1, 2])
                          for i in range(40)])
    out["many"] = padded(header, data)
    header, data = build([("é名", "F32", [2]), ("a\"b", "I32", [1]), ("", "U8", [3]),
                          ("z", "F16", [0])], {"k\u00e9": "v\n\u2603"})
    out["unicode"] = padded(header, data, ensure_ascii=False)
    return out


def edge_cases():
    """Hand-written headers around each rule, accepted and rejected."""
    E = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'  # a valid entry of 8 bytes
    A = '"a":' + E
    D8 = b"\0" * 8
    F = ',"shape":[2],"data_offsets":[0,8]}}'  # the rest of E, closing the header

    def dt(dtype_json, rest=F):  # "a" with a given dtype value
        return frame('{"a":{"dtype":' + dtype_json + rest, D8)

    def X(extra):  # an extra field in a valid entry
        return frame('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + extra + '}}', D8)

    c = {}
    c["short-file"] = b"\x02\0\0\0\0\0\0"
    c["zero-bytes"] = b""
    c["len-only"] = struct.pack("<Q", 0)
    c["header-past-eof"] = frame("{" + A + "}", D8, n=200)
    c["header-len-plus-1"] = frame("{" + A + "}", D8, n=len(A) + 3)
    c["header-len-minus-1"] = frame("{" + A + "}", D8, n=len(A) + 1)
    c["header-too-large"] = frame("{}", b"", n=100_000_001)
    c["header-at-limit"] = frame("{}", b"", n=100_000_000)
    c["header-u64-max"] = frame("{}", b"", n=2**64 - 1)
    c["header-2^63"] = frame("{}", b"", n=2**63)
    c["empty-header"] = frame("", b"")
    c["non-utf8"] = frame(b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', D8)
    c["overlong-utf8"] = frame(b'{"\xc0\xaf":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', D8)
    c["surrogate-utf8"] = frame(b'{"\xed\xa0\x80":' + E.encode() + b"}", D8)
    c["utf8-above-max"] = frame(b'{"\xf4\x90\x80\x80":' + E.encode() + b"}", D8)
    c["utf8-truncated"] = frame(b'{' + A.encode() + b'}  \xe2\x82', D8)
    c["non-utf8-in-padding"] = frame(b'{' + A.encode() + b'}  \xff', D8)
    c["leading-space"] = frame(" {" + A + "}", D8)
    c["leading-newline-tab-cr"] = frame("\n\t\r {" + A + "}", D8)
    c["leading-formfeed"] = frame("\x0c{" + A + "}", D8)
    c["leading-bom"] = frame("\ufeff{" + A + "}", D8)
    c["trailing-spaces"] = frame("{" + A + "}   \n", D8)
    c["trailing-nul"] = frame("{" + A + "}\0", D8)
    c["trailing-garbage"] = frame("{" + A + "}x", D8)
    c["top-array"] = frame("[]")
    c["top-string"] = frame('"x"')
    c["top-null"] = frame("null")
    c["top-number"] = frame("1")
    c["two-objects"] = frame("{}{}")
    c["trailing-comma"] = frame("{" + A + ",}", D8)
    c["missing-colon"] = frame('{"a"{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', D8)
    c["single-quotes"] = frame("{'a':{}}")
    c["unknown-dtype"] = frame({"a": entry("Q4", [2], 0, 8)}, D8)
    c["lowercase-dtype"] = frame({"a": entry("f32", [2], 0, 8)}, D8)
    c["dtype-int"] = frame('{"a":{"dtype":11,"shape":[2],"data_offsets":[0,8]}}', D8)
    c["dtype-escaped"] = dt('"F\\u0033\\u0032"')
    c["dtype-map"] = frame('{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', D8)
    c["dtype-map-list"] = frame('{"a":{"dtype":{"F32":[]},"shape":[2],"data_offsets":[0,8]}}', D8)
    c["dtype-map-obj"] = frame('{"a":{"dtype":{"F32":{}},"shape":[2],"data_offsets":[0,8]}}', D8)
    c["dtype-map-two"] = dt('{"F32":null,"F16":null}')
    c["dtype-map-empty"] = frame('{"a":{"dtype":{},"shape":[2],"data_offsets":[0,8]}}', D8)
    c["dtype-map-unknown"] = dt('{"Q":null}')
    c["dtype-list"] = frame('{"a":{"dtype":["F32"],"shape":[2],"data_offsets":[0,8]}}', D8)
    c["entry-array"] = frame('{"a":["F32",[2],[0,8]]}', D8)
    c["entry-array-dtype-map"] = frame('{"a":[{"F32":null},[2],[0,8]]}', D8)
    c["entry-array-short"] = frame('{"a":["F32",[2]]}', D8)
    c["entry-array-long"] = frame('{"a":["F32",[2],[0,8],1]}', D8)
    c["entry-array-empty"] = frame('{"a":[]}', D8)
    c["entry-null"] = frame('{"a":null}')
    c["entry-number"] = frame('{"a":5}')
    c["entry-empty-object"] = frame('{"a":{}}')
    c["missing-dtype"] = frame('{"a":{"shape":[2],"data_offsets":[0,8]}}', D8)
    c["missing-shape"] = frame('{"a":{"dtype":"F32","data_offsets":[0,8]}}', D8)
    c["missing-offsets"] = frame('{"a":{"dtype":"F32","shape":[2]}}', D8)
    c["duplicate-field"] = dt('"F32","dtype":"F32"')
    c["field-name-escaped"] = frame('{"a":{"dtyp\\u0065":"F32"' + F, D8)
    c["extra-field"] = X("1")
    c["extra-field-nested"] = X('{"a":[1,{"b":null}],"c":true,"d":false,"e":-1.5e-3}')
    c["extra-field-dup-keys"] = X('{"k":1,"k":2}')
    c["extra-field-twice"] = dt('"F32","x":1,"x":2')
    # Nesting levels count the header object and the entry: X adds 2.
    c["depth-127"] = X("[" * 125 + "]" * 125)
    c["depth-128"] = X("[" * 126 + "]" * 126)
    c["depth-129"] = X("[" * 127 + "]" * 127)
    c["depth-obj-127"] = X('{"k":' * 125 + "1" + "}" * 125)
    c["depth-obj-128"] = X('{"k":' * 126 + "1" + "}" * 126)
    c["deep-then-valid"] = frame('{"a":' + "[" * 200 + "]" * 200 + "," + A + "}", D8)
    c["num-1e400"] = X("1e400")
    c["num-1e-400"] = X("1e-400")
    c["num-max-f64"] = X("1.7976931348623157e308")
    c["num-max-f64-serde-overflow"] = X("1.7976931348623158e308")
    c["num-above-max-f64"] = X("1.7976931348623159e308")
    c["num-huge-int"] = X("1" + "0" * 400)
    c["num-huge-neg-int"] = X("-1" + "0" * 400)
    c["num-long-int-frac"] = X("1" + "0" * 30 + ".5e2")
    c["num-0e-huge"] = X("0e99999999999999999999")
    c["num-1e-huge"] = X("1e-99999999999999999999")
    c["num-1e+huge"] = X("1e+99999999999999999999")
    c["num-1E5"] = X("1E5")
    c["num-1."] = X("1.")
    c["num-.5"] = X(".5")
    c["num-minus"] = X("-")
    c["num-1e"] = X("1e")
    c["num-1e+"] = X("1e+")
    c["num-leading-zero"] = X("01")
    c["num-neg-leading-zero"] = X("-01")
    c["num-plus"] = X("+1")
    c["num-nan"] = X("NaN")
    c["lit-true"] = X("true")
    c["lit-tru"] = X("tru")
    c["lit-nul"] = X("nul")
    c["str-surrogate-pair"] = X('"\\ud83d\\ude00"')
    c["str-lone-high"] = X('"\\ud800"')
    c["str-lone-low"] = X('"\\udc00"')
    c["str-high-high"] = X('"\\ud800\\ud800"')
    c["str-high-letter"] = X('"\\ud800\\u0041"')
    c["str-high-newline"] = X('"\\ud800\\n"')
    c["str-bad-hex"] = X('"\\u12G4"')
    c["str-short-hex"] = X('"\\u12"')
    c["str-bad-escape"] = X('"\\x"')
    c["str-control-char"] = X('"\x01"')
    c["str-raw-newline"] = X('"a\nb"')
    c["str-del"] = X('"\x7f"')
    c["str-escaped-nul"] = X('"\\u0000"')
    c["str-unterminated"] = frame('{"a":{"dtype":"F32","x":"abc}}', D8)
    c["key-lone-surrogate"] = frame('{"a\\ud800":' + E + "}", D8)
    c["shape-neg"] = frame('{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', D8)
    c["shape-neg-zero"] = frame('{"a":{"dtype":"F32","shape":[2,-0],"data_offsets":[0,0]}}')
    c["shape-zero"] = frame('{"a":{"dtype":"F32","shape":[2,0],"data_offsets":[0,0]}}')
    c["shape-float"] = frame('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', D8)
    c["shape-exp"] = frame('{"a":{"dtype":"F32","shape":[1e0],"data_offsets":[0,4]}}', b"\0" * 4)
    c["shape-null"] = frame('{"a":{"dtype":"F32","shape":null,"data_offsets":[0,4]}}', b"\0" * 4)
    c["shape-object"] = frame('{"a":{"dtype":"F32","shape":{},"data_offsets":[0,4]}}', b"\0" * 4)
    c["shape-bool"] = frame('{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"\0" * 4)
    c["shape-string"] = frame('{"a":{"dtype":"F32","shape":["1"],"data_offsets":[0,4]}}', b"\0" * 4)
    c["shape-nested"] = frame('{"a":{"dtype":"F32","shape":[[2]],"data_offsets":[0,8]}}', D8)
    c["shape-scalar"] = frame({"a": entry("F32", [], 0, 4)}, b"\0" * 4)
    c["shape-8-dims"] = frame({"a": entry("U8", [1] * 8, 0, 1)}, b"\0")
    c["shape-u64-max"] = frame({"a": entry("U8", [2**64 - 1], 0, 4)}, b"\0" * 4)
    c["shape-2^64"] = frame(
        '{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,4]}}', b"\0" * 4)
    c["shape-product-overflow"] = frame({"a": entry("U8", [2**32, 2**32], 0, 4)}, b"\0" * 4)
    c["shape-overflow-then-zero"] = frame({"a": entry("U8", [2**32, 2**32, 0], 0, 0)})
    c["shape-zero-then-overflow"] = frame({"a": entry("U8", [0, 2**32, 2**32], 0, 0)})
    c["shape-bytes-overflow"] = frame({"a": entry("F32", [2**62], 0, 0)})
    c["shape-bits-overflow-u8"] = frame({"a": entry("U8", [2**61], 0, 0)})
    c["shape-span-mismatch"] = frame({"a": entry("F32", [3], 0, 8)}, D8)
    c["shape-span-mismatch-bf16"] = frame({"a": entry("BF16", [2], 0, 8)}, D8)
    c["offsets-reversed"] = frame({"a": entry("U8", [0], 4, 0)}, b"\0" * 4)
    c["offsets-u64-max"] = frame({"a": entry("U8", [2**64 - 1], 0, 2**64 - 1)}, b"\0" * 4)
    c["offsets-float"] = frame('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', D8)
    c["offsets-neg-zero"] = frame('{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', D8)
    c["offsets-three"] = frame('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}}', D8)
    c["offsets-one"] = frame('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}', D8)
    c["offsets-object"] = dt('"F32"', rest=',"shape":[2],"data_offsets":{"0":0,"1":8}}}')
    c["offsets-nested"] = frame('{"a":{"dtype":"F32","shape":[2],"data_offsets":[[0],8]}}', D8)
    c["gap-at-start"] = frame({"a": entry("F32", [2], 1, 9)}, b"\0" * 9)
    c["gap-between"] = frame({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 12, 16)},
                             b"\0" * 16)
    c["overlap"] = frame({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}, D8)
    c["same-range"] = frame({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 0, 8)}, D8)
    c["trailing-byte"] = frame({"a": entry("F32", [2], 0, 8)}, b"\0" * 9)
    c["data-truncated"] = frame({"a": entry("F32", [2], 0, 8)}, b"\0" * 7)
    c["no-data-section"] = frame({"a": entry("F32", [2], 0, 8)})
    D4 = b"\0" * 4
    c["zero-size-first"] = frame({"a": entry("F32", [0], 0, 0), "b": entry("F32", [1], 0, 4)}, D4)
    c["zero-size-after"] = frame({"a": entry("F32", [0], 4, 4), "b": entry("F32", [1], 0, 4)}, D4)
    c["zero-size-at-end"] = frame({"a": entry("F32", [2], 0, 8), "b": entry("F32", [0], 8, 8)}, D8)
    c["zero-size-past-end"] = frame({"a": entry("F32", [2], 0, 8), "b": entry("F32", [0], 9, 9)},
                                    D8)
    c["zero-size-only-nonzero-offset"] = frame({"a": entry("F32", [0], 3, 3)}, b"\0" * 3)
    c["f4-odd"] = frame({"a": entry("F4", [3], 0, 1)}, b"\0")
    c["f4-odd-2"] = frame({"a": entry("F4", [3], 0, 2)}, b"\0\0")
    c["f4-one"] = frame({"a": entry("F4", [1], 0, 0)})
    c["f4-3x2"] = frame({"a": entry("F4", [3, 2], 0, 3)}, b"\0" * 3)
    c["f6-8"] = frame({"a": entry("F6_E2M3", [8], 0, 6)}, b"\0" * 6)
    c["f6-4"] = frame({"a": entry("F6_E3M2", [4], 0, 3)}, b"\0" * 3)
    c["f6-2"] = frame({"a": entry("F6_E3M2", [2], 0, 1)}, b"\0")
    c["c64"] = frame({"a": entry("C64", [2], 0, 16)}, b"\0" * 16)
    c["c64-as-8"] = frame({"a": entry("C64", [2], 0, 8)}, D8)
    c["u64"] = frame({"a": entry("U64", [1], 0, 8)}, D8)
    c["meta-null"] = frame('{"__metadata__":null,' + A + "}", D8)
    c["meta-empty"] = frame('{"__metadata__":{},' + A + "}", D8)
    c["meta-int-value"] = frame('{"__metadata__":{"x":1},' + A + "}", D8)
    c["meta-null-value"] = frame('{"__metadata__":{"x":null},' + A + "}", D8)
    c["meta-list"] = frame('{"__metadata__":[],' + A + "}", D8)
    c["meta-string"] = frame('{"__metadata__":"x",' + A + "}", D8)
    c["meta-twice"] = frame('{"__metadata__":{"x":"1"},"__metadata__":{"y":"2"},' + A + "}", D8)
    c["meta-twice-null"] = frame('{"__metadata__":null,"__metadata__":null,' + A + "}", D8)
    c["meta-dup-key"] = frame('{"__metadata__":{"x":"1","x":"2"},' + A + "}", D8)
    c["meta-key-escaped"] = frame('{"__metadata\\u005f_":{"a":"b"},' + A + "}", D8)
    c["meta-escaped-and-plain"] = frame(
        '{"__metadata\\u005f_":{"a":"b"},"__metadata__":null,' + A + "}", D8)
    c["meta-as-tensor"] = frame({"__metadata__": entry("F32", [2], 0, 8)}, D8)
    c["meta-trailing-data"] = frame('{"__metadata__":{"a":"b"}}', b"x")
    c["dup-tensor-same"] = frame("{" + A + "," + A + "}", D8)
    c["dup-tensor-last-wins"] = frame(
        "{" + A + ',"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', b"\0" * 16)
    c["dup-tensor-last-wins-ok"] = frame(
        '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},' + A + "}", D8)
    c["dup-tensor-first-invalid"] = frame('{"a":5,' + A + "}", D8)
    c["dup-tensor-last-invalid"] = frame("{" + A + ',"a":5}', D8)
    c["name-empty"] = frame({"": entry("F32", [2], 0, 8)}, D8)
    c["name-escapes"] = frame('{"\\u00e9\\n\\t\\"\\\\\\/":' + E + "}", D8)
    return c


def mutations(base_files, rng):
    """Seeded random damage to valid files."""
    out = {}
    names = sorted(base_files)
    for i in range(40):  # a random header byte replaced (length kept)
        b = bytearray(base_files[rng.choice(names)])
        n = struct.unpack("<Q", bytes(b[:8]))[0]
        if n == 0 or 8 + n > len(b):
            continue
        pos = 8 + rng.randrange(n)
        b[pos] = rng.choice([rng.randrange(256), ord(rng.choice('{}[],:"\\ 0123456789e.-'))])
        out[f"flip-header-{i}"] = bytes(b)
    for i in range(12):  # a byte of the length field changed
        b = bytearray(base_files[rng.choice(names)])
        b[rng.randrange(8)] ^= 1 << rng.randrange(8)
        out[f"flip-length-{i}"] = bytes(b)
    for i in range(15):
        b = base_files[rng.choice(names)]
        out[f"truncate-{i}"] = b[:rng.randrange(len(b))]
    for i in range(8):
        b = base_files[rng.choice(names)]
        out[f"append-{i}"] = b + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    for i in range(20):  # a data byte changed: the decision must not change
        b = bytearray(base_files[rng.choice(names)])
        n = struct.unpack("<Q", bytes(b[:8]))[0]
        if len(b) > 8 + n:
            b[rng.randrange(8 + n, len(b))] ^= 0xFF
        out[f"flip-data-{i}"] = bytes(b)
    for i in range(20):  # a character of the header text deleted or inserted (length fixed up)
        b = base_files[rng.choice(names)]
        n = struct.unpack("<Q", b[:8])[0]
        h, data = bytearray(b[8:8 + n]), b[8 + n:]
        if not h:
            continue
        pos = rng.randrange(len(h))
        if rng.random() < 0.5:
            del h[pos]
        else:
            h.insert(pos, ord(rng.choice('{}[],:"\\ 0123456789e.-n')))
        out[f"edit-text-{i}"] = frame(bytes(h), data)
    for i in range(50):  # one field of one entry changed, the header re-serialised
        b = base_files[rng.choice(names)]
        n = struct.unpack("<Q", b[:8])[0]
        header, data = json.loads(b[8:8 + n]), b[8 + n:]
        keys = [k for k in header if k != "__metadata__"]
        if not keys:
            continue
        k = rng.choice(keys)
        e = header[k]
        if not isinstance(e, dict):
            continue
        what = rng.randrange(9)
        if what == 0:
            e["dtype"] = rng.choice(list(DTYPE_BITS) + ["Q4", "f32", "", "F8"])
        elif what == 1 and e["shape"]:
            j = rng.randrange(len(e["shape"]))
            e["shape"][j] = rng.choice([e["shape"][j] + 1, max(0, e["shape"][j] - 1), 0, -1,
                                        2**40, 2**63, float(e["shape"][j])])
        elif what == 2:
            e["shape"] = e["shape"] + [1] if rng.random() < 0.5 else e["shape"][:-1]
        elif what == 3:
            j = rng.randrange(2)
            e["data_offsets"][j] += rng.choice([-8, -2, -1, 1, 2, 8])
        elif what == 4:
            del e[rng.choice(["dtype", "shape", "data_offsets"])]
        elif what == 5:
            e[rng.choice(["x", "dtype2", "_"])] = rng.choice([1, "s", None, [1, [2]], {"a": 1.5}])
        elif what == 6 and len(keys) > 1:
            k2 = rng.choice(keys)
            if not isinstance(header[k2], dict):
                continue
            e2 = header[k2]
            e["data_offsets"], e2["data_offsets"] = e2["data_offsets"], e["data_offsets"]
        elif what == 7:
            header["__metadata__"] = rng.choice([None, {"a": 1}, {"a": "b"}, [], "x"])
        else:
            header[k] = [e["dtype"], e["shape"], e["data_offsets"]]
        h = json.dumps(header, separators=(",", ":"), ensure_ascii=rng.random() < 0.5).encode()
        if rng.random() < 0.5:
            h += b" " * ((8 - len(h) % 8) % 8)
        out[f"edit-field-{i}"] = frame(h, data)
    return out


def verdict(path, data):
    try:
        with safe_open(path, framework="np") as f:
            tensors = {k: [f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()]
                       for k in f.keys()}
        opened, error = True, ""
    except Exception as e:  # noqa: BLE001 (any failure to open is a rejection)
        opened, error, tensors = False, f"{type(e).__name__}: {e}", {}
    try:
        deserialize(data)
        deserialized = True
    except Exception:  # noqa: BLE001
        deserialized = False
    if opened != deserialized:
        sys.exit(f"{path}: safe_open says {opened}, deserialize says {deserialized}")
    return {"ok": opened, "error": error, "tensors": tensors}


def corpus(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    b = bases()
    files.update({f"valid-{k}": v for k, v in b.items()})
    files.update({f"case-{k}": v for k, v in edge_cases().items()})
    files.update({f"mut-{k}": v for k, v in mutations(b, random.Random(1234)).items()})
    verdicts = []
    for name in sorted(files):
        path = os.path.join(out_dir, name + ".safetensors")
        with open(path, "wb") as f:
            f.write(files[name])
        verdicts.append({"file": os.path.basename(path), **verdict(path, files[name])})
    with open(os.path.join(out_dir, "verdicts.json"), "w") as f:
        json.dump(verdicts, f, indent=1)
    ok = sum(v["ok"] for v in verdicts)
    print(f"{out_dir}: {len(verdicts)} files, {ok} valid (safetensors {safetensors.__version__})")


def read(path, out, order=None, max_shard_bytes=None):
    import torch
    from safetensors.torch import load_file

    result = {"tensors": {}, "metadata": None, "index": None, "hf_split": None}
    files = [path]
    if os.path.isdir(path):
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(os.path.join(path, "model.safetensors")):
            files = [os.path.join(path, "model.safetensors")]
        else:
            with open(index_path) as f:
                result["index"] = json.load(f)
            files = sorted({os.path.join(path, v)
                            for v in result["index"]["weight_map"].values()})
    for file in files:
        with safe_open(file, framework="pt") as f:
            result["metadata"] = f.metadata()
        for name, t in load_file(file).items():
            result["tensors"][name] = {
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "hex": t.reshape(-1).view(torch.uint8).numpy().tobytes().hex(),
                "file": os.path.basename(file),
            }
    if order:
        from huggingface_hub import split_torch_state_dict_into_shards

        with open(order) as f:
            names = f.read().splitlines()
        state = {}
        for n in names:  # same storage sizes as the written tensors, in the written order
            t = result["tensors"][n]
            state[n] = torch.empty(t["shape"], dtype=getattr(torch, t["dtype"]))
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes)
        result["hf_split"] = {"is_sharded": split.is_sharded,
                              "metadata": split.metadata,
                              "filename_to_tensors": split.filename_to_tensors}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus")
    c.add_argument("--out", required=True)
    r = sub.add_parser("read")
    r.add_argument("--path", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--order")
    r.add_argument("--max-shard-bytes", type=int)
    args = ap.parse_args()
    if args.cmd == "corpus":
        corpus(args.out)
    else:
        read(args.path, args.out, args.order, args.max_shard_bytes)


if __name__ == "__main__":
    main()

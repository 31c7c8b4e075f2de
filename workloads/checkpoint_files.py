"""The files of a Hugging Face checkpoint directory, checked without torch: config.json, the safetensors shards
(the index's, each present) and their headers (readable, every tensor inside its file, a floating dtype: the
config's when it names one).

Torch-free on purpose: the console runs these checks before launch (``workloads.specs``); the shapes against the
config and the loading are ``workloads.checkpoint``'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: Tensors a checkpoint may hold that are no parameter of btune's models (old buffers): never checked or loaded.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
#: safetensors dtype codes of weights -> torch dtype names
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
ST_CODES = {v: k for k, v in ST_DTYPES.items()}
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


class CheckpointError(ValueError):
    """A checkpoint btune cannot use; the message is one line starting with the directory."""


@dataclass(frozen=True)
class Entry:
    """One tensor as a safetensors header describes it: its file (a path), dtype code and shape."""

    file: str
    dtype: str
    shape: tuple[int, ...]


def read_header(file: str) -> dict[str, Entry]:
    """A safetensors file's tensors, checked against the file's size: a readable header, every tensor's bytes
    inside the file and as many as its shape and dtype take."""
    name = os.path.basename(file)
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{name}: {size} bytes, too short for a safetensors header (truncated?)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER:
            raise CheckpointError(f"{name}: header of {n} bytes in a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{name}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: unreadable safetensors header (not a JSON object)")
    data = size - 8 - n
    out: dict[str, Entry] = {}
    for key, t in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = t["dtype"], tuple(int(s) for s in t["shape"]), t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name}: tensor {key} has a malformed header entry") from None
        if end > data:
            raise CheckpointError(f"{name}: tensor {key} ends at byte {end} of {data} bytes of data "
                                  "(the file is truncated)")
        if dtype in ITEM_BYTES and end - begin != math.prod(shape) * ITEM_BYTES[dtype]:
            raise CheckpointError(f"{name}: tensor {key} holds {end - begin} bytes, its {dtype} shape "
                                  f"{list(shape)} needs {math.prod(shape) * ITEM_BYTES[dtype]}")
        out[key] = Entry(file, dtype, shape)
    return out


def shard_files(path: str) -> list[str]:
    """The safetensors files of checkpoint ``path`` (names in it): the index's shards, each present, else
    model.safetensors."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: unreadable {INDEX} ({exc})") from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"{path}: {len(missing)} of {len(shards)} shards named in {INDEX} are missing "
                                  f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        return shards
    if os.path.isfile(os.path.join(path, SINGLE)):
        return [SINGLE]
    other = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    why = f" (found {other[0]}: only safetensors is read)" if other else ""
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}{why}")


def read_config(path: str, known: Iterable[str]) -> dict:
    """config.json of checkpoint directory ``path``, parsed, with a ``model_type`` among ``known``."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: config.json is not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: config.json is not a JSON object")
    known = tuple(known)
    if d.get("model_type") not in known:
        raise CheckpointError(f"{path}: model_type {d.get('model_type')!r} is not supported; known: "
                              f"{', '.join(known)}")
    return d


def config_sha256(d: dict) -> str:
    """sha256 of a config as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def declared_dtype(d: dict) -> str | None:
    """The weights' dtype config.json names (``dtype``, or ``torch_dtype`` in older files), if a float one."""
    name = d.get("dtype", d.get("torch_dtype"))
    return name if name in ST_CODES else None


def check_files(path: str, known: Iterable[str]) -> tuple[dict, list[str], dict[str, Entry]]:
    """Config, shard names and tensors of checkpoint ``path`` after every check that needs no model: config.json
    present, parseable, of a ``known`` model_type; the shards present; each header readable and inside its file;
    each weight of a floating dtype, the config's when it names one. CheckpointError (one line, starting with
    ``path``) otherwise."""
    path = os.fspath(path)
    d = read_config(path, known)
    files = shard_files(path)
    tensors: dict[str, Entry] = {}
    try:
        for f in files:
            tensors.update(read_header(os.path.join(path, f)))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {exc.filename}: {exc.strerror}") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    declared = declared_dtype(d)
    for name, e in tensors.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if e.dtype not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} is {e.dtype}, not a floating-point weight")
        if declared is not None and ST_DTYPES[e.dtype] != declared:
            raise CheckpointError(f"{path}: tensor {name} is {ST_DTYPES[e.dtype]} but config.json says {declared}")
    return d, files, tensors

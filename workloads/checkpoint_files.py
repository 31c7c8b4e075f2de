"""The files of a Hugging Face checkpoint directory, checked without torch: config.json, the safetensors shards
(the index's, each present), their headers (readable, every tensor inside its file, a floating dtype: the
config's when it names one) and the tensors against the config (every weight the config implies there, with the
shape it implies, none left over).

Torch-free on purpose: the console runs these checks before launch (``workloads.specs``). ``workloads.checkpoint``
checks the tensors again against the btune model built on the meta device, then loads them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
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


def dense_dims(d: dict) -> dict[str, int | None]:
    """A dense config.json's shape in btune's terms (layers, heads, kv_heads, d_ff, vocab, context; None where
    absent or not an integer), read the way ``workloads.checkpoint`` reads it, for checks before launch."""
    gpt2 = d.get("model_type") == "gpt2"
    keys = {"layers": "n_layer" if gpt2 else "num_hidden_layers", "heads": "n_head" if gpt2 else "num_attention_heads",
            "kv_heads": "n_head" if gpt2 else "num_key_value_heads", "d_ff": "n_inner" if gpt2 else "intermediate_size",
            "vocab": "vocab_size", "context": "n_positions" if gpt2 else "max_position_embeddings"}

    def num(key: str) -> int | None:
        v = d.get(key)
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    out = {name: num(key) for name, key in keys.items()}
    if out["kv_heads"] is None:
        out["kv_heads"] = out["heads"]
    if gpt2 and out["d_ff"] is None and num("n_embd") is not None:
        out["d_ff"] = 4 * num("n_embd")  # type: ignore[operator]
    if out["context"] is None:
        out["context"] = 1024 if gpt2 else 2048  # workloads.checkpoint's defaults
    return out


def layers_refusal(layers: int | None, have: int | None) -> str | None:
    """Why ``--layers`` cannot apply to a dense checkpoint of ``have`` layers (it runs whole; 0 or None: its own),
    or None."""
    if layers and have is not None and layers != have:
        return f"--layers {layers}: the checkpoint has {have} layers and runs whole (leave --layers at 0)"
    return None


def config_sha256(d: dict) -> str:
    """sha256 of a config as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def declared_dtype(d: dict) -> str | None:
    """The weights' dtype config.json names (``dtype``, or ``torch_dtype`` in older files), if a float one."""
    name = d.get("dtype", d.get("torch_dtype"))
    return name if name in ST_CODES else None


def _llama_shapes(d: dict, experts: bool = False) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a Llama, Mistral or Qwen2 (q/k/v biases) config; Mixtral's experts with ``experts``."""
    hidden, heads, vocab = int(d["hidden_size"]), int(d["num_attention_heads"]), int(d["vocab_size"])
    kv, ff, hd = int(d.get("num_key_value_heads") or heads), int(d["intermediate_size"]), hidden // heads
    if d.get("head_dim") not in (None, hd):
        raise ValueError("a head_dim apart from hidden_size / num_attention_heads")  # the config's check names it
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not d.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (vocab, hidden)
    for i in range(int(d["num_hidden_layers"])):
        hf = f"model.layers.{i}."
        out[hf + "input_layernorm.weight"] = out[hf + "post_attention_layernorm.weight"] = (hidden,)
        for proj, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
            out[f"{hf}self_attn.{proj}_proj.weight"] = (rows, hidden)
            if d["model_type"] == "qwen2":
                out[f"{hf}self_attn.{proj}_proj.bias"] = (rows,)
        out[hf + "self_attn.o_proj.weight"] = (hidden, heads * hd)
        if not experts:
            out[hf + "mlp.gate_proj.weight"] = out[hf + "mlp.up_proj.weight"] = (ff, hidden)
            out[hf + "mlp.down_proj.weight"] = (hidden, ff)
            continue
        moe = hf + "block_sparse_moe."
        out[moe + "gate.weight"] = (int(d["num_local_experts"]), hidden)
        for e in range(int(d["num_local_experts"])):
            out[f"{moe}experts.{e}.w1.weight"] = out[f"{moe}experts.{e}.w3.weight"] = (ff, hidden)
            out[f"{moe}experts.{e}.w2.weight"] = (hidden, ff)
    return out


def _gpt2_shapes(d: dict) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a GPT-2 config (Conv1D weights stored as [in, out])."""
    dim, vocab = int(d["n_embd"]), int(d["vocab_size"])
    inner = int(d.get("n_inner") or 4 * dim)
    out: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (vocab, dim),
                                       "transformer.wpe.weight": (int(d.get("n_positions") or 1024), dim),
                                       "transformer.ln_f.weight": (dim,), "transformer.ln_f.bias": (dim,)}
    if not d.get("tie_word_embeddings", True):
        out["lm_head.weight"] = (vocab, dim)
    for i in range(int(d["n_layer"])):
        hf = f"transformer.h.{i}."
        for norm in ("ln_1", "ln_2"):
            out[f"{hf}{norm}.weight"] = out[f"{hf}{norm}.bias"] = (dim,)
        for name, fan_in, fan_out in (("attn.c_attn", dim, 3 * dim), ("attn.c_proj", dim, dim),
                                      ("mlp.c_fc", dim, inner), ("mlp.c_proj", inner, dim)):
            out[f"{hf}{name}.weight"], out[f"{hf}{name}.bias"] = (fan_in, fan_out), (fan_out,)
    return out


#: model_type -> (its {tensor name: shape} from config.json, the prefix a bare base-model checkpoint leaves out)
SHAPES = {"llama": (_llama_shapes, ""), "mistral": (_llama_shapes, ""), "qwen2": (_llama_shapes, ""),
          "mixtral": (lambda d: _llama_shapes(d, experts=True), ""), "gpt2": (_gpt2_shapes, "transformer.")}


def expected_shapes(d: dict) -> tuple[dict[str, tuple[int, ...]], str] | None:
    """The tensors config.json ``d`` implies ({name: shape}) and its family's base prefix; None when the config
    lacks what that takes (``workloads.checkpoint`` names the missing key)."""
    if d.get("model_type") not in SHAPES:
        return None
    shapes, prefix = SHAPES[d["model_type"]]
    try:
        return shapes(d), prefix
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def resolve_names(names: Iterable[str], tensors: Mapping[str, Entry], prefix: str, tied: bool,
                  model_type: str) -> dict[str, str]:
    """{expected name: its name in the files} (a bare base model's without ``prefix``); CheckpointError for a
    missing tensor or one left over (old buffers and a tied head's copy aside)."""
    names = list(names)
    found: dict[str, str] = {}
    for name in names:
        if name in tensors:
            found[name] = name
        elif prefix and name.startswith(prefix) and name[len(prefix):] in tensors:
            found[name] = name[len(prefix):]
    missing = [n for n in names if n not in found]
    if missing:
        raise CheckpointError(f"{len(missing)} tensors of the config are not in the checkpoint, first {missing[0]}")
    used = set(found.values())
    extra = [n for n in tensors if n not in used and not n.endswith(IGNORED_SUFFIXES)
             and not (tied and n == "lm_head.weight")]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"tensor {extra[0]}{more} is not a weight of this {model_type} config")
    return found


def check_tensors(d: dict, tensors: dict[str, Entry]) -> None:
    """Every tensor config.json ``d`` implies in ``tensors`` (a bare base model's without the prefix), with the
    shape it implies, and none left over; CheckpointError otherwise."""
    expected = expected_shapes(d)
    if expected is None:
        return
    want, prefix = expected
    fused = next((name for name in tensors if name.endswith(".mlp.experts.gate_up_proj")), None)
    if fused is not None:
        raise CheckpointError(f"{fused} is transformers' fused in-memory expert layout "
                              "(save_pretrained(save_original_format=False)); btune reads the per-expert w1/w2/w3 "
                              "layout save_pretrained writes by default")
    found = resolve_names(want, tensors, prefix, bool(d.get("tie_word_embeddings", d["model_type"] == "gpt2")),
                          d["model_type"])
    for name, shape in want.items():
        got = tensors[found[name]].shape
        if got != shape:
            raise CheckpointError(f"tensor {found[name]} has shape {list(got)}, the config needs {list(shape)}")


def check_files(path: str, known: Iterable[str]) -> tuple[dict, list[str], dict[str, Entry]]:
    """Config, shard names and tensors of checkpoint ``path`` after every check that needs no model: config.json
    present, parseable, of a ``known`` model_type; the shards present; each header readable and inside its file;
    each weight of a floating dtype, the config's when it names one; the tensors against the config
    (``check_tensors``). CheckpointError (one line, starting with ``path``) otherwise."""
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
    try:
        check_tensors(d, tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return d, files, tensors

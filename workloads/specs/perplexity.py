"""The perplexity workload's declaration and its before-launch checks (torch-free).

The model is a Hugging Face checkpoint (``--checkpoint DIR``) or, only when asked in so many words, random weights
of a preset's shape (``--random-weights --preset NAME``); the preset ``checkpoint`` means the checkpoint's shape.
The data is read and checked here with the code the workload loads it with (``workloads.tokens``), so a bad file
is refused before anything is launched.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workloads.options import Machine, Option, WorkloadSpec
from workloads.specs.dense import (
    PRESET_RUN_DEFAULTS,
    ROPE_THETA,
    TRANSFORMER_KNOBS,
    model_fit_checks,
    transformer_checks,
)
from workloads.tokens import BIN_DTYPES, FORMATS, DataError, check_ids, read_ids, resolve_format, text_nonempty
from workloads.tokens import tokenizer_vocab as _tokenizer_vocab

FROM_CHECKPOINT = "checkpoint"  #: the preset that means "the checkpoint's shape"
MAX_AUTO_SEQ = 1024  #: --seq-len left unset: the model's context, at most this
MOE_TYPES = ("mixtral",)  #: checkpoints of btune's MoE model: not scored here yet
KNOBS = ("dtype", "fp8-mode", "fp8-recipe", "fp8-head", "attention-backend", "attention-window", "compile-mode")


@functools.lru_cache(maxsize=16)
def _config(path: str, _stamp: tuple[int, int]) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise DataError(f"--checkpoint {Path(path).parent}: cannot read config.json ({reason})") from None
    if not isinstance(doc, dict):
        raise DataError(f"--checkpoint {Path(path).parent}: config.json is not a JSON object")
    return doc


def _stamp(path: Path) -> tuple[int, int]:
    """What tells a file's versions apart for the caches: its size and modification time."""
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def checkpoint_config(directory: str) -> dict[str, Any]:
    """The checkpoint's config.json; DataError (one line) when the directory has none."""
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise DataError(f"--checkpoint {directory}: not a directory")
    if not path.is_file():
        raise DataError(f"--checkpoint {directory}: no config.json (a Hugging Face checkpoint directory has one)")
    return _config(str(path), _stamp(path))


def model_shape(opts: Mapping[str, Any]) -> tuple[int, int | None]:
    """The model's vocabulary and context (None: random weights, whose positions grow with --seq-len)."""
    from workloads.models.config import PRESETS

    if opts.get("checkpoint"):
        cfg = checkpoint_config(str(opts["checkpoint"]))
        if cfg.get("model_type") in MOE_TYPES:
            raise DataError(f"--checkpoint {opts['checkpoint']}: a {cfg['model_type']} checkpoint is a MoE model; "
                            "perplexity scores dense checkpoints (llama, mistral, qwen2, gpt2) for now")
        vocab = cfg.get("vocab_size")
        context = cfg.get("max_position_embeddings") or cfg.get("n_positions")
        if not isinstance(vocab, int) or vocab < 1:
            raise DataError(f"--checkpoint {opts['checkpoint']}: config.json has no vocab_size")
        return vocab, context if isinstance(context, int) and context > 0 else None
    return PRESETS[str(opts.get("preset"))].vocab_size, None


def seq_len(opts: Mapping[str, Any]) -> int:
    """--seq-len, or the model's context up to MAX_AUTO_SEQ (a preset's own context for random weights)."""
    from workloads.models.config import PRESETS

    if opts.get("seq_len"):
        return int(opts["seq_len"])
    if opts.get("checkpoint"):
        context = model_shape(opts)[1]
        return min(context or MAX_AUTO_SEQ, MAX_AUTO_SEQ)
    return min(PRESETS[str(opts.get("preset"))].max_seq_len, MAX_AUTO_SEQ)


def tokenizer_path(opts: Mapping[str, Any]) -> str | None:
    """--tokenizer, else the checkpoint's tokenizer.json when it has one."""
    if opts.get("tokenizer"):
        return str(opts["tokenizer"])
    if opts.get("checkpoint"):
        found = Path(str(opts["checkpoint"])) / "tokenizer.json"
        return str(found) if found.is_file() else None
    return None


def data_format(opts: Mapping[str, Any]) -> str:
    """The data's format: --data-format, or what ``auto`` finds (workloads.tokens.resolve_format)."""
    return resolve_format(str(opts["data"]), str(opts.get("data_format") or "auto"), bool(opts.get("tokenizer")))


def _stamp_of(path: str | None) -> tuple[int, int] | None:
    try:
        return _stamp(Path(path)) if path else None
    except OSError:
        return None


def data_checks(opts: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The data against the model: readable, not empty, ids inside the vocabulary (a text file: its tokenizer's
    ids). Each version of a file is read once (the form asks on every change); text is not tokenized here."""
    if not opts.get("data"):
        return [("data", "--data FILE is required: a token file (.npy, .bin, integers as text) or a text file "
                         "with a tokenizer")]
    try:
        vocab = model_shape(opts)[0]
    except DataError as exc:
        return [("checkpoint", str(exc))]
    path, tok = str(opts["data"]), tokenizer_path(opts)
    return list(_data_problems(path, str(opts.get("data_format") or "auto"), str(opts.get("data_dtype") or "uint16"),
                               tok, bool(opts.get("tokenizer")), vocab, _stamp_of(path), _stamp_of(tok)))


@functools.lru_cache(maxsize=64)
def _data_problems(path: str, fmt: str, dtype: str, tok: str | None, tok_given: bool, vocab: int,
                   _stamp: tuple[int, int] | None, _tok_stamp: tuple[int, int] | None) -> tuple[tuple[str, str], ...]:
    try:
        fmt = resolve_format(path, fmt, tok_given)
        if fmt == "text":
            text_nonempty(path)
            if tok is None:
                return (("tokenizer", f"--data {path} is text: it needs --tokenizer FILE (a tokenizer.json), or a "
                                      "checkpoint with a tokenizer.json"),)
            n_ids = _tokenizer_vocab(tok)
            if n_ids > vocab:
                return (("tokenizer", f"--tokenizer {tok}: its ids go up to {n_ids - 1}, past the model's "
                                      f"vocabulary of {vocab} ids"),)
        else:
            ids = read_ids(path, fmt, dtype)
            check_ids(ids, vocab, path)
            if len(ids) < 2:
                return (("data", f"--data {path}: {len(ids)} token; scoring needs at least 2"),)
            if tok_given and tok is not None:
                _tokenizer_vocab(tok)
    except DataError as exc:
        return (("tokenizer" if str(exc).startswith("--tokenizer") else "data", str(exc)),)
    except OSError as exc:  # a file that went away between two looks
        return (("data", f"--data {path}: cannot read it ({exc.strerror or exc})"),)
    return ()


def model_checks(opts: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The model: a checkpoint, or random weights only when asked, with a preset; never both."""
    checkpoint, random, preset = opts.get("checkpoint"), opts.get("random_weights"), opts.get("preset")
    if checkpoint and random:
        return [("random-weights", "--checkpoint and --random-weights contradict each other; give one")]
    if not checkpoint and not random:
        return [("checkpoint", "give --checkpoint DIR (a Hugging Face checkpoint) or --random-weights --preset NAME "
                               "(random weights, said so in the record)")]
    if random and preset == FROM_CHECKPOINT:
        return [("preset", f"--random-weights needs --preset NAME for the shape: one of "
                           f"{', '.join(PRESET_RUN_DEFAULTS)}")]
    if checkpoint and preset != FROM_CHECKPOINT:
        return [("preset", f"--preset {preset} contradicts --checkpoint: the checkpoint gives the shape; leave "
                           "--preset out")]
    return []


def shape_checks(opts: Mapping[str, Any]) -> list[tuple[str, str]]:
    """--stride within the window; --seq-len within a checkpoint's context."""
    try:
        seq = seq_len(opts)
        context = model_shape(opts)[1]
    except DataError as exc:
        return [("checkpoint", str(exc))]
    out: list[tuple[str, str]] = []
    stride = opts.get("stride")
    if stride is not None and stride > seq:
        out.append(("stride", f"--stride {stride} is larger than the window (--seq-len {seq}): the tokens between "
                              "two windows would never be scored"))
    if context is not None and seq > context:
        out.append(("seq-len", f"--seq-len {seq} exceeds the checkpoint's context of {context} positions"))
    return out


def perplexity_checks(opts: Mapping[str, Any], machine: Machine) -> list[tuple[str, str]]:
    """What cannot run as asked: the model, the window, the data, then the transformer knobs on this machine."""
    out = model_checks(opts)
    if not out:
        out = shape_checks(opts)
    if not out:
        out = data_checks(opts)
    if not out and opts.get("rope_theta"):  # --rope-theta against the model (no RoPE in a GPT-2-style one)
        out = model_fit_checks({"preset": opts.get("preset"), "checkpoint": opts.get("checkpoint"),
                                "rope_theta": opts.get("rope_theta")})
    return out + transformer_checks({**opts, "mode": "prefill", "tp": 1}, machine)


def preset_values(opts: Mapping[str, Any]) -> dict[str, Any]:
    """What --seq-len and --stride left unset resolve to (with a checkpoint, from its config.json)."""
    if opts.get("preset") == FROM_CHECKPOINT and not opts.get("checkpoint"):
        return {}
    try:
        seq = seq_len(opts)
    except (DataError, OSError):
        return {}
    return {"seq_len": seq, "stride": opts.get("stride") or seq}


PERPLEXITY = WorkloadSpec(
    name="perplexity",
    module="workloads.perplexity",
    description="Perplexity in sliding windows, no token scored twice: a checkpoint (or random weights) on a token "
                "or text file; mean NLL, perplexity, bits per byte under the dense knobs",
    presets=(FROM_CHECKPOINT, *PRESET_RUN_DEFAULTS),
    default_preset=FROM_CHECKPOINT,
    cpu_preset=FROM_CHECKPOINT,
    options=(
        Option("checkpoint", str, "", "a Hugging Face checkpoint directory (config.json and safetensors): the "
               "model scored", group="model"),
        Option("random-weights", bool, False, "score random weights of --preset's shape instead (the record says "
               "random weights; their perplexity measures no trained model)", group="model"),
        Option("data", str, "", "the tokens to score: a token file (.npy, .bin, integers as text) or a text file "
               "with a tokenizer", group="data"),
        Option("data-format", str, "auto", "how to read --data (auto: .npy, .bin by suffix; text when --tokenizer "
               "is given; else integers or text by content)", FORMATS, group="data"),
        Option("data-dtype", str, "uint16", "the ids' type in a raw .bin file", BIN_DTYPES, group="data"),
        Option("tokenizer", str, "", "a tokenizer.json, for text and for bits per byte (empty: the checkpoint's "
               "tokenizer.json when it has one)", group="data"),
        Option("seq-len", int, None, "tokens per window (unset: the model's context, at most 1024)", min=2,
               max=1 << 20, group="shape"),
        Option("stride", int, None, "tokens from one window's start to the next; the overlap is context only "
               "(unset: --seq-len, no overlap)", min=1, max=1 << 20, group="shape"),
        Option("max-tokens", int, 0, "score the first N tokens of the data only (0: all)", min=0, group="shape"),
        Option("batch-size", int, 1, "windows per forward pass (one step)", min=1, max=65536, group="shape"),
        *(o for o in TRANSFORMER_KNOBS if o.name in KNOBS),
        ROPE_THETA,
        Option("dry-run", bool, False, "print the plan as JSON (model, data, windows, FLOPs, memory) and exit"),
    ),
    checks=perplexity_checks,
    preset_values=preset_values,
)

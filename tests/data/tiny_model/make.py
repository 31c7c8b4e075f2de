"""Make the tiny trained model that tests/test_quality_gate.py gates with, using btune itself (issue 19, item 5).

    python tests/data/tiny_model/make.py [--steps 600] [--work DIR]

1. text: the running interpreter's standard library sources (``Lib/*.py``, sorted by name); every
   ``HELDOUT_EVERY``-th module is held out (no held-out module is trained on); the training text is the other modules
   up to ``TRAIN_BYTES``, the held-out sample (``heldout.txt``) their first ``HELDOUT_BYTES``, cut at a line end;
2. a byte-level BPE tokenizer (``tokenizers``, vocabulary ``VOCAB``) trained on the training text: tokenizer.json;
3. the training tokens as a uint16 .npy;
4. the initial checkpoint: a randomly initialised btune Llama of ``CONFIG``'s shape (torch seed 0) written by
   ``workloads.checkpoint.save``;
5. ``btune run dense --mode train --checkpoint INIT --data train.npy --save-checkpoint OUT --device cpu --dtype fp32``
   (the CLI, as a user runs it);
6. the trained weights stored in bf16 (``workloads.checkpoint``: load, then save), with tokenizer.json and
   heldout.txt, beside this script; then ``btune run perplexity`` of the trained and of the initial (random) model
   on heldout.txt, and README.md with what was made, its size and those perplexities.

Reproducible for a given Python (its sources are the text), torch and tokenizers: fixed file order, seeds and step
count; float sums on another CPU or thread count can move the last digits of the trained weights.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

VOCAB = 2048
HELDOUT_EVERY = 8  #: modules 4, 12, 20, ... of the sorted list are held out
TRAIN_BYTES = 3_500_000
HELDOUT_BYTES = 50_000
#: the model: 4 layers, d_model 128, 4 heads, 2 KV heads, d_ff 384 (a multiple of 16: FP8 GEMMs run on a GPU),
#: tied embeddings, context 256 (ModelConfig's fields, in order)
CONFIG: dict[str, Any] = {"name": "tiny-python", "arch": "llama", "n_layers": 4, "d_model": 128, "n_heads": 4,
                          "n_kv_heads": 2, "d_ff": 384, "vocab_size": VOCAB, "max_seq_len": 256, "rope_theta": 10000.0,
                          "norm_eps": 1e-5, "tie_embeddings": True}
KEPT = ("config.json", "model.safetensors", "tokenizer.json", "heldout.txt", "README.md")


def sources() -> tuple[list[Path], list[Path]]:
    """The standard library's top-level modules, sorted by name: (training modules, held-out modules)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"), key=lambda p: p.name)
    held = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY // 2]
    return [f for f in files if f not in held], held


def text_of(files: list[Path], limit: int) -> tuple[str, list[str]]:
    """The files' text (UTF-8, one after the other, a blank line between) up to ``limit`` bytes, cut at a line end,
    and the names of the modules it holds (files that are not UTF-8 are left out)."""
    parts: list[str] = []
    names: list[str] = []
    size = 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text.rstrip("\n") + "\n\n")
        names.append(f.name)
        size += len(parts[-1].encode("utf-8"))
        if size >= limit:
            break
    data = "".join(parts).encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    return data[: data.rfind("\n") + 1], names


def train_tokenizer(text: str, path: Path) -> None:
    """A byte-level BPE of ``VOCAB`` ids trained on ``text``, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(path))


def btune(*args: str) -> dict[str, Any]:
    """``btune ARGS`` (the installed command, else ``python -m tuner``) with its output shown; the run's record."""
    from tuner.runs import load_record

    cmd = [shutil.which("btune") or sys.executable, *([] if shutil.which("btune") else ["-m", "tuner"]), *args]
    print("$", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    print(res.stdout[-2000:], res.stderr[-2000:], sep="\n", flush=True)
    if res.returncode:
        sys.exit(f"make.py: btune exited {res.returncode}")
    return load_record(Path(res.stdout.strip().splitlines()[-1]))


def perplexity(checkpoint: Path, tokenizer: Path, runs: Path) -> dict[str, Any]:
    """The quality block of ``btune run perplexity`` of ``checkpoint`` on heldout.txt (fp32, windows of 256)."""
    rec = btune("run", "perplexity", "--checkpoint", str(checkpoint), "--data", str(HERE / "heldout.txt"),
                "--tokenizer", str(tokenizer), "--device", "cpu", "--dtype", "fp32", "--batch-size", "8",
                "--no-telemetry", "--out", str(runs))
    return rec["summary"]["quality"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences of 256 tokens per step (default 16)")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    ap.add_argument("--work", type=Path, help="keep the intermediate files here (default: a temporary directory)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from tokenizers import Tokenizer

    from workloads import checkpoint as ck
    from workloads.models.config import ModelConfig
    from workloads.models.transformer import Transformer

    work = args.work or Path(tempfile.mkdtemp(prefix="tiny_model."))
    work.mkdir(parents=True, exist_ok=True)
    for name in ("init", "trained", "runs"):
        shutil.rmtree(work / name, ignore_errors=True)
    t0 = time.time()
    train_files, held_files = sources()
    train_text, train_names = text_of(train_files, TRAIN_BYTES)
    held_text, held_names = text_of(held_files, HELDOUT_BYTES)
    (HERE / "heldout.txt").write_text(held_text, encoding="utf-8")
    tok_path = HERE / "tokenizer.json"
    train_tokenizer(train_text, tok_path)
    ids = np.asarray(Tokenizer.from_file(str(tok_path)).encode(train_text).ids, dtype=np.uint16)
    np.save(work / "train.npy", ids)
    print(f"text: {len(train_names)} modules, {len(train_text.encode()):,} bytes, {len(ids):,} tokens for training; "
          f"{len(held_names)} held-out modules, {len(held_text.encode()):,} bytes in heldout.txt", flush=True)

    cfg = ModelConfig(**CONFIG, description="btune's tiny Python-source Llama").validate()
    torch.manual_seed(0)
    ck.save(Transformer(cfg).eval(), cfg, str(work / "init"))

    train = btune("run", "dense", "--mode", "train", "--checkpoint", str(work / "init"), "--data",
                  str(work / "train.npy"), "--save-checkpoint", str(work / "trained"), "--device", "cpu", "--dtype",
                  "fp32", "--steps", str(args.steps), "--warmup", "0", "--batch-size", str(args.batch_size),
                  "--seq-len", str(cfg.max_seq_len), "--lr", str(args.lr), "--seed", "0", "--no-telemetry",
                  "--out", str(work / "runs"))
    losses = train["series"]["step"]["0"]["loss"]
    train_s = train["summary"].get("duration_s")

    model, trained_cfg, _ = ck.load(str(work / "trained"), "cpu", torch.bfloat16)
    for name in ("config.json", "model.safetensors"):
        (HERE / name).unlink(missing_ok=True)
    ck.save(model, trained_cfg, str(HERE))

    trained = perplexity(HERE, tok_path, work / "runs")
    random = perplexity(work / "init", tok_path, work / "runs")
    sizes = {name: (HERE / name).stat().st_size for name in (*KEPT[:-1], "make.py")}
    write_readme(args, cfg, train_names, held_names, len(ids), losses, train_s, trained, random, sizes,
                 time.time() - t0)
    total = sum((HERE / n).stat().st_size for n in (*KEPT, "make.py"))
    print(f"done: {HERE} holds {total:,} bytes; perplexity on heldout.txt {trained['perplexity']:.2f} trained, "
          f"{random['perplexity']:.1f} random; work files in {work}")
    return 0


def write_readme(args: argparse.Namespace, cfg: Any, train_names: list[str], held_names: list[str], n_tokens: int,
                 losses: list[float], train_s: float | None, trained: dict[str, Any], random: dict[str, Any],
                 sizes: dict[str, int], total_s: float) -> None:
    """README.md: how the model was made, its size and its measured perplexities."""
    import tokenizers
    import torch

    from workloads.models.flops import param_counts

    params = param_counts(cfg)["total"]
    tokens_seen = args.steps * args.batch_size * (cfg.max_seq_len + 1)
    sizes_md = "\n".join(f"| {name} | {size:,} |" for name, size in sizes.items())
    readme_bytes = 0
    cmd_train = (f"btune run dense --mode train --checkpoint INIT --data train.npy --save-checkpoint TRAINED "
                 f"--device cpu --dtype fp32 --steps {args.steps} --warmup 0 --batch-size {args.batch_size} "
                 f"--seq-len {cfg.max_seq_len} --lr {args.lr:g} --seed 0")
    first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    shape = (f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, {cfg.n_kv_heads} KV heads, "
             f"d_ff {cfg.d_ff}, tied embeddings, context {cfg.max_seq_len}, RoPE base {cfg.rope_theta:g}, "
             f"vocabulary {cfg.vocab_size}")
    held = ", ".join(held_names)
    took = f", {train_s / 60:.1f} minutes" if train_s else ""
    text = f"""# A tiny Llama trained by btune on Python's own sources

The model `tests/test_quality_gate.py` gates with: a {params:,}-parameter Llama
({shape}) trained on CPU by `btune run dense`,
stored as a Hugging Face checkpoint in bf16 (loadable by transformers' `LlamaForCausalLM.from_pretrained`), with its
byte-level BPE tokenizer (tokenizer.json) and a held-out text sample (heldout.txt). Made by [make.py](make.py):
`python tests/data/tiny_model/make.py` rewrites every file here.

## How it was made

- Text: the standard library sources (`Lib/*.py`) of Python {platform.python_version()}, sorted by name;
  every {HELDOUT_EVERY}th module from the {HELDOUT_EVERY // 2}th is held out. Training text: the first
  {TRAIN_BYTES:,} bytes of the {len(train_names)} other modules ({train_names[0]} to {train_names[-1]}). heldout.txt:
  the first {HELDOUT_BYTES:,} bytes of the held-out modules ({held}), none of them trained on.
- Tokenizer: `tokenizers` {tokenizers.__version__} BPE, byte-level, vocabulary {VOCAB}, trained on the training
  text only; the training text is {n_tokens:,} tokens (a uint16 .npy).
- Initial weights: btune's `Transformer` of this shape, randomly initialised (torch seed 0), written by
  `workloads.checkpoint.save`.
- Training (torch {torch.__version__}, {os.cpu_count()} CPU cores, {platform.machine()}):

      {cmd_train}

  AdamW at a constant learning rate, batches of {cfg.max_seq_len + 1} contiguous tokens at offsets drawn by the
  seed: {args.steps} steps, {tokens_seen:,} tokens read (about {tokens_seen / n_tokens:.1f} passes over the text{took});
  mean loss of the first 10 steps {first:.3f}, of the last 10 {last:.3f}. make.py took {total_s / 60:.1f} minutes
  in all.
- Stored: the trained fp32 weights converted to bf16 (`workloads.checkpoint.load` in bf16, then `save`).

## Size

| file | bytes |
|---|---:|
{sizes_md}
| README.md | {{readme}} |
| total | {{total}} |

## Perplexity on heldout.txt

`btune run perplexity --checkpoint DIR --data heldout.txt --tokenizer tokenizer.json --device cpu --dtype fp32`
(windows of {trained["windows"]["seq_len"]} tokens, no overlap; {trained["tokens_scored"]:,} tokens scored):

| model | mean NLL (nats) | perplexity | bits per byte |
|---|---:|---:|---:|
| this model (trained) | {trained["mean_nll"]:.4f} | {trained["perplexity"]:.2f} | {trained["bits_per_byte"]:.3f} |
| the initial random weights of the same shape | {random["mean_nll"]:.4f} | {random["perplexity"]:.1f} | \
{random["bits_per_byte"]:.3f} |

A model that knows nothing scores about its vocabulary ({VOCAB}; uniform: ln {VOCAB} = {math.log(VOCAB):.4f} nats).
"""
    while True:  # the README's own size in its table: a fixed point within a few rounds
        total = sum(sizes.values()) + readme_bytes
        out = text.replace("{readme}", f"{readme_bytes:,}").replace("{total}", f"{total:,}")
        if len(out.encode("utf-8")) == readme_bytes:
            break
        readme_bytes = len(out.encode("utf-8"))
    (HERE / "README.md").write_text(out, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())

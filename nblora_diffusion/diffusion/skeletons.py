"""The config folders shipped for single-file checkpoints (configs/: SD1.5, SD2.1-base, SD2.1-v, SDXL base
1.0, no weights) and CLIP's tokenizer files, generated offline from open_clip_torch's BPE merges into a
cache folder at first use (``default_cache_dir()``)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

from ..fileio import atomic_dir

CONFIGS = Path(__file__).with_name("configs")
SKELETONS = {"sd15": "sd1", "sd21-base": "sd2", "sd21-v": "sd2", "sdxl-base": "sdxl"}
_CLIP_MERGES = 49152 - 256 - 2  # CLIP's BPE: 48894 merges, as its SimpleTokenizer reads them


def default_cache_dir() -> Path:
    """$NBLORA_DIFFUSION_CACHE, else $XDG_CACHE_HOME/nblora_diffusion (~/.cache/nblora_diffusion)."""
    if os.environ.get("NBLORA_DIFFUSION_CACHE"):
        return Path(os.environ["NBLORA_DIFFUSION_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "nblora_diffusion"


def _bpe_merges_file() -> Path:
    spec = importlib.util.find_spec("open_clip")  # located, not imported (importing open_clip is slow)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("open_clip_torch is not installed: it ships the CLIP BPE merges the tokenizers need")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ValueError(f"open_clip_torch's CLIP BPE merges file is missing: {path}")
    return path


def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary (49408 tokens) and merges, built as CLIP's SimpleTokenizer builds them.

    Byte-level alphabet (256), the same with the word-end suffix ``</w>`` (256), the first 48894 merges
    joined, then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(_bpe_merges_file().read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _CLIP_MERGES + 1]]  # line 0 is a version header
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408 or any(len(m) != 2 for m in merges):
        raise ValueError(f"unexpected CLIP BPE merges file {_bpe_merges_file()}: {len(vocab)} tokens")
    return vocab, merges


def write_clip_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt of CLIP's tokenizer (the files of openai/clip-vit-large-patch14)."""
    vocab, merges = clip_bpe()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def skeleton_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The config folder ``name`` (one of ``SKELETONS``) with its tokenizer files, ready for ``config=``.

    Built once in the cache under a name that hashes the shipped files and the BPE source, written to
    a temporary folder and renamed, so concurrent processes and interrupted builds are safe.
    """
    if name not in SKELETONS:
        raise ValueError(f"unknown config skeleton {name!r}; expected one of {', '.join(SKELETONS)}")
    src = CONFIGS / name
    files = sorted(p for p in src.rglob("*.json") if p.is_file())
    digest = hashlib.sha256(_bpe_merges_file().read_bytes())
    for p in files:
        digest.update(p.relative_to(src).as_posix().encode() + b"\0" + p.read_bytes())
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = root / "single_file_configs" / f"{name}-{digest.hexdigest()[:12]}"
    if (dest / "model_index.json").is_file():
        return dest
    try:
        with atomic_dir(dest, mode=0o755) as tmp:  # a shared cache must be readable by others
            for p in files:
                target = tmp / p.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, target)
            for tok in {p.parent for p in tmp.rglob("tokenizer_config.json")}:
                write_clip_tokenizer_files(tok)
    except OSError:  # another process finished first
        if not (dest / "model_index.json").is_file():
            raise
    return dest

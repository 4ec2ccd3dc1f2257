"""A real CLIP BPE tokenizer built offline from the vocabulary file that open_clip ships.

`clip_tokenizer()` gives the full 49,408-token CLIP tokenizer (what SD3 and FLUX use);
`clip_tokenizer(words=...)` keeps only the byte tokens, the merges those words need and the two special
tokens, so tiny text encoders stay tiny while every listed word splits exactly as full CLIP splits it
(BPE applies the lowest-ranked present merge; keeping the merges a word uses, in their original order,
reproduces its split).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_N_MERGES = 49152 - 256 - 2  # as in CLIP: 48,894 merges after the header line


def bpe_vocab_path() -> Path:
    """Path of open_clip's `bpe_simple_vocab_16e6.txt.gz`, found without importing open_clip (and torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed; `pip install open_clip_torch` ships the CLIP BPE file")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise FileNotFoundError(f"CLIP BPE vocabulary missing at {path}; reinstall open_clip_torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP reversible byte -> printable unicode map (the standard table, written from its definition).
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@lru_cache(maxsize=1)
def _full_merges() -> tuple[tuple[str, str], ...]:
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")[1 : _N_MERGES + 1]
    return tuple(tuple(line.split()) for line in lines)  # type: ignore[misc]


def _base_vocab() -> list[str]:
    units = list(_bytes_to_unicode().values())
    return units + [u + "</w>" for u in units]


def _used_merges(word: str, ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """Runs CLIP's BPE on one (lower-cased, byte-mapped) word and returns the merges it applies."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    used = set()
    while len(symbols) > 1:
        pairs = [(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, 1 << 30))
        if best not in ranks:
            break
        used.add(best)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return used


# CLIP's pre-tokenizer pattern (words, numbers, single non-space symbols).
_PAT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")


def clip_tokenizer(words: Iterable[str] | None = None, model_max_length: int = 77) -> CLIPTokenizer:
    """Builds a CLIP tokenizer offline.

    Args:
        words: if given, the reduced vocabulary covers exactly these words (any text; it is split like CLIP
            splits it). Token ids are then 0..len(vocab)-1 with BOS and EOS last.
        model_max_length: padding / truncation length (77 for CLIP).
    """
    merges = list(_full_merges())
    if words is not None:
        ranks = {m: i for i, m in enumerate(merges)}
        byte_map = _bytes_to_unicode()
        needed: set[tuple[str, str]] = set()
        for text in words:
            for piece in _PAT.findall(text.lower()):
                needed |= _used_merges("".join(byte_map[b] for b in piece.encode("utf-8")), ranks)
        merges = [m for m in merges if m in needed]
    tokens = _base_vocab() + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    # Files + from_pretrained is the one constructor that transformers 4 and 5 both accept.
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        Path(tmp, "merges.txt").write_text(merges_txt, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)

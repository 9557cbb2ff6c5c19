"""CLIP byte-level BPE tokenizer for CoCa, without torch.

A re-implementation of OpenAI CLIP's tokenizer as used by open_clip
(``open_clip.get_tokenizer("coca_ViT-B-32")``: ``SimpleTokenizer``, ``clean="lower"``,
context length 76). Token ids are identical to open_clip's; the module needs only the
standard library, numpy, ftfy and regex so it can ship in the torch-free edge runtime.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import json
import numbers
import os
import shutil
import zlib
from collections.abc import Iterable, Sequence

import numpy as np
import regex

__all__ = ["Tokenizer", "TokenizerError", "default_vocab_path"]

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
CONFIG_FILENAME = "tokenizer.json"
_TYPE = "clip_bpe"
_SOT = "<start_of_text>"
_EOT = "<end_of_text>"
_END_OF_WORD = "</w>"
_PAD_ID = 0
# CLIP keeps only the first 49152 - 256 - 2 merges of the file, which with the 2 x 256 byte
# symbols and the two special tokens gives the 49408-entry vocabulary the models embed.
_NUM_MERGES = 49152 - 256 - 2
_BPE_CACHE_SIZE = 1 << 16
_INTEGRITY_KEYS = ("vocab_sha256", "vocab_size", "sot_token_id", "eot_token_id", "pad_token_id")

# The special-token alternatives come first so that a literal "<end_of_text>" in a caption
# becomes the special id, exactly as in CLIP; IGNORECASE only matters for the contractions.
_PATTERN = regex.compile(
    rf"{_SOT}|{_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)


class TokenizerError(ValueError):
    """Invalid tokenizer input, configuration or vocabulary file."""


def default_vocab_path() -> str:
    """Path of the vocabulary file vendored in ``coca_edge/assets``."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", VOCAB_FILENAME)


def _byte_alphabet() -> list[tuple[int, str]]:
    """(byte, symbol) pairs in vocabulary-id order.

    Printable Latin-1 bytes stand for themselves; whitespace and control bytes are moved to
    U+0100 onwards so that BPE symbols never contain whitespace. The ids of the 256 byte
    symbols follow this order (printable first), not the byte values.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in printable]
    return [(b, chr(b)) for b in printable] + [(b, chr(0x100 + i)) for i, b in enumerate(shifted)]


def _read_merges(path: str) -> tuple[list[tuple[str, str]], str]:
    """Merge rules of a gzipped CLIP vocabulary file and the file's sha256."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
    except FileNotFoundError:
        raise TokenizerError(f"vocab file not found: {path}") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise TokenizerError(f"corrupt or unreadable vocab file {path}: {e}") from e
    # Line 0 is a version header.
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) < _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise TokenizerError(
            f"corrupt vocab file {path}: expected {_NUM_MERGES} merge lines of two symbols after the header"
        )
    return merges, hashlib.sha256(raw).hexdigest()


def _vocab_tables(path: str) -> tuple:
    """The read-only tables a vocabulary file defines, built once per file version (path, size,
    mtime): building them takes ~0.35 s, and a validation or a fallback search opens one
    tokenizer per model it loads."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TokenizerError(f"vocab file not found: {path}") from None
    except OSError as e:
        raise TokenizerError(f"corrupt or unreadable vocab file {path}: {e}") from e
    return _vocab_tables_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _vocab_tables_cached(path: str, size: int, mtime_ns: int) -> tuple:
    merges, sha256 = _read_merges(path)
    alphabet = _byte_alphabet()
    symbols = [s for _, s in alphabet]
    vocab = symbols + [s + _END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [_SOT, _EOT]
    encoder = {token: i for i, token in enumerate(vocab)}
    if len(encoder) != len(vocab):
        raise TokenizerError(f"corrupt vocab file {path}: duplicate merge results")
    ranks = {merge: rank for rank, merge in enumerate(merges)}
    byte_to_symbol = {b: s for b, s in alphabet}  # a str.translate table over Latin-1 code points
    symbol_to_byte = {s: b for b, s in alphabet}
    # Per-token bytes with the end-of-word marker already turned into a space make decode a
    # join, and unlike replacing "</w>" in the joined text, a generated run of the plain
    # symbols "<", "/", "w", ">" is not mistaken for a marker.
    id_bytes = [
        bytes(symbol_to_byte[c] for c in token.removesuffix(_END_OF_WORD))
        + (b" " if token.endswith(_END_OF_WORD) else b"")
        for token in vocab
    ]
    return sha256, encoder, ranks, byte_to_symbol, id_bytes


def _check_context_length(context_length: object) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, numbers.Integral):
        raise TokenizerError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise TokenizerError(f"context_length must be >= 2 to hold the start and end tokens, got {context_length}")
    return int(context_length)


def _clean(text: str) -> str:
    # CLIP's order: repair mojibake, unescape twice (web captions are often double-escaped),
    # collapse whitespace, lower-case last.
    # ftfy is imported here, not at module load: it costs ~40 ms and captioning never encodes text.
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _as_text_list(texts: object) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TokenizerError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"texts[{i}] must be str, got {type(text).__name__}")
    return texts


class Tokenizer:
    """CLIP BPE tokenizer producing open_clip-identical ids as int64 numpy arrays."""

    def __init__(self, vocab_path: str | os.PathLike | None = None, context_length: int = 76):
        self.vocab_path = default_vocab_path() if vocab_path is None else os.fspath(vocab_path)
        self.context_length = _check_context_length(context_length)
        tables = _vocab_tables(self.vocab_path)
        self.vocab_sha256, self._encoder, self._ranks, self._byte_to_symbol, self._id_bytes = tables

        self.sot_token_id = self._encoder[_SOT]
        self.eot_token_id = self._encoder[_EOT]
        self.pad_token_id = _PAD_ID
        self.vocab_size = len(self._id_bytes)
        self._special_ids = {_SOT: self.sot_token_id, _EOT: self.eot_token_id}
        # Captions reuse a small set of words, so caching whole pre-tokenized pieces skips both
        # the byte mapping and the quadratic merge loop for almost every piece.
        self._piece_ids = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._piece_ids_uncached)

    def _bpe(self, word: str) -> list[str]:
        parts = [*word[:-1], word[-1] + _END_OF_WORD]
        ranks = self._ranks
        while len(parts) > 1:
            # Apply the lowest-ranked applicable merge everywhere; pairs without a rule rank last.
            first, second = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, _NUM_MERGES))
            if (first, second) not in ranks:
                break
            merged = []
            i = 0
            while i < len(parts):
                if parts[i] == first and i + 1 < len(parts) and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _piece_ids_uncached(self, piece: str) -> tuple[int, ...]:
        special = self._special_ids.get(piece)
        if special is not None:
            return (special,)
        word = piece.encode("utf-8").decode("latin-1").translate(self._byte_to_symbol)
        return tuple(self._encoder[token] for token in self._bpe(word))

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens or padding."""
        if not isinstance(text, str):
            raise TokenizerError(f"text must be str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in _PATTERN.findall(_clean(text)):
            ids.extend(self._piece_ids(piece))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """int64 array [len(texts), context_length]: sot, ids, eot, then pad.

        Over-long texts are truncated so that eot is still the last id, as in open_clip.
        """
        ctx = self.context_length if context_length is None else _check_context_length(context_length)
        texts = _as_text_list(texts)
        out = np.full((len(texts), ctx), self.pad_token_id, dtype=np.int64)
        for row, text in zip(out, texts):
            ids = [self.sot_token_id, *self.encode(text)][: ctx - 1]
            ids.append(self.eot_token_id)
            row[: len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special: bool = True) -> str:
        """Text of a 1-D id sequence.

        With ``skip_special`` decoding stops at the first eot and drops sot. The pad id (0) is
        also the id of the symbol "!", so only trailing pads (a row without eot) are dropped.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise TokenizerError(f"decode expects a 1-D id sequence, got shape {arr.shape}; use batch_decode")
        if arr.size and arr.dtype.kind not in "iu":
            raise TokenizerError(f"ids must be integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][0]
            raise TokenizerError(f"id {bad} is outside the vocabulary [0, {self.vocab_size})")
        id_list = arr.tolist()
        if skip_special:
            if self.eot_token_id in id_list:
                id_list = id_list[: id_list.index(self.eot_token_id)]
            id_list = [i for i in id_list if i != self.sot_token_id]
            while id_list and id_list[-1] == self.pad_token_id:
                id_list.pop()
        data = b"".join(self._id_bytes[i] for i in id_list)
        return data.decode("utf-8", errors="replace").strip()

    def batch_decode(self, ids_2d: Sequence[Sequence[int]] | np.ndarray, skip_special: bool = True) -> list[str]:
        """``decode`` applied to each row."""
        return [self.decode(row, skip_special=skip_special) for row in ids_2d]

    def to_dict(self) -> dict:
        """Contents of ``tokenizer.json`` as written by ``save``."""
        return {
            "type": _TYPE,
            "context_length": self.context_length,
            "vocab_file": VOCAB_FILENAME,
            "vocab_sha256": self.vocab_sha256,
            "vocab_size": self.vocab_size,
            "sot_token_id": self.sot_token_id,
            "eot_token_id": self.eot_token_id,
            "pad_token_id": self.pad_token_id,
        }

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write the vocab file and ``tokenizer.json`` into ``directory``; return their paths."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        vocab_dst = os.path.join(directory, VOCAB_FILENAME)
        try:
            shutil.copyfile(self.vocab_path, vocab_dst)
        except shutil.SameFileError:
            pass  # re-saving into the bundle it was loaded from
        config_dst = os.path.join(directory, CONFIG_FILENAME)
        with open(config_dst, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        return [vocab_dst, config_dst]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer written by ``save``, checking the vocab against the recorded hash and ids."""
        config_path = os.path.join(os.fspath(directory), CONFIG_FILENAME)
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer config not found: {config_path}") from None
        except (OSError, ValueError) as e:
            raise TokenizerError(f"unreadable tokenizer config {config_path}: {e}") from e
        if not isinstance(config, dict) or config.get("type") != _TYPE:
            found = config.get("type") if isinstance(config, dict) else type(config).__name__
            raise TokenizerError(f"{config_path}: expected type {_TYPE!r}, got {found!r}")
        vocab_file = config.get("vocab_file", VOCAB_FILENAME)
        if not isinstance(vocab_file, str) or os.path.basename(vocab_file) != vocab_file:
            raise TokenizerError(f"{config_path}: vocab_file must be a file name inside the bundle, got {vocab_file!r}")
        tokenizer = cls(os.path.join(os.fspath(directory), vocab_file), config.get("context_length", 76))
        actual = tokenizer.to_dict()
        mismatched = [k for k in _INTEGRITY_KEYS if k in config and config[k] != actual[k]]
        if mismatched:
            details = ", ".join(f"{k}: recorded {config[k]!r}, found {actual[k]!r}" for k in mismatched)
            raise TokenizerError(f"{config_path} does not match {tokenizer.vocab_path} ({details})")
        return tokenizer

"""Unit tests for coca_edge.tokenizer; they need neither torch nor open_clip."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coca_edge.tokenizer import Tokenizer, TokenizerError, default_vocab_path

REPO_ROOT = Path(__file__).resolve().parents[2]
SOT, EOT = 49406, 49407
# Ids of "a photo of a cat" from open_clip 3.3.0, pinned so a vocabulary or ordering
# regression shows up without open_clip installed.
CAT_IDS = [320, 1125, 539, 320, 2368]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_special_ids_and_defaults(tok):
    assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (SOT, EOT, 0)
    assert tok.vocab_size == 49408
    assert tok.context_length == 76
    assert os.path.isfile(default_vocab_path())


def test_known_ids(tok):
    assert tok.encode("a photo of a cat") == CAT_IDS
    assert tok.encode("  A   PHOTO\tof a\ncat ") == CAT_IDS
    assert tok.encode("") == []


@pytest.mark.parametrize(
    "caption",
    ["a photo of a cat", "two dogs playing in the snow", "a man riding a wave on top of a surfboard", "café crème"],
)
def test_round_trip(tok, caption):
    assert tok.decode(tok.encode(caption)) == caption
    assert tok.decode(tok(caption)[0]) == caption
    assert tok.decode(tok.encode(caption.upper())) == caption


def test_call_pads_with_zeros(tok):
    out = tok("a photo of a cat")
    assert out.dtype == np.int64
    assert out.shape == (1, 76)
    assert out[0, :7].tolist() == [SOT, *CAT_IDS, EOT]
    assert not out[0, 7:].any()


def test_batch_shapes(tok):
    out = tok(["a photo of a cat", "", "dog"])
    assert out.shape == (3, 76)
    assert out[1, :3].tolist() == [SOT, EOT, 0]
    assert tok([]).shape == (0, 76)
    assert tok(("a", "b"), context_length=5).shape == (2, 5)


@pytest.mark.parametrize("context_length", [2, 5, 76, 77])
def test_truncation_keeps_eot_last(tok, context_length):
    text = " ".join(["word"] * 200)
    row = tok(text, context_length=context_length)[0]
    assert row.shape == (context_length,)
    assert row[0] == SOT and row[-1] == EOT
    assert row[1:-1].tolist() == tok.encode(text)[: context_length - 2]


def test_truncation_boundary(tok):
    fits = " ".join(["word"] * 74)  # sot + 74 + eot == 76
    assert tok(fits)[0].tolist() == [SOT, *tok.encode(fits), EOT]
    row = tok(fits + " cat")[0]
    assert row[-1] == EOT and row[-2] == tok.encode("word")[0]


def test_per_call_context_does_not_change_default(tok):
    assert tok("cat", context_length=10).shape == (1, 10)
    assert tok.context_length == 76
    assert Tokenizer(context_length=77)("cat").shape == (1, 77)


def test_literal_special_tokens_become_special_ids(tok):
    # Matches CLIP/open_clip: the pattern recognises the special token strings in text.
    assert tok.encode("cat <end_of_text> dog") == [*tok.encode("cat"), EOT, *tok.encode("dog")]
    assert tok.decode(tok("cat <END_OF_TEXT> dog")[0]) == "cat"


def test_decode_special_handling(tok):
    ids = [SOT, *CAT_IDS, EOT, 0, 0]
    assert tok.decode(ids) == "a photo of a cat"
    assert tok.decode(np.array(ids)) == "a photo of a cat"
    assert tok.decode([SOT, 320, EOT, 1125], skip_special=False) == "<start_of_text>a <end_of_text>photo"
    assert tok.decode([SOT, 320, EOT, 1125]) == "a"
    assert tok.decode([SOT, 320, 0, 0]) == "a"  # trailing pads without eot
    assert tok.decode([]) == ""


def test_decode_keeps_interior_exclamation(tok):
    # Id 0 is both the pad id and the symbol "!"; inside a caption it is text.
    ids = tok.encode("wow !~")
    assert 0 in ids
    assert tok.decode(tok("wow !~")[0]) == "wow !~"


def test_decode_does_not_invent_word_markers(tok):
    plain = [tok._encoder[c] for c in "</w>"]
    assert tok.decode(plain) == "</w>"


def test_batch_decode(tok):
    texts = ["a photo of a cat", "", "two dogs"]
    assert tok.batch_decode(tok(texts)) == texts
    assert tok.batch_decode([[SOT, 320, EOT]], skip_special=False) == ["<start_of_text>a <end_of_text>"]


@pytest.mark.parametrize("bad", [[[1, 2], [3, 4]], [1.5, 2.0], [-1], [49408], [True]])
def test_decode_rejects_bad_ids(tok, bad):
    with pytest.raises(TokenizerError):
        tok.decode(bad)


def test_non_str_inputs_are_named(tok):
    with pytest.raises(TokenizerError, match=r"texts\[1\] must be str, got int"):
        tok(["ok", 5])
    with pytest.raises(TokenizerError, match=r"texts\[0\] must be str, got NoneType"):
        tok([None])
    with pytest.raises(TokenizerError, match="got NoneType"):
        tok(None)
    with pytest.raises(TokenizerError, match="got bytes"):
        tok(b"a photo")
    with pytest.raises(TokenizerError, match="got int"):
        tok.encode(3)


@pytest.mark.parametrize("context_length", [1, 0, -5, "76", 7.0, True])
def test_bad_context_length(tok, context_length):
    with pytest.raises(TokenizerError, match="context_length"):
        Tokenizer(context_length=context_length)
    with pytest.raises(TokenizerError, match="context_length"):
        tok("cat", context_length=context_length)


def test_tokenizer_error_is_value_error():
    assert issubclass(TokenizerError, ValueError)


def test_missing_vocab_names_path(tmp_path):
    missing = tmp_path / "nope.txt.gz"
    with pytest.raises(TokenizerError, match="not found") as info:
        Tokenizer(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        b"not gzip at all",
        gzip.compress(b"#version: 0.2\ni n\nt h\n"),  # too few merges
        gzip.compress(b"#version: 0.2\n" + b"a b c\n" * 49000),  # three symbols per line
        gzip.compress(b"\xff\xfe" * 100),  # not UTF-8
        gzip.compress(b"#version: 0.2\n" + b"i n\n" * 49000)[:-20],  # truncated
    ],
)
def test_corrupt_vocab_names_path(tmp_path, content):
    path = tmp_path / "vocab.txt.gz"
    path.write_bytes(content)
    with pytest.raises(TokenizerError) as info:
        Tokenizer(path)
    assert str(path) in str(info.value)


def test_duplicate_merges_rejected(tmp_path):
    path = tmp_path / "vocab.txt.gz"
    path.write_bytes(gzip.compress(b"#version: 0.2\n" + b"i n\n" * 49000))
    with pytest.raises(TokenizerError, match="duplicate"):
        Tokenizer(path)


def test_vocab_tables_built_once_per_file_version(tmp_path):
    """A second tokenizer over the same file reuses its tables; a rewritten file is read again."""
    path = tmp_path / "vocab.txt.gz"
    path.write_bytes(Path(default_vocab_path()).read_bytes())
    first, second = Tokenizer(path), Tokenizer(path, context_length=20)
    assert second._ranks is first._ranks and second.encode("a photo of a cat") == CAT_IDS
    path.write_bytes(b"not gzip at all")
    os.utime(path, ns=(0, 0))  # a different version even on a filesystem with coarse mtimes
    with pytest.raises(TokenizerError, match="corrupt"):
        Tokenizer(path)


def test_save_load_round_trip(tmp_path, tok):
    original = Tokenizer(Path(default_vocab_path()), context_length=77)
    written = original.save(tmp_path / "bundle")
    assert sorted(Path(p).name for p in written) == ["bpe_simple_vocab_16e6.txt.gz", "tokenizer.json"]
    assert all(Path(p).is_file() for p in written)

    config = json.loads((tmp_path / "bundle" / "tokenizer.json").read_text())
    assert config == original.to_dict()
    assert config["type"] == "clip_bpe"
    assert config["vocab_file"] == "bpe_simple_vocab_16e6.txt.gz"
    assert (config["context_length"], config["sot_token_id"], config["eot_token_id"], config["pad_token_id"]) == (
        77,
        SOT,
        EOT,
        0,
    )

    loaded = Tokenizer.load(tmp_path / "bundle")
    assert loaded.context_length == 77
    texts = ["a photo of a cat", "Ça va? 😀 &amp;", " ".join(["word"] * 100)]
    np.testing.assert_array_equal(loaded(texts), original(texts))
    assert loaded.save(tmp_path / "bundle") == written  # re-saving in place


def test_load_errors(tmp_path, tok):
    with pytest.raises(TokenizerError, match="not found") as info:
        Tokenizer.load(tmp_path)
    assert str(tmp_path) in str(info.value)

    bundle = tmp_path / "bundle"
    tok.save(bundle)
    config_path = bundle / "tokenizer.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "type": "sentencepiece"}))
    with pytest.raises(TokenizerError, match="sentencepiece"):
        Tokenizer.load(bundle)

    config_path.write_text(json.dumps({**config, "vocab_file": "../elsewhere.gz"}))
    with pytest.raises(TokenizerError, match="vocab_file"):
        Tokenizer.load(bundle)

    config_path.write_text("{not json")
    with pytest.raises(TokenizerError, match="unreadable"):
        Tokenizer.load(bundle)

    config_path.write_text(json.dumps({**config, "vocab_sha256": "0" * 64}))
    with pytest.raises(TokenizerError, match="vocab_sha256"):
        Tokenizer.load(bundle)

    config_path.write_text(json.dumps(config))
    (bundle / "bpe_simple_vocab_16e6.txt.gz").unlink()
    with pytest.raises(TokenizerError, match="vocab file not found"):
        Tokenizer.load(bundle)


def test_imports_without_torch():
    code = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
before = set(sys.modules)
from coca_edge.tokenizer import Tokenizer
ids = Tokenizer()("a photo of a cat")[0, :7].tolist()
assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
new = {name.split(".")[0] for name in set(sys.modules) - before}
extra = new - set(sys.stdlib_module_names) - {"coca_edge", "numpy", "ftfy", "regex", "wcwidth"}
assert not extra, f"unexpected third-party imports: {sorted(extra)}"
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"

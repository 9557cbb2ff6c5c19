"""coca_edge.tokenizer must give exactly open_clip's ids for CoCa on a varied corpus."""

import json
from pathlib import Path

import numpy as np
import pytest

from coca_edge.tokenizer import Tokenizer

open_clip = pytest.importorskip("open_clip")

CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "tokenizer_corpus.jsonl"


@pytest.fixture(scope="module")
def corpus():
    # newline="\n": only "\n" ends a record (the JSON escapes every other line break).
    with open(CORPUS_PATH, encoding="utf-8", newline="\n") as f:
        texts = [json.loads(line) for line in f]
    assert len(texts) >= 1000
    return texts


@pytest.fixture(scope="module")
def reference():
    tokenizer = open_clip.get_tokenizer("coca_ViT-B-32")
    assert tokenizer.context_length == 76
    return tokenizer


@pytest.fixture(scope="module")
def ours():
    return Tokenizer()


def _first_mismatches(texts, expected, actual, limit=5):
    rows = [i for i in range(len(texts)) if not np.array_equal(expected[i], actual[i])]
    return [f"#{i} {texts[i][:80]!r}: expected {list(expected[i])} got {list(actual[i])}" for i in rows[:limit]], len(rows)


@pytest.mark.parametrize("context_length", [76, 77])
def test_ids_match_open_clip(corpus, reference, ours, context_length):
    expected = reference(corpus, context_length=context_length).numpy()
    actual = ours(corpus, context_length=context_length)
    assert actual.dtype == np.int64
    assert actual.shape == expected.shape == (len(corpus), context_length)
    if not np.array_equal(actual, expected):
        shown, count = _first_mismatches(corpus, expected, actual)
        pytest.fail(f"{count} of {len(corpus)} texts differ:\n" + "\n".join(shown))


def test_default_context_matches_open_clip(corpus, reference, ours):
    np.testing.assert_array_equal(ours(corpus[:50]), reference(corpus[:50]).numpy())


def test_untruncated_encode_matches_open_clip(corpus, reference, ours):
    # Long texts are truncated at 76/77 above; this also covers their tails.
    expected = [reference.encode(text) for text in corpus]
    actual = [ours.encode(text) for text in corpus]
    if actual != expected:
        shown, count = _first_mismatches(corpus, expected, actual)
        pytest.fail(f"{count} of {len(corpus)} texts differ:\n" + "\n".join(shown))


def test_decode_matches_open_clip(corpus, reference, ours):
    def reference_caption(ids):
        # The post-processing open_clip's CoCa captioning examples apply to generated ids.
        return reference.decode(ids).split("<end_of_text>")[0].replace("<start_of_text>", "").strip()

    sample = corpus[::5]
    for text, row in zip(sample, ours(sample)):
        ids = row.tolist()
        assert ours.decode(row) == reference_caption(ids), text
        assert ours.decode(row, skip_special=False) == reference.decode(ids).strip(), text
        assert ours.decode(ours.encode(text)) == reference_caption(reference.encode(text)), text

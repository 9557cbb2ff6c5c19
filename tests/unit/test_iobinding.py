"""The IO-binding decode loop gives the numpy loop's tokens (CPU provider, OrtValue caches)."""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

from coca_edge.runtime.edge import EdgeCoCa
from coca_edge.runtime.generation import GenerationConfig, generate
from coca_edge.runtime.iobinding import IoBindingGenerator


@pytest.fixture(scope="module")
def edge_and_cross(tiny_bundle):
    edge = EdgeCoCa.load(tiny_bundle[0])
    pixels = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    return edge, edge.cross_kv(pixels)


@pytest.fixture(scope="module")
def early_end_layout(edge_and_cross):
    """The random tiny model never emits its end token, so the row-dropping and hypothesis-closing
    paths would go untested; treat a token it does emit mid-caption as the end token instead
    (both loops get the same layout). Chosen so greedy captions end at different lengths."""
    edge, cross = edge_and_cross
    out = generate(edge.runners["decoder"], cross, edge.layout, GenerationConfig(max_new_tokens=12))
    counts = collections.Counter(t for seq in out.sequences for t in seq[1:-1])
    for token, _ in counts.most_common():
        layout = dataclasses.replace(edge.layout, eot_token_id=token)
        lengths = {len(s) for s in generate(edge.runners["decoder"], cross, layout,
                                            GenerationConfig(max_new_tokens=12)).sequences}
        if len(lengths) > 2:
            return layout
    pytest.fail("no emitted token makes captions end at different steps")


CONFIGS = [GenerationConfig(max_new_tokens=12),
           GenerationConfig(max_new_tokens=12, min_new_tokens=4),
           GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=12),
           GenerationConfig(strategy="top_k", top_k=5, seed=3, max_new_tokens=12),
           GenerationConfig(strategy="top_p", top_p=0.8, seed=1, max_new_tokens=12)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.strategy}-min{c.min_new_tokens}")
@pytest.mark.parametrize("ending", ["never", "early"])
def test_same_tokens_and_scores_as_the_numpy_loop(config, ending, edge_and_cross, early_end_layout):
    edge, cross = edge_and_cross
    layout = early_end_layout if ending == "early" else edge.layout
    expected = generate(edge.runners["decoder"], cross, layout, config)
    got = IoBindingGenerator(edge.runners["decoder"]).generate(cross, layout, config)
    assert got.sequences == expected.sequences
    assert got.scores == expected.scores  # same float64 arithmetic on the same logits: exactly equal
    if ending == "early" and config.strategy == "greedy" and config.min_new_tokens == 0:
        assert len({len(s) for s in got.sequences}) > 2  # rows really were dropped mid-decode


def test_caches_stay_ortvalues_between_steps(edge_and_cross, monkeypatch):
    edge, cross = edge_and_cross
    generator = IoBindingGenerator(edge.runners["decoder"])
    assert generator.device == "cpu"
    seen = []
    step = generator._step

    def recording_step(ids, past, past_names, cross_values, cross_names):
        assert past_names == edge.layout.past_names()  # one bound OrtValue per layer and K / V
        seen.append([type(p).__name__ for p in past] + [type(c).__name__ for c in cross_values])
        return step(ids, past, past_names, cross_values, cross_names)

    monkeypatch.setattr(generator, "_step", recording_step)
    generator.generate(cross, edge.layout, GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=4))
    assert len(seen) == 4 and {name for names in seen for name in names} == {"OrtValue"}


def test_edge_coca_io_binding_captions_match(tiny_bundle):
    pixels = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    plain = EdgeCoCa.load(tiny_bundle[0])
    bound = EdgeCoCa.load(tiny_bundle[0], io_binding=True)
    assert isinstance(bound.io_generator, IoBindingGenerator)
    for kwargs in ({"strategy": "greedy"}, {"strategy": "beam", "num_beams": 2}):
        assert bound.caption(pixels, max_new_tokens=6, **kwargs) == plain.caption(pixels, max_new_tokens=6, **kwargs)


def test_rejects_bad_requests(edge_and_cross):
    edge, cross = edge_and_cross
    generator = IoBindingGenerator(edge.runners["decoder"])
    with pytest.raises(ValueError, match="context length"):
        generator.generate(cross, edge.layout, GenerationConfig(max_new_tokens=edge.layout.context_length))
    with pytest.raises(ValueError, match="cross_kv must be"):
        generator.generate(cross[:, :, :0], edge.layout)

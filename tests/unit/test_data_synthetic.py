"""synthetic-scenes: determinism, splits, grammar coverage, scene/image/caption agreement."""
from __future__ import annotations

import json

import numpy as np
import pytest

from coca_edge.data.readers import CsvReader, WebDatasetReader
from coca_edge.data.synthetic import (
    COLORS,
    SHAPES,
    Scene,
    SceneConfig,
    SyntheticScenes,
    reference_captions,
    render_scene,
    write_synthetic,
)
from coca_edge.data.tasks import parse_caption, score_captions


def test_sample_is_a_function_of_seed_split_index():
    a, b = SyntheticScenes("train", length=50), SyntheticScenes("train", length=50)
    for i in (0, 7, 49):
        np.testing.assert_array_equal(a.pixels(i), b.pixels(i))
        assert a.caption(i) == b.caption(i) and a.scene(i) == b.scene(i)
    # random access does not depend on what was generated before
    np.testing.assert_array_equal(a[30].image, SyntheticScenes("train", length=50)[30].image)
    assert SyntheticScenes("train", seed=1, length=5).scene(0) != a.scene(0)
    val, test = SyntheticScenes("val"), SyntheticScenes("test")
    assert [val.caption(i) for i in range(20)] != [a.caption(i) for i in range(20)]
    assert [val.caption(i) for i in range(20)] != [test.caption(i) for i in range(20)]
    assert (len(a), len(val), len(test)) == (50, 1000, 2000)
    with pytest.raises(IndexError):
        a[50]
    with pytest.raises(ValueError):
        SyntheticScenes("dev")


def test_batch_and_sample_agree_and_image_size_parameter():
    ds = SyntheticScenes("val", image_size=32, length=10)
    images, captions, scenes = ds.batch([3, 1])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    sample = ds[3]
    np.testing.assert_array_equal(np.asarray(sample.image), images[0])
    assert sample.caption == captions[0] and sample.meta["scene"] == scenes[0]
    assert sample.id == "synthetic-scenes/val/3"
    assert SyntheticScenes("val").pixels(0).shape == (64, 64, 3)  # the demo models' size


def test_scene_round_trips_and_rerenders():
    ds = SyntheticScenes("test", length=20)
    for i in range(20):
        scene = ds.scene(i)
        again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
        assert again == scene
        np.testing.assert_array_equal(render_scene(again), ds.pixels(i))


def test_scene_geometry():
    ds = SyntheticScenes("train", length=400)
    counts = {1: 0, 2: 0, 3: 0}
    for i in range(400):
        scene = ds.scene(i)
        counts[scene.n_objects] += 1
        size = scene.image_size
        boxes = [o.bbox for o in scene.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0 < x0 < x1 < size and 0 < y0 < y1 < size
        for j, a in enumerate(boxes):  # objects never overlap
            for b in boxes[j + 1 :]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        triples = [o.attributes for o in scene.objects]
        assert len(set(triples)) == len(triples)
        small = [o.diameter for o in scene.objects if o.size == "small"]
        large = [o.diameter for o in scene.objects if o.size == "large"]
        if small and large:
            assert max(small) < min(large)
        if scene.n_objects == 2:  # the relation is unambiguous: clear on one axis only
            (ax, ay), (bx, by) = scene.objects[0].center, scene.objects[1].center
            dx, dy = bx - ax, by - ay
            expected = ("left" if dx > 0 else "right") if abs(dx) > abs(dy) else ("above" if dy > 0 else "below")
            assert scene.relation == expected
        else:
            assert scene.relation is None
    assert all(c > 50 for c in counts.values())


def test_objects_are_drawn_where_the_scene_says():
    ds = SyntheticScenes("val", length=60, config=SceneConfig(noise_std=(0.0, 0.0), max_clutter=0))
    for i in range(60):
        scene, img = ds.scene(i), ds.pixels(i).astype(int)
        for obj in scene.objects:
            cx, cy = (int(v) for v in obj.center)
            if obj.shape in ("circle", "square", "cross", "diamond"):  # solid at the centre
                assert np.abs(img[cy, cx] - np.array(obj.rgb)).max() <= 1


def test_captions_match_scenes_and_grammar_is_large():
    ds = SyntheticScenes("train", length=20_000)
    captions = [ds.caption(i) for i in range(20_000)]
    assert len(set(captions)) >= 10_000
    scenes = [ds.scene(i) for i in range(2_000)]
    scores = score_captions(captions[:2_000], scenes)  # the generator's own captions are never wrong
    assert scores["hallucination_rate"] == 0.0
    assert scores["relation_accuracy"] == 1.0 and scores["relations_stated"] > 200
    assert scores["color_accuracy"] == scores["shape_accuracy"] == scores["size_accuracy"] == 1.0
    single = [
        c for c, s in zip(captions, scenes)
        if s.n_objects == 1 and [len(m) for m in parse_caption(c).mentions] == [1]
    ]
    assert 0.08 < len(single) / 2_000 < 0.3  # single-attribute captions for zero-shot prompts
    words = set(" ".join(captions).split())
    assert {"little", "big", "over", "under"} <= words  # synonyms
    assert set(COLORS) <= words and set(SHAPES) <= words


def test_reference_captions():
    ds = SyntheticScenes("test")
    by_count = {}
    for i in range(100):
        scene = ds.scene(i)
        by_count.setdefault(scene.n_objects, scene)
    assert len(reference_captions(by_count[1])) == 1
    two = reference_captions(by_count[2])
    assert len(two) == 2 and all(parse_caption(r).relations for r in two)
    assert len(reference_captions(by_count[3])) == 6


def test_config_validation():
    for bad in ({"image_size": 8}, {"object_count_probs": (0.5, 0.6)}, {"single_attribute_share": 0.9},
                {"noise_std": (5, 1)}):
        with pytest.raises(ValueError):
            SceneConfig(**bad)
    one = SyntheticScenes("val", config=SceneConfig(object_count_probs=(1.0,)), length=20)
    assert all(one.scene(i).n_objects == 1 for i in range(20))


def test_iteration_shards_and_write_to_disk(tmp_path):
    ds = SyntheticScenes("val", length=9, shuffle_seed=1)
    ids = [s.id for s in ds]
    parts = [[s.id for s in SyntheticScenes("val", length=9, shuffle_seed=1, shard=(r, 2))] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(ids) and not set(parts[0]) & set(parts[1])

    (csv_path,) = write_synthetic(tmp_path / "csv", "val", 6)
    read = list(CsvReader(csv_path))
    assert [s.caption for s in read] == [ds.caption(i) for i in range(6)]
    np.testing.assert_array_equal(np.asarray(read[2].image), ds.pixels(2))  # PNG is lossless
    shards = write_synthetic(tmp_path / "wds", "val", 6, fmt="wds", shard_size=4)
    assert len(shards) == 2
    read = list(WebDatasetReader([str(p) for p in shards]))
    assert [s.caption for s in read] == [ds.caption(i) for i in range(6)]
    assert Scene.from_dict(read[0].meta["json"]["scene"]) == ds.scene(0)
    again = write_synthetic(tmp_path / "wds2", "val", 6, fmt="wds", shard_size=4)
    assert open(shards[0], "rb").read() == open(again[0], "rb").read()  # byte-identical per seed

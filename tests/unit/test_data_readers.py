"""CSV, COCO, webdataset and image-folder readers: order, sharding, skip policy, errors."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from tests.unit.conftest_data import (
    bomb_png,
    make_coco,
    make_wds,
    truncated_jpeg,
    write_csv,
    write_image,
    write_tar,
    encode,
    photo,
)
from coca_edge.data.preprocess import PreprocessConfig, Preprocessor
from coca_edge.data.readers import (
    CocoCaptionsReader,
    CsvReader,
    DataError,
    ImageFolderReader,
    WebDatasetReader,
    expand_urls,
)


def _ids(reader):
    return [s.id for s in reader]


def _check_sharding(make_reader, expected_ids):
    """Two simulated workers with the same seed: disjoint, and together everything."""
    parts = [_ids(make_reader((rank, 2))) for rank in range(2)]
    assert parts[0] and parts[1]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(expected_ids)
    assert len(parts[0]) + len(parts[1]) == len(expected_ids)


@pytest.fixture()
def csv_dir(tmp_path):
    for i in range(6):
        write_image(tmp_path / "img" / f"{i}.png", seed=i)
    rows = [(f"img/{i}.png", f"caption number {i}") for i in range(6)]
    return tmp_path, write_csv(tmp_path / "data.tsv", rows)


def test_csv_reads_relative_paths_in_order(csv_dir, monkeypatch, tmp_path_factory):
    root, path = csv_dir
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # paths are relative to the file, not the cwd
    samples = list(CsvReader(path))
    assert [s.caption for s in samples] == [f"caption number {i}" for i in range(6)]
    assert samples[0].image.mode == "RGB" and samples[0].image.size == (64, 48)
    assert samples[0].id == "data.tsv:2"


def test_csv_seeded_order_epochs_and_sharding(csv_dir):
    _, path = csv_dir
    a, b = _ids(CsvReader(path, seed=3)), _ids(CsvReader(path, seed=3))
    assert a == b and a != _ids(CsvReader(path)) and sorted(a) == sorted(_ids(CsvReader(path)))
    reader = CsvReader(path, seed=3)
    reader.set_epoch(1)
    assert _ids(reader) != a
    _check_sharding(lambda shard: CsvReader(path, seed=3, shard=shard), a)
    assert len(CsvReader(path, shard=(1, 2))) == 3


def test_csv_transform_and_custom_columns(tmp_path):
    write_image(tmp_path / "a.jpg", fmt="JPEG")
    path = write_csv(tmp_path / "x.csv", [("a.jpg", "hello, world")], header=("image", "text"), sep=",")
    path.write_text('image,text\na.jpg,"hello, world"\n')
    (sample,) = CsvReader(path, "image", "text", ",", transform=Preprocessor(PreprocessConfig(image_size=32)))
    assert sample.caption == "hello, world"
    assert sample.image.shape == (3, 32, 32) and sample.image.dtype == np.float32


def test_csv_missing_column_names_existing_columns(tmp_path):
    path = write_csv(tmp_path / "d.tsv", [("a.png", "x")], header=("path", "caption"))
    with pytest.raises(DataError, match=r"no column 'filepath'.*\['path', 'caption'\]"):
        CsvReader(path)
    comma = tmp_path / "d.csv"
    comma.write_text("filepath,title\na.png,x\n")
    with pytest.raises(DataError, match="separator"):
        CsvReader(comma)  # open_clip's default separator is a tab
    with pytest.raises(DataError, match="does not exist"):
        CsvReader(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        CsvReader(tmp_path / "empty.csv")


def test_csv_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    write_image(tmp_path / "good0.png", seed=0)
    write_image(tmp_path / "good1.jpg", seed=1, fmt="JPEG")
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    lines = [
        b"filepath\ttitle",
        b"good0.png\tfirst good one",
        b"missing.png\tno file",
        b"zero.png\tzero bytes",
        b"cut.jpg\ttruncated",
        b"text.png\ttext file",
        b"bomb.png\ta bomb",
        b"good0.png\t   ",
        b"good0.png\t",
        b"good0.png\tcaf\xe9 in latin-1",
        b"good1.jpg\tsecond good one",
    ]
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    reader = CsvReader(path)
    with caplog.at_level(logging.WARNING, logger="coca_edge.data"):
        samples = list(reader)
    assert [s.caption for s in samples] == ["first good one", "second good one"]
    stats = reader.skipped
    assert dict(stats.counts) == {
        "missing": 1, "empty": 1, "truncated": 1, "not_an_image": 1, "too_large": 1,
        "empty_caption": 2, "bad_encoding": 1,
    }
    assert stats.total == 8 and stats.seen == 10 and stats.yielded == 2
    assert "2 of 10 samples yielded; skipped 8" in caplog.text  # reported at the end of the pass
    assert stats.as_dict()["by_reason"]["missing"] == 1


def test_every_sample_skipped_is_structural(tmp_path):
    path = write_csv(tmp_path / "d.tsv", [("nope.png", "a"), ("nada.png", "b")])
    with pytest.raises(DataError, match="every sample was skipped"):
        list(CsvReader(path))


def test_coco_per_caption_and_per_image(tmp_path):
    ann = make_coco(tmp_path, n_images=4, captions_per_image=3)
    per_caption = list(CocoCaptionsReader(ann))  # image folder guessed: ../val2017
    assert len(per_caption) == 12
    assert per_caption[0].caption == "image 0 caption 0" and per_caption[0].meta["image_id"] == 100
    per_image = list(CocoCaptionsReader(ann, tmp_path / "val2017", per_image=True))
    assert len(per_image) == 4
    assert per_image[1].meta["captions"] == [f"image 1 caption {k}" for k in range(3)]
    ids = _ids(CocoCaptionsReader(ann, seed=1))
    _check_sharding(lambda shard: CocoCaptionsReader(ann, seed=1, shard=shard), ids)


def test_coco_bad_entries_and_structure(tmp_path):
    ann = make_coco(tmp_path, n_images=3, captions_per_image=2)
    data = json.loads(ann.read_text())
    data["annotations"].append({"id": 9, "image_id": 999, "caption": "orphan"})
    data["annotations"][0]["caption"] = "  "
    data["images"].append({"id": 555, "file_name": "gone.jpg"})
    data["annotations"].append({"id": 10, "image_id": 555, "caption": "image is missing"})
    ann.write_text(json.dumps(data))
    reader = CocoCaptionsReader(ann)
    samples = list(reader)
    assert len(samples) == 5
    assert dict(reader.skipped.counts) == {"empty_caption": 1, "unknown_image_id": 1, "missing": 1}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="annotations"):
        CocoCaptionsReader(bad, tmp_path)
    bad.write_text("{not json")
    with pytest.raises(DataError, match="JSON"):
        CocoCaptionsReader(bad, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        CocoCaptionsReader(ann, tmp_path / "nowhere")


def test_webdataset_two_shards_and_two_workers(tmp_path):
    make_wds(tmp_path, n_shards=2, per_shard=5)
    pattern = str(tmp_path / "{00000..00001}.tar")
    assert len(expand_urls(pattern)) == 2
    samples = list(WebDatasetReader(pattern))
    assert len(samples) == 10
    assert {s.caption for s in samples} == {f"shard {s} sample {k}" for s in range(2) for k in range(5)}
    assert all(s.image.mode == "RGB" for s in samples)
    assert samples[1].meta["json"]["tag"] == 1  # json caption, json kept
    ids = [s.id for s in samples]
    _check_sharding(lambda shard: WebDatasetReader(pattern, seed=0, shard=shard), ids)  # split by shard
    one = str(tmp_path / "00000.tar")
    _check_sharding(lambda shard: WebDatasetReader(one, shard=shard), ids[:5])  # fewer shards than workers
    a = _ids(WebDatasetReader(pattern, seed=5, shuffle_buffer=4))
    assert a == _ids(WebDatasetReader(pattern, seed=5, shuffle_buffer=4)) and sorted(a) == sorted(ids)
    cfg = PreprocessConfig(image_size=32)
    (first,) = [s for s, _ in zip(WebDatasetReader(pattern, transform=Preprocessor(cfg)), range(1))]
    assert first.image.shape == (3, 32, 32)


def test_webdataset_bad_samples_and_missing_shards(tmp_path):
    good = encode(photo(20, 20), "PNG")
    write_tar(tmp_path / "bad.tar", [
        ("a.png", good), ("a.txt", b"fine"),
        ("b.png", good),  # no caption
        ("c.txt", b"no image"),
        ("d.jpg", truncated_jpeg()), ("d.txt", b"truncated"),
        ("e.png", good), ("e.txt", b"\xff\xfe latin"),
        ("f.png", good), ("f.txt", b"  \n"),
        ("g.jpg", b"GIF89a not really"), ("g.txt", b"fake"),
        ("h.png", good), ("h.json", b"{broken"),
    ])
    reader = WebDatasetReader(str(tmp_path / "bad.tar"))
    assert [s.caption for s in reader] == ["fine"]
    assert dict(reader.skipped.counts) == {
        "no_caption": 1, "no_image": 1, "truncated": 1, "bad_encoding": 1, "empty_caption": 1,
        "not_an_image": 1, "bad_json": 1,
    }
    with pytest.raises(DataError, match="do not exist"):
        WebDatasetReader(str(tmp_path / "{00000..00003}.tar"))
    with pytest.raises(DataError, match="no webdataset shard matched"):
        WebDatasetReader(str(tmp_path / "*.tgz"))
    (tmp_path / "garbage.tar").write_bytes(b"\x00garbage" * 1000)
    reader = WebDatasetReader(str(tmp_path / "garbage.tar"))
    with pytest.raises(DataError, match="every sample was skipped"):
        list(reader)
    assert reader.skipped.counts["bad_shard_member"] == 1


def test_image_folder(tmp_path):
    for cls, n in (("cat", 2), ("dog_house", 3)):
        for i in range(n):
            write_image(tmp_path / cls / f"{i}.png", seed=i)
    (tmp_path / "cat" / "notes.txt").write_text("ignored: not an image extension")
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"")
    reader = ImageFolderReader(tmp_path, templates=("a photo of a {}.", "a {}"))
    samples = list(reader)
    assert reader.classes == ["cat", "dog_house"] and reader.classnames == ["cat", "dog house"]
    assert [s.meta["label"] for s in samples] == [0, 0, 1, 1, 1]
    assert samples[-1].caption == "a photo of a dog house."
    assert reader.prompts()[1] == ["a photo of a dog house.", "a dog house"]
    assert reader.skipped.counts["empty"] == 1
    renamed = ImageFolderReader(tmp_path, classnames={"cat": "kitten", "dog_house": "kennel"})
    assert renamed.classnames == ["kitten", "kennel"]
    _check_sharding(lambda shard: ImageFolderReader(tmp_path, seed=2, shard=shard), _ids(reader))
    with pytest.raises(DataError, match="2 class folders"):
        ImageFolderReader(tmp_path, classnames=["one"])
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderReader(tmp_path / "empty_root")
    (tmp_path / "empty_root" / "cls").mkdir()
    with pytest.raises(DataError, match="no images"):
        ImageFolderReader(tmp_path / "empty_root")


def test_shard_argument_is_checked(csv_dir):
    _, path = csv_dir
    for bad in ((2, 2), (0, 0), (-1, 2), "x"):
        with pytest.raises(ValueError):
            CsvReader(path, shard=bad)

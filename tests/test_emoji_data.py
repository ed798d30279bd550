"""benchmarks/data/emoji.py: the Noto Emoji as an image folder (splits by base emoji, category folders, captions).

The tests on the real package fetch it with `npm pack` (once per session, into $HFGEN_CACHE/emoji) and skip with a
reason where npm is missing or the fetch fails; the tests on a hand-made package need no npm."""

import importlib.util
import io
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("hfgen_benchmarks_emoji_data", ROOT / "benchmarks" / "data" / "emoji.py")
emoji_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emoji_data)

FOLDERS = set(emoji_data.CATEGORIES.values())
TONES = emoji_data.SKIN_TONES  # "1F3FB" -> "light", ...


def read_metadata(folder) -> list[dict]:
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def png_files(folder) -> list[str]:
    """Every PNG below `folder`, relative to it with forward slashes, sorted."""
    return sorted(str(path.relative_to(folder).as_posix()) for path in Path(folder).rglob("*.png"))


def check_folder(folder) -> dict[str, list[dict]]:
    """What every built folder must satisfy; returns {split: its metadata rows}."""
    assert not os.path.exists(f"{folder}.incomplete") and not os.path.exists(f"{folder}.old")
    rows = {split: read_metadata(os.path.join(folder, split)) for split in ("train", "test")}
    for split, split_rows in rows.items():
        files = png_files(os.path.join(folder, split))
        assert [row["file_name"] for row in split_rows] == files  # every file has a row, every row a file
        assert {file.split("/")[0] for file in files} <= FOLDERS
        for row in split_rows:
            assert "label" not in row and "labels" not in row and "image" not in row  # the class folders label
            assert row["file_name"].split("/")[0] == emoji_data.CATEGORIES[row["category"]]
            text = row["text"]
            assert text == text.lower() and text.strip() == text and text
            tones = [TONES[code] for code in row["unified"].split("-") if code in TONES]
            assert row["skin_tone"] == ", ".join(dict.fromkeys(tones))
            for tone in tones:
                assert re.search(rf"(: |, ){tone} skin tone(,|$)", text), text
            if not tones:
                assert "skin tone" not in text and row["unified"] == row["base"]
    bases = {split: {row["base"] for row in split_rows} for split, split_rows in rows.items()}
    assert not bases["train"] & bases["test"], "a base emoji sits across the split"
    return rows


def assert_rgba_64(path):
    with PIL.Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGBA" and image.size == (64, 64), (path, image.mode)


# ----- a hand-made package: no npm ------------------------------------------------------------------------------


def _png(mode: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if mode == "P":
        image = PIL.Image.fromarray(rng.integers(0, 4, (64, 64), dtype=np.uint8), "P")
        image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
        image.info["transparency"] = 3
    else:
        channels = {"RGBA": 4, "LA": 2}[mode]
        pixels = rng.integers(0, 256, (64, 64, channels), dtype=np.uint8)
        pixels[:16, :, -1] = 0  # a transparent band, with colour stored under it
        image = PIL.Image.fromarray(pixels, mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **({"transparency": 3} if mode == "P" else {}))
    return buffer.getvalue()


def _entry(unified, name, category, subcategory, order, tones=(), has_img=True):
    entry = {"name": name, "unified": unified, "image": f"{unified.lower()}.png", "category": category,
             "subcategory": subcategory, "sort_order": order, "short_name": name.lower().replace(" ", "_"),
             "has_img_google": has_img}
    if tones:
        entry["skin_variations"] = {
            key: {"unified": f"{unified}-{key}", "image": f"{unified}-{key}".lower() + ".png", "has_img_google": True}
            for key in tones}
    return entry


def fake_package() -> tuple[list[dict], dict[str, bytes]]:
    """emoji.json entries and PNGs: 8 smileys (one without a Google image, one whose file is missing, one grey+alpha,
    one palette), 6 people with 5 tones (one tone without a Google image), a couple with 3 two-person tones, a
    'Component' swatch, and 2 flags."""
    five = list(TONES)
    entries = [_entry(f"1F60{i}", f"SMILEY NUMBER {i}", "Smileys & Emotion", "face-smiling", i) for i in range(8)]
    entries[5]["has_img_google"] = False
    entries += [_entry(f"1F44{i}", f"HAND NUMBER {i}", "People & Body", "hand-fingers-open", 10 + i, five)
                for i in range(5)]
    entries.append(_entry("1F9D1-200D-1F9B0", "PERSON: RED HAIR", "People & Body", "person", 16, five))
    entries[-2]["skin_variations"]["1F3FE"]["has_img_google"] = False
    entries.append(_entry("1F491", "COUPLE WITH HEART", "People & Body", "family", 17,
                          ["1F3FB-1F3FB", "1F3FB-1F3FF", "1F3FF-1F3FB"]))
    entries.append(_entry("1F3FB", "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "Component", "skin-tone", 20))
    entries += [_entry("1F1EB-1F1F7", "France Flag", "Flags", "country-flag", 30),
                _entry("1F1F8-1F1ED", "St. Helena Flag", "Flags", "country-flag", 31)]
    images = {}
    for number, entry in enumerate(entries):
        for variant in [entry, *entry.get("skin_variations", {}).values()]:
            mode = {"1f603.png": "LA", "1f604.png": "P"}.get(variant["image"], "RGBA")
            images[variant["image"]] = _png(mode, seed=len(images))
    del images["1f606.png"]  # listed, but not in the package
    return entries, images


def write_tarball(path, entries, images, version=emoji_data.VERSION):
    with tarfile.open(path, "w:gz") as archive:
        def add(name, data):
            member = tarfile.TarInfo(name)
            member.size, member.mtime = len(data), 499162500
            archive.addfile(member, io.BytesIO(data))

        add("package/package.json", json.dumps({"name": emoji_data.PACKAGE, "version": version}).encode())
        add("package/emoji.json", json.dumps(entries).encode())
        for name, data in images.items():
            add(f"{emoji_data.IMAGE_PREFIX}{name}", data)
        add("package/img/google/32/1f600.png", images["1f600.png"])  # another size: not read


@pytest.fixture(scope="module")
def fake_tarball(tmp_path_factory):
    entries, images = fake_package()
    path = tmp_path_factory.mktemp("fake-emoji") / "fake.tgz"
    write_tarball(path, entries, images)
    return str(path), entries, images


def test_captions_spell_out_skin_tones():
    assert emoji_data.caption("WAVING HAND SIGN") == "waving hand sign"
    assert emoji_data.caption("WAVING HAND SIGN", ["medium"]) == "waving hand sign: medium skin tone"
    assert emoji_data.caption("MAN: RED HAIR", ["dark"]) == "man: red hair, dark skin tone"
    assert (emoji_data.caption("KISS: MAN, MAN", emoji_data.skin_tone_names("1F3FB-1F3FE"))
            == "kiss: man, man, light skin tone, medium-dark skin tone")
    assert emoji_data.skin_tone_names("1F3FC-1F3FC") == ["medium-light"]  # one tone for both: named once
    assert emoji_data.caption("St. Kitts & Nevis Flag") == "st. kitts & nevis flag"
    assert emoji_data.caption("WOMAN\u2019S HAT") == "woman's hat"
    assert [TONES[code] for code in ("1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF")] == [
        "light", "medium-light", "medium", "medium-dark", "dark"]
    with pytest.raises(ValueError, match="1F3FA"):
        emoji_data.skin_tone_names("1F3FA")


def test_split_is_by_base_emoji_per_category_and_seeded():
    # 9 categories of 40 base emoji, every fourth with 5 skin tones: about 10% of each category's images in test
    records = [{"base": f"{c}-{b}", "category": category}
               for c, category in enumerate(emoji_data.CATEGORIES) for b in range(40) for _ in range(6 if b % 4 else 1)]
    test = emoji_data.split_bases(records, seed=0, test_fraction=0.1)
    assert test == emoji_data.split_bases(records, seed=0, test_fraction=0.1)
    assert test != emoji_data.split_bases(records, seed=1, test_fraction=0.1)
    for c, category in enumerate(emoji_data.CATEGORIES):
        sizes = Counter(r["base"] for r in records if r["category"] == category)
        in_test = sum(size for base, size in sizes.items() if base in test)
        assert 0 < len(test & set(sizes)) < len(sizes)
        assert abs(in_test / sum(sizes.values()) - 0.1) < 0.03
    for fraction in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="test_fraction"):
            emoji_data.split_bases(records, test_fraction=fraction)


def test_fake_package_becomes_a_folder_split_by_base_emoji(fake_tarball, tmp_path):
    tarball, entries, images = fake_tarball
    out = tmp_path / "emoji"
    info = emoji_data.build_emoji_folder(str(out), tarball, seed=0, test_fraction=0.3)
    rows = check_folder(out)
    every = rows["train"] + rows["test"]
    names = {row["file_name"].split("/")[1] for row in every}
    # left out: the Component swatch, an image without has_img_google, a file not in the package, a tone without one
    assert "1f3fb.png" not in names and "1f605.png" not in names and "1f606.png" not in names
    assert "1f444-1f3fe.png" not in names and "1f444-1f3fd.png" in names
    assert len(every) == 6 + 5 * 6 - 1 + 6 + 4 + 2 == info["num_images"] and info["num_base_emoji"] == 6 + 6 + 1 + 2
    assert {row["category"] for row in every} == {"Smileys & Emotion", "People & Body", "Flags"}
    for split in ("train", "test"):  # every category in both splits: hfgen numbers each split's class folders
        assert {row["file_name"].split("/")[0] for row in rows[split]} == {"smileys-emotion", "people-body", "flags"}
    by_name = {row["file_name"].split("/")[1]: row for row in every}
    assert by_name["1f444-1f3fd.png"]["text"] == "hand number 4: medium skin tone"
    assert by_name["1f9d1-200d-1f9b0-1f3ff.png"]["text"] == "person: red hair, dark skin tone"
    assert by_name["1f491-1f3fb-1f3ff.png"]["text"] == "couple with heart: light skin tone, dark skin tone"
    assert by_name["1f491-1f3fb-1f3fb.png"]["text"] == "couple with heart: light skin tone"
    assert by_name["1f1f8-1f1ed.png"]["text"] == "st. helena flag"
    assert (by_name["1f600.png"]["subcategory"], by_name["1f600.png"]["category"]) == ("face-smiling", "Smileys & Emotion")
    assert {row["base"] for row in every if row["file_name"].startswith("people-body/1f491")} == {"1F491"}
    # PNGs: RGBA copied byte for byte, grey+alpha and palette converted to RGBA without losing a pixel
    for split in ("train", "test"):
        for row in rows[split]:
            path = out / split / row["file_name"]
            assert_rgba_64(path)
            assert os.stat(path).st_mtime == 499162500
            name = row["file_name"].split("/")[1]
            if name not in ("1f603.png", "1f604.png"):
                assert path.read_bytes() == images[name]
            else:
                with PIL.Image.open(io.BytesIO(images[name])) as original, PIL.Image.open(path) as written:
                    assert np.array_equal(np.asarray(original.convert("RGBA")), np.asarray(written))
    assert info["num_converted_to_rgba"] == 2
    share = len(rows["test"]) / len(every)
    assert 0.15 < share < 0.45
    assert info["counts"]["test"]["People & Body"] == sum(r["category"] == "People & Body" for r in rows["test"])

    # idempotent: the same settings leave the folder as it is; other settings are refused unless overwriting
    stamp = os.stat(out / emoji_data.INFO_FILE).st_mtime_ns
    assert emoji_data.build_emoji_folder(str(out), tarball, seed=0, test_fraction=0.3) == info
    assert os.stat(out / emoji_data.INFO_FILE).st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other settings: seed 0 \(now 1\).*overwrite"):
        emoji_data.build_emoji_folder(str(out), tarball, seed=1, test_fraction=0.3)
    again = emoji_data.build_emoji_folder(str(tmp_path / "again"), tarball, seed=0, test_fraction=0.3)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in info.items() if k != "seconds"}
    for split in ("train", "test"):  # deterministic: the same files, rows and bytes
        assert read_metadata(tmp_path / "again" / split) == rows[split]
    other = emoji_data.build_emoji_folder(str(out), tarball, seed=3, test_fraction=0.3, overwrite=True)
    assert other["seed"] == 3
    other_rows = check_folder(out)
    assert {r["base"] for r in other_rows["test"]} != {r["base"] for r in rows["test"]}


def test_fake_folder_goes_through_hfgens_folder_path(fake_tarball, tmp_path):
    from hfgen.data import open_image_source

    tarball, _, _ = fake_tarball
    emoji_data.build_emoji_folder(str(tmp_path / "emoji"), tarball, test_fraction=0.3)
    source = open_image_source(None, train_data_dir=str(tmp_path / "emoji"), caption_column="text")
    assert source.splits == ("train", "test") and source.label_column == "label" and source.num_channels == 3
    assert list(source.id2label.values()) == ["flags", "people-body", "smileys-emotion"]
    test = source.dataset("test", 16)
    image, label = test[0]
    assert image.shape == (3, 16, 16) and 0 <= int(label) < 3
    assert all(caption == caption.lower() for caption in test.captions)


def test_bad_inputs_are_refused(fake_tarball, tmp_path):
    _, entries, images = fake_tarball
    wrong = tmp_path / "wrong.tgz"
    write_tarball(wrong, entries, images, version="15.1.0")
    with pytest.raises(ValueError, match="emoji-datasource-google@15.1.0, not emoji-datasource-google@16.0.0"):
        emoji_data.build_emoji_folder(str(tmp_path / "a"), str(wrong))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an emoji folder built by this script"):
        emoji_data.build_emoji_folder(str(tmp_path / "mine"), fake_tarball[0])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="test_fraction"):
        emoji_data.build_emoji_folder(str(tmp_path / "b"), fake_tarball[0], test_fraction=0.0)
    assert emoji_data.main(["--output_dir", str(tmp_path / "c"), "--tarball", str(tmp_path / "missing.tgz")]) == 1


# ----- the real package: fetched with npm ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def emoji_tarball():
    try:
        return emoji_data.fetch_tarball()  # $HFGEN_CACHE/emoji: once per session (conftest sets HFGEN_CACHE)
    except RuntimeError as error:
        pytest.skip(f"the emoji package could not be fetched: {error}")


@pytest.fixture(scope="module")
def emoji_folder(emoji_tarball, tmp_path_factory):
    folder = tmp_path_factory.mktemp("emoji") / "emoji"
    info = emoji_data.build_emoji_folder(str(folder), emoji_tarball)
    return folder, info


def test_real_emoji_folder_splits_and_metadata(emoji_folder):
    folder, info = emoji_folder
    rows = check_folder(folder)
    every = rows["train"] + rows["test"]
    assert len(every) == info["num_images"] == 3781  # 3,786 images less the 5 'Component' swatches
    assert len({row["base"] for row in every}) == info["num_base_emoji"] == 1906
    assert {row["category"] for row in every} == set(emoji_data.CATEGORIES)
    assert len({row["subcategory"] for row in every}) == 98
    assert 0.09 <= len(rows["test"]) / len(every) <= 0.11
    for category in emoji_data.CATEGORIES:
        train, test = info["counts"]["train"][category], info["counts"]["test"][category]
        assert 0.07 <= test / (train + test) <= 0.13, category
    for split in ("train", "test"):
        assert sorted(os.listdir(folder / split)) == sorted([*FOLDERS, "metadata.jsonl"])
        for row in rows[split]:
            assert_rgba_64(folder / split / row["file_name"])
    texts = {row["unified"]: row["text"] for row in every}
    assert texts["1F44B-1F3FD"] == "waving hand sign: medium skin tone"
    assert texts["1F44B"] == "waving hand sign"
    assert texts["1F639"] == "cat face with tears of joy"
    assert sum("skin tone" in text for text in texts.values()) == 3781 - 1906  # every skin variation, and only them


def test_real_emoji_folder_is_deterministic(emoji_folder, emoji_tarball, tmp_path):
    folder, info = emoji_folder
    again = tmp_path / "again"
    emoji_data.build_emoji_folder(str(again), emoji_tarball, seed=0)
    for split in ("train", "test"):
        assert png_files(again / split) == png_files(folder / split)
        assert read_metadata(again / split) == read_metadata(folder / split)
    entries, images, _ = emoji_data.read_package(emoji_tarball)
    records = emoji_data.emoji_records(entries, images)
    assert emoji_data.split_bases(records, seed=0) == {row["base"] for row in read_metadata(folder / "test")}
    assert emoji_data.split_bases(records, seed=1) != emoji_data.split_bases(records, seed=0)


def test_real_emoji_folder_through_hfgens_folder_path(emoji_folder):
    from hfgen.data import open_image_source

    folder, info = emoji_folder
    source = open_image_source(None, train_data_dir=str(folder), caption_column="text")
    assert source.splits == ("train", "test") and source.test_split == "test"
    assert source.label_column == "label" and source.caption_column == "text" and source.num_channels == 3
    assert list(source.id2label.values()) == sorted(FOLDERS) and len(source.id2label) == 9
    assert source.rows["test"].features["label"].names == source.rows["train"].features["label"].names
    train, test = source.dataset("train", 32), source.dataset("test", 32)
    assert (len(train), len(test)) == tuple(sum(info["counts"][split].values()) for split in ("train", "test"))
    assert test.labels.bincount(minlength=9).min() > 0
    image, label = test[0]
    assert image.shape == (3, 32, 32) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert all(isinstance(caption, str) and caption == caption.lower() for caption in train.captions)

"""The Noto Emoji as an image folder: real colour images (64x64 RGBA, transparent backgrounds) that hfgen's ordinary
folder path (`--train_data_dir`, `hfgen.data.open_image_source(train_data_dir=...)`) reads.

    python benchmarks/data/emoji.py --output_dir emoji [--tarball PATH] [--seed 0] [--test_fraction 0.1]

The source is the npm package emoji-datasource-google@16.0.0 (Apache-2.0 images): `npm pack` fetches its tarball
(once, into $HFGEN_CACHE/emoji, else $HF_HOME/hfgen/emoji), checked against a pinned SHA-256; `--tarball` reads one
fetched before. Only Python's tarfile reads it: nothing in it is extracted or run as it is.

The folder it writes:

    emoji/
      emoji_dataset.json            what was built from what (package, tarball checksum, seed, fraction, counts)
      train/
        metadata.jsonl              one row per image: file_name (relative to train/), category, subcategory, text, ...
        smileys-emotion/1f600.png
        people-body/1f44b-1f3fd.png
        ...                         one folder per category (9; "Component", the bare skin-tone swatches, left out)
      test/
        metadata.jsonl
        ...

- Labels come from the class folders (sorted folder names: activities, animals-nature, flags, food-drink, objects,
  people-body, smileys-emotion, symbols, travel-places). metadata.jsonl has no `label` column on purpose: hfgen's
  folder scan would take it instead of the folders. `category` keeps the human name ("Smileys & Emotion").
- `text` is the emoji's name as a lower-case caption, with the skin tone spelled out as Unicode's CLDR names do:
  "waving hand sign: medium skin tone", "man: red hair, dark skin tone",
  "kiss: man, man, light skin tone, medium-dark skin tone". Use it with `caption_column="text"` (the trainers'
  `--caption_column text`).
- Other columns: `subcategory` (98 of them, e.g. "face-smiling", "food-fruit"), `unified` (the image's code points),
  `base` (its base emoji's code points), `skin_tone` ("" or e.g. "medium", "light, dark"), `short_name`.
- The split is by base emoji: an emoji and all its skin-tone variants sit in the same split. Within each category
  the base emoji are shuffled with `seed` and taken into the test split until its images come nearest to
  `test_fraction` of the category's images, so every category is in both splits with about the same share.
- The PNGs are copied byte for byte (3,722 of 3,786 are 8-bit RGBA). The other 64 (62 grey+alpha "LA", 2 palette
  with a transparent colour) are converted to RGBA losslessly, so that every file is RGBA and a grey file that sorts
  first cannot make hfgen read the whole folder as grey. Files keep the tarball's modification time, so a rebuilt
  folder has the same fingerprint and hfgen's caches of it stay valid.
- Only images whose file is in the tarball and whose `has_img_google` is true are kept.

Writing is atomic: the folder is built in OUTPUT_DIR.incomplete and renamed when complete. Run again with the
same settings, it only prints the counts; with other settings it refuses unless `--overwrite` is given.
`build_emoji_folder(...)` does the same from Python (tests and benchmarks load this file with importlib).
"""

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter

PACKAGE = "emoji-datasource-google"
VERSION = "16.0.0"
TARBALL_NAME = f"{PACKAGE}-{VERSION}.tgz"
TARBALL_SHA256 = "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438"  # the registry's 16.0.0 tarball
IMAGE_PREFIX = "package/img/google/64/"
EMOJI_JSON = "package/emoji.json"
PACKAGE_JSON = "package/package.json"
INFO_FILE = "emoji_dataset.json"
FORMAT_VERSION = 1  # bumped when the layout or the metadata changes: an older folder is then built again

# emoji.json's categories (in its order) -> folder names safe on every file system
CATEGORIES = {
    "Smileys & Emotion": "smileys-emotion",
    "People & Body": "people-body",
    "Animals & Nature": "animals-nature",
    "Food & Drink": "food-drink",
    "Travel & Places": "travel-places",
    "Activities": "activities",
    "Objects": "objects",
    "Symbols": "symbols",
    "Flags": "flags",
}
LEFT_OUT_CATEGORIES = ("Component",)  # the five bare skin-tone swatches
# the Fitzpatrick modifiers in emoji.json's skin_variations keys ("1F3FD", or "1F3FB-1F3FF" for two people)
SKIN_TONES = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}
IMAGE_NAME = re.compile(r"[0-9a-f]+(-[0-9a-f]+)*\.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPLITS = ("train", "test")


# ----- fetching ------------------------------------------------------------------------------------------------


def default_cache_dir() -> str:
    """$HFGEN_CACHE/emoji, else $HF_HOME/hfgen/emoji (as hfgen.utils.hfgen_cache_dir, without importing hfgen)."""
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.environ.get("HFGEN_CACHE") or os.path.join(hf_home, "hfgen"), "emoji")


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_tarball(cache_dir: str | None = None, timeout: float = 300) -> str:
    """The path of emoji-datasource-google-16.0.0.tgz in `cache_dir`, fetched with `npm pack` unless already there.

    Raises RuntimeError when npm is missing or the fetch fails, and when the fetched file is not the pinned one."""
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, TARBALL_NAME)
    if os.path.isfile(path) and sha256_of(path) == TARBALL_SHA256:
        return path
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"`npm` is not on PATH: install Node.js, or fetch {PACKAGE}@{VERSION} with `npm pack` "
                           "elsewhere and pass the tarball with --tarball")
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".npm-pack-") as work:
        command = [npm, "pack", f"{PACKAGE}@{VERSION}", "--ignore-scripts", "--pack-destination", work]
        try:
            result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"`npm pack {PACKAGE}@{VERSION}` did not finish in {timeout:.0f} s") from error
        fetched = os.path.join(work, TARBALL_NAME)
        if result.returncode != 0 or not os.path.isfile(fetched):
            raise RuntimeError(f"`npm pack {PACKAGE}@{VERSION}` failed (exit code {result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-1000:]}")
        checksum = sha256_of(fetched)
        if checksum != TARBALL_SHA256:
            raise RuntimeError(f"the fetched {TARBALL_NAME} has SHA-256 {checksum}, not the pinned {TARBALL_SHA256}")
        os.replace(fetched, path)  # atomic: a concurrent or killed fetch never leaves half a tarball under `path`
    return path


# ----- reading the package -----------------------------------------------------------------------------------


def read_package(tarball: str) -> tuple[list[dict], dict[str, tuple[bytes, int]], dict]:
    """emoji.json's entries, {image file name: (PNG bytes, modification time)} of img/google/64/, and package.json.

    One pass through the gzip stream (a .tgz cannot be read out of order cheaply); nothing is written to disk."""
    entries, images, package = None, {}, None
    with tarfile.open(tarball, "r:gz") as archive:
        for member in archive:
            if not member.isfile():
                continue
            if member.name.startswith(IMAGE_PREFIX) and "/" not in member.name[len(IMAGE_PREFIX):]:
                images[member.name[len(IMAGE_PREFIX):]] = (archive.extractfile(member).read(), int(member.mtime))
            elif member.name == EMOJI_JSON:
                entries = json.loads(archive.extractfile(member).read().decode("utf-8"))
            elif member.name == PACKAGE_JSON:
                package = json.loads(archive.extractfile(member).read().decode("utf-8"))
    if entries is None or package is None:
        raise ValueError(f"{tarball!r} is not an npm tarball of {PACKAGE}: it has no {EMOJI_JSON} or {PACKAGE_JSON}")
    if (package.get("name"), package.get("version")) != (PACKAGE, VERSION):
        raise ValueError(f"{tarball!r} holds {package.get('name')}@{package.get('version')}, not {PACKAGE}@{VERSION}")
    return entries, images, package


def skin_tone_names(key: str) -> list[str]:
    """A skin_variations key -> its tones: "1F3FD" -> ["medium"]; "1F3FB-1F3FF" -> ["light", "dark"];
    "1F3FB-1F3FB" (two people, one tone) -> ["light"], as CLDR names it."""
    tones = []
    for code in key.upper().split("-"):
        if code not in SKIN_TONES:
            raise ValueError(f"unknown skin tone modifier {code!r} in skin_variations key {key!r}")
        if SKIN_TONES[code] not in tones:
            tones.append(SKIN_TONES[code])
    return tones


def caption(name: str, tones: list[str] = ()) -> str:
    """The emoji's name as a lower-case caption with its skin tones spelled out, as CLDR's names do:
    ("WAVING HAND SIGN", ["medium"]) -> "waving hand sign: medium skin tone";
    ("MAN: RED HAIR", ["dark"]) -> "man: red hair, dark skin tone"."""
    text = " ".join(name.replace("\u2019", "'").lower().split())
    if tones:
        spelled = ", ".join(f"{tone} skin tone" for tone in tones)
        text = f"{text}, {spelled}" if ":" in text else f"{text}: {spelled}"
    return text


def emoji_records(entries: list[dict], available: set | dict) -> list[dict]:
    """One record per image kept: the base emoji's and each skin variation's whose file is `available` and whose
    `has_img_google` is true; categories in LEFT_OUT_CATEGORIES are left out."""
    records = []
    for entry in sorted(entries, key=lambda entry: (entry.get("sort_order", 0), entry["unified"])):
        category = entry["category"]
        if category in LEFT_OUT_CATEGORIES:
            continue
        if category not in CATEGORIES:
            raise ValueError(f"emoji {entry['unified']} ({entry['name']}) has the category {category!r}, which is "
                             f"not one of {PACKAGE} {VERSION}'s: {', '.join(CATEGORIES)}")
        variants = [(entry, [])] + [(variation, skin_tone_names(key))
                                    for key, variation in sorted((entry.get("skin_variations") or {}).items())]
        for variant, tones in variants:
            image = variant["image"]
            if not IMAGE_NAME.fullmatch(image):
                raise ValueError(f"emoji {variant['unified']} names an unexpected image file {image!r}")
            if not variant.get("has_img_google") or image not in available:
                continue
            records.append({
                "image": image,
                "category": category,
                "subcategory": entry["subcategory"],
                "text": caption(entry["name"], tones),
                "unified": variant["unified"],
                "base": entry["unified"],
                "skin_tone": ", ".join(tones),
                "short_name": entry.get("short_name") or "",
            })
    return records


def split_bases(records: list[dict], seed: int = 0, test_fraction: float = 0.1) -> set[str]:
    """The base emoji (`base` code points) of the test split.

    Per category (in CATEGORIES' order), its base emoji sorted by code points are shuffled with one
    random.Random(seed), and each is taken into the test split when that brings the category's test images
    nearer to round(test_fraction x its images), at least 1; at least one base emoji stays in each split."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be between 0 and 1 (exclusive), got {test_fraction!r}")
    sizes = Counter(record["base"] for record in records)
    category_of = {record["base"]: record["category"] for record in records}
    rng = random.Random(seed)
    test = set()
    for category in CATEGORIES:
        bases = sorted(base for base in sizes if category_of[base] == category)
        if len(bases) < 2:
            if bases:
                raise ValueError(f"category {category!r} has a single base emoji: it cannot be in both splits")
            continue
        rng.shuffle(bases)
        target = max(1, round(test_fraction * sum(sizes[base] for base in bases)))
        taken, chosen = 0, []
        for base in bases[:-1]:  # the last one always trains
            if abs(taken + sizes[base] - target) < abs(taken - target):
                chosen.append(base)
                taken += sizes[base]
        test.update(chosen or bases[:1])
    return test


# ----- writing -----------------------------------------------------------------------------------------------


def _png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR, or None when `data` is not a PNG."""
    if len(data) < 26 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">IIBB", data[16:26])


def rgba_png(data: bytes, name: str) -> tuple[bytes, bool]:
    """The PNG bytes as they are when they are 8-bit RGBA (colour type 6), else losslessly converted to RGBA;
    and whether they were converted."""
    header = _png_header(data)
    if header is not None and header[2:] == (8, 6):
        return data, False
    import PIL.Image

    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
    except Exception as error:
        raise ValueError(f"{IMAGE_PREFIX}{name} is not a readable image: {error}") from error
    buffer = io.BytesIO()
    image.convert("RGBA").save(buffer, format="PNG")
    return buffer.getvalue(), True


def _settings(tarball: str, seed: int, test_fraction: float) -> dict:
    return {"package": f"{PACKAGE}@{VERSION}", "tarball_sha256": sha256_of(tarball), "seed": seed,
            "test_fraction": test_fraction, "format_version": FORMAT_VERSION}


def _read_info(output_dir: str) -> dict | None:
    try:
        with open(os.path.join(output_dir, INFO_FILE), encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _write_split(folder: str, records: list[dict], images: dict) -> int:
    """Writes one split's PNGs and metadata.jsonl; returns how many PNGs were converted to RGBA."""
    converted, rows = 0, []
    for folder_name in sorted({CATEGORIES[record["category"]] for record in records}):
        os.makedirs(os.path.join(folder, folder_name))
    for record in records:
        relative = f"{CATEGORIES[record['category']]}/{record['image']}"
        data, mtime = images[record["image"]]
        data, was_converted = rgba_png(data, record["image"])
        converted += was_converted
        path = os.path.join(folder, *relative.split("/"))
        with open(path, "wb") as file:
            file.write(data)
        os.utime(path, (mtime, mtime))  # the tarball's time: a rebuilt folder keeps hfgen's fingerprint
        row = {"file_name": relative}
        row.update({key: value for key, value in record.items() if key != "image"})
        rows.append(row)
    rows.sort(key=lambda row: row["file_name"])
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as file:
        for row in rows:  # ASCII-escaped: any reader's default encoding reads it
            file.write(json.dumps(row, ensure_ascii=True) + "\n")
    return converted


def build_emoji_folder(output_dir: str, tarball: str | None = None, seed: int = 0, test_fraction: float = 0.1,
                       cache_dir: str | None = None, overwrite: bool = False, verbose: bool = False) -> dict:
    """Builds the emoji image folder in `output_dir` (see the module's docstring) and returns what
    `emoji_dataset.json` records: the settings, and `counts` {split: {category: images}}, `num_base_emoji`,
    `num_converted_to_rgba`, `seconds`.

    Args:
        output_dir: the folder to write; built in `output_dir`.incomplete and renamed when complete.
        tarball: emoji-datasource-google-16.0.0.tgz; None fetches it with `npm pack` into `cache_dir`.
        seed, test_fraction: the split (see `split_bases`).
        cache_dir: where a fetched tarball is kept (default $HFGEN_CACHE/emoji, else $HF_HOME/hfgen/emoji).
        overwrite: replace a folder built with other settings (refused otherwise).
        verbose: print the counts per split and category.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be between 0 and 1 (exclusive), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an integer, got {seed!r}")
    start = time.perf_counter()
    output_dir = os.path.abspath(output_dir)
    tarball = tarball or fetch_tarball(cache_dir)
    if not os.path.isfile(tarball):
        raise ValueError(f"`tarball` {tarball!r} is not a file")
    settings = _settings(tarball, seed, test_fraction)
    if os.path.lexists(output_dir):
        info = _read_info(output_dir)
        if info is not None and {key: info.get(key) for key in settings} == settings:
            if verbose:
                print(f"{output_dir} is already built with these settings")
                print_counts(info)
            return info
        if info is None and not (os.path.isdir(output_dir) and not os.listdir(output_dir)):
            raise ValueError(f"`output_dir` {output_dir!r} exists and is not an emoji folder built by this script: "
                             "choose another folder")
        if info is not None and not overwrite:
            differ = ", ".join(f"{key} {info.get(key)!r} (now {value!r})" for key, value in settings.items()
                               if info.get(key) != value)
            raise ValueError(f"`output_dir` {output_dir!r} was built with other settings: {differ}; pass "
                             "--overwrite (overwrite=True) to replace it, or choose another folder")

    entries, images, _ = read_package(tarball)
    records = emoji_records(entries, images)
    if not records:
        raise ValueError(f"{tarball!r} has no image of {', '.join(CATEGORIES)} with has_img_google")
    test_bases = split_bases(records, seed, test_fraction)
    by_split = {"train": [r for r in records if r["base"] not in test_bases],
                "test": [r for r in records if r["base"] in test_bases]}

    incomplete = output_dir + ".incomplete"
    if os.path.lexists(incomplete):  # what a killed run left
        shutil.rmtree(incomplete)
    os.makedirs(incomplete)
    converted = sum(_write_split(os.path.join(incomplete, split), by_split[split], images) for split in SPLITS)
    info = dict(settings)
    info.update({
        "counts": {split: {category: sum(r["category"] == category for r in by_split[split])
                           for category in CATEGORIES} for split in SPLITS},
        "num_images": len(records),
        "num_base_emoji": len({r["base"] for r in records}),
        "num_test_base_emoji": len(test_bases),
        "num_converted_to_rgba": converted,
        "folders": dict(CATEGORIES),
        "license": "images: Apache-2.0 (Noto Emoji, via emoji-datasource-google); metadata: MIT (emoji-data)",
    })
    info["seconds"] = round(time.perf_counter() - start, 2)
    with open(os.path.join(incomplete, INFO_FILE), "w", encoding="utf-8") as file:
        json.dump(info, file, indent=1)
        file.write("\n")

    if os.path.lexists(output_dir):  # an empty folder, or an older build being overwritten: moved aside, then gone
        old = output_dir + ".old"
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.replace(output_dir, old)
        os.replace(incomplete, output_dir)
        shutil.rmtree(old)
    else:
        os.replace(incomplete, output_dir)
    if verbose:
        print(f"wrote {output_dir} in {info['seconds']:.1f} s")
        print_counts(info)
    return info


def print_counts(info: dict) -> None:
    """A table of images per category and split, and the totals."""
    counts = info["counts"]
    width = max(len(category) for category in CATEGORIES)
    print(f"{'category':<{width}}  {'train':>6}  {'test':>6}  {'test %':>6}")
    for category in CATEGORIES:
        train, test = counts["train"][category], counts["test"][category]
        share = 100 * test / (train + test) if train + test else 0.0
        print(f"{category:<{width}}  {train:>6}  {test:>6}  {share:>5.1f}%")
    train, test = sum(counts["train"].values()), sum(counts["test"].values())
    print(f"{'total':<{width}}  {train:>6}  {test:>6}  {100 * test / max(1, train + test):>5.1f}%"
          f"   ({info['num_base_emoji']} base emoji, {info['num_test_base_emoji']} of them in test)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="the image folder to write (train/ and test/ inside)")
    parser.add_argument("--tarball", default=None,
                        help=f"{TARBALL_NAME} fetched before; default: `npm pack` fetches it into the cache")
    parser.add_argument("--seed", type=int, default=0, help="the split's seed (default 0)")
    parser.add_argument("--test_fraction", type=float, default=0.1,
                        help="share of each category's images in the test split (default 0.1)")
    parser.add_argument("--cache_dir", default=None,
                        help="where the fetched tarball is kept "
                             "(default $HFGEN_CACHE/emoji, else $HF_HOME/hfgen/emoji)")
    parser.add_argument("--overwrite", action="store_true", help="replace a folder built with other settings")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        build_emoji_folder(args.output_dir, args.tarball, seed=args.seed, test_fraction=args.test_fraction,
                           cache_dir=args.cache_dir, overwrite=args.overwrite, verbose=True)
    except (ValueError, TypeError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How image files become the pixels a model sees: transparency, bit depth, orientation, channels, metadata
files, and the pixel cache (the same batches with and without it, in RAM and on disk, across workers and
resumes). Every image is made in the test; each check reads the values the model would get."""

import gc
import json
import logging
import os

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import interrupt_then_resume, quick_training_args, same_weights

from hfgen import cache_files
from hfgen.data import image_batches, open_image_source, to_pixels, training_dataloader
from hfgen.data.pixel_cache import PixelCache
from hfgen.image_processing import preprocess
from hfgen.training import train_vae

RED, WHITE = (255, 0, 0), (255, 255, 255)


def train_pixels(folder, resolution=8, num_channels=None, **options):
    """Every training image of `folder` as the model sees it, (N, C, H, W) in [0, 1], in file order."""
    source = open_image_source(None, str(folder))
    data = source.dataset("train", resolution, num_channels, center_crop=True, **options)
    return torch.cat([images for images, _ in image_batches(data, shuffle=False)])


def transparent_square(mode: str) -> PIL.Image.Image:
    """An 8x8 image: a 4x4 opaque blue (or grey) square on a fully transparent background whose hidden colour
    is red (or mid-grey)."""
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = RED, 0
    rgba[2:6, 2:6] = (0, 0, 255, 255)
    image = PIL.Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        la = np.zeros((8, 8, 2), dtype=np.uint8)
        la[..., 0], la[2:6, 2:6] = 128, (0, 255)
        return PIL.Image.fromarray(la, "LA")
    if mode == "P":  # a palette with a transparent index (tRNS), as GIFs and small PNGs have
        palette = PIL.Image.new("P", (8, 8), 0)
        palette.putpalette([*RED, 0, 0, 255] + [0] * 762)
        palette.paste(1, (2, 2, 6, 6))
        palette.info["transparency"] = 0
        return palette
    return image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_onto_the_background_not_their_hidden_colour(mode, tmp_path):
    transparent_square(mode).save(tmp_path / "shape.png")
    pixels = train_pixels(tmp_path, num_channels=3)[0]
    assert torch.equal(pixels[:, 0, 0], torch.ones(3))  # white, not the red stored under alpha 0
    assert torch.equal(pixels[:, 4, 4], torch.tensor([0.0, 0.0, 1.0]) if mode != "LA" else torch.zeros(3))
    black = train_pixels(tmp_path, num_channels=3, background_color=(0, 0, 0))[0]
    assert torch.equal(black[:, 0, 0], torch.zeros(3)) and torch.equal(black[:, 4, 4], pixels[:, 4, 4])
    # the same rule for images given to a pipeline (VAEPipeline.encode / reconstruct, the demo's uploads)
    given = preprocess(PIL.Image.open(tmp_path / "shape.png"), 3, 8)[0]
    assert torch.equal(given, pixels)


def test_16_and_32_bit_images_are_scaled_by_their_range_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    eight = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    eight[0, 0] = 128
    (tmp_path / "8").mkdir()
    (tmp_path / "16").mkdir()
    PIL.Image.fromarray(eight, "L").save(tmp_path / "8" / "a.png")
    sixteen = PIL.Image.fromarray(eight.astype(np.uint16) * 257)  # the same image at 16 bits
    assert sixteen.mode == "I;16"
    sixteen.save(tmp_path / "16" / "a.png")
    assert PIL.Image.open(tmp_path / "16" / "a.png").mode == "I;16"
    from_8, from_16 = train_pixels(tmp_path / "8"), train_pixels(tmp_path / "16")
    assert from_16.shape == (1, 1, 8, 8) and (from_16 - from_8).abs().max() <= 1 / 255
    assert from_16[0, 0, 0, 0].item() == pytest.approx(128 / 255)  # mid-grey stays mid-grey (clipping made it 1)
    assert (from_16 == 1).float().mean() < 0.05
    mid_grey = PIL.Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    for image in (mid_grey, mid_grey.convert("I"), PIL.Image.fromarray(np.full((4, 4), 0.5, np.float32), "F")):
        assert np.asarray(to_pixels(image, 1))[0, 0] == 128, image.mode
    with pytest.raises(ValueError, match="32-bit float image with values in"):
        to_pixels(PIL.Image.fromarray(np.full((4, 4), 3.0, np.float32), "F"), 1)


def test_exif_orientation_is_applied_before_resizing(tmp_path):
    stored = np.zeros((4, 8), dtype=np.uint8)  # 8 wide, 4 high, as the sensor stored it
    stored[:, :2] = 255  # a bright left edge
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    PIL.Image.fromarray(stored, "L").save(tmp_path / "photo.png", exif=exif)
    source = open_image_source(None, str(tmp_path))
    header = source.headers("train")[0]
    assert (header.width, header.height) == (4, 8)  # upright: portrait
    data = source.dataset("train", 4, center_crop=True, resize=False)
    upright = np.rot90(stored, k=-1)  # the bright edge is now the top
    assert torch.equal(data[0][0][0], torch.from_numpy(upright[2:6].astype(np.float32) / 255))


def test_a_folder_is_rgb_if_any_image_is_in_colour_and_the_choice_is_logged(tmp_path, caplog):
    PIL.Image.new("L", (8, 8), 40).save(tmp_path / "a-grey.png")  # listed first
    PIL.Image.new("L", (8, 8), 90).save(tmp_path / "b-grey.png")
    PIL.Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "c-red.png")
    with caplog.at_level(logging.INFO, logger="hfgen.data.sources"):
        pixels = train_pixels(tmp_path)
    assert pixels.shape == (3, 3, 8, 8)
    assert torch.allclose(pixels[2, :, 0, 0], torch.tensor([200, 10, 10]) / 255)  # the colour is kept
    assert torch.allclose(pixels[0, :, 0, 0], torch.full((3,), 40 / 255))  # grey images become grey RGB
    assert "3 channels (decided from the training images): 1 colour and 2 grey images" in caplog.text
    assert train_pixels(tmp_path, num_channels=1).shape == (3, 1, 8, 8)  # unless --num_channels says otherwise


def write_metadata_folder(folder, lines):
    folder.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        PIL.Image.new("L", (8, 8)).save(folder / name)
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def test_metadata_errors_name_the_file_and_the_line(tmp_path):
    rows = [json.dumps({"file_name": "a.png", "text": "an a"}), "", '{"file_name": "b.png" "text": "a b"}']
    write_metadata_folder(tmp_path / "bad", rows)
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 3: not a JSON object"):
        open_image_source(None, str(tmp_path / "bad"))
    (tmp_path / "csv").mkdir()
    PIL.Image.new("L", (8, 8)).save(tmp_path / "csv" / "a.png")
    (tmp_path / "csv" / "metadata.csv").write_text("file_name,text\na.png,an a,extra\n")
    with pytest.raises(ValueError, match=r"metadata\.csv, line 2: 3 columns where the header names 2"):
        open_image_source(None, str(tmp_path / "csv"))


def test_metadata_rows_without_files_and_files_without_rows_are_named_or_skipped(tmp_path, caplog):
    rows = [json.dumps({"file_name": name, "text": name}) for name in ("a.png", "b.png", "gone.png")]
    write_metadata_folder(tmp_path / "missing", rows)
    with pytest.raises(ValueError, match=r"line 3: `file_name` 'gone.png' is not an image file.*--skip_corrupt_images"):
        open_image_source(None, str(tmp_path / "missing"))
    with caplog.at_level(logging.WARNING, logger="hfgen.data.sources"):
        source = open_image_source(None, str(tmp_path / "missing"), caption_column="text", skip_corrupt_images=True)
    assert "skipped 1 rows of" in caplog.text and "'gone.png'" in caplog.text
    assert source.dataset("train", 8).captions == ["a.png", "b.png"]
    write_metadata_folder(tmp_path / "unlisted", [json.dumps({"file_name": "a.png", "text": "a"})])
    with pytest.raises(ValueError, match=r"image .*b\.png has no row in .*metadata\.jsonl"):
        open_image_source(None, str(tmp_path / "unlisted"))
    assert len(open_image_source(None, str(tmp_path / "unlisted"), skip_corrupt_images=True).dataset("train", 8)) == 1


# ----- the pixel cache ------------------------------------------------------------------------------------


@pytest.fixture
def odd_folder(tmp_path):
    """20 RGB images of odd sizes (portrait and landscape): random crops differ from the center."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        width, height = 12 + i % 5, 9 + i % 3
        PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def epoch_batches(data, epoch, num_workers):
    data.set_epoch(epoch)
    return [batch for batch in training_dataloader(data, batch_size=4, seed=0, num_workers=num_workers)]


@pytest.mark.parametrize("memory_gb", [2.0, 0.0], ids=["in RAM", "on disk"])
def test_cached_and_uncached_batches_are_identical_with_crops_flips_and_workers(odd_folder, memory_gb, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path / "cache"))
    options = dict(augment=True, random_flip=True, seed=3)
    uncached = open_image_source(None, str(odd_folder)).dataset("train", 8, pixel_cache_memory_gb=None, **options)
    cached = open_image_source(None, str(odd_folder)).dataset("train", 8, pixel_cache_memory_gb=memory_gb, **options)
    assert uncached.pixel_cache is None and cached.pixel_cache is not None
    for epoch in range(3):
        expected = epoch_batches(uncached, epoch, num_workers=0)
        got = epoch_batches(cached, epoch, num_workers=2)  # forked workers fill the cache the process then reads
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))
    assert (cached.pixel_cache.status == 1).all()
    if memory_gb == 0:  # on disk: complete, sealed, and read by the next run without decoding
        path = cached.pixel_cache.path
        assert path.endswith(".pixels") and cache_files.is_intact(path)
        del cached  # this process no longer holds the cache: the next dataset opens the file
        gc.collect()
        expected, decoded = epoch_batches(uncached, 5, 0), []
        monkeypatch.setattr("hfgen.data.image_datasets.decode_image", lambda *a: decoded.append(a) or None)
        again = open_image_source(None, str(odd_folder)).dataset("train", 8, pixel_cache_memory_gb=0, **options)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(expected, epoch_batches(again, 5, 0)))
        assert decoded == []


def test_a_broken_pixel_cache_file_is_rebuilt_with_one_log_line(odd_folder, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path / "cache"))

    def cached_dataset():
        data = open_image_source(None, str(odd_folder)).dataset("train", 8, pixel_cache_memory_gb=0)
        list(image_batches(data, shuffle=False))  # one pass fills and seals the file
        return data

    first = cached_dataset()
    path = first.pixel_cache.path
    expected = torch.cat([images for images, _ in image_batches(first, shuffle=False)])
    size = os.path.getsize(path)
    del first  # this process no longer holds the cache: the next dataset opens the file
    gc.collect()
    for damage in ("zeroed", "truncated"):
        with open(path, "r+b") as file:
            if damage == "zeroed":
                file.seek(20)
                file.write(bytes(size - 20))  # at its full size
            else:
                file.truncate(size // 2)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            data = cached_dataset()
        assert f"rebuilding the pixel cache: {path} cannot be trusted" in caplog.text
        assert torch.equal(torch.cat([images for images, _ in image_batches(data, shuffle=False)]), expected)
        assert cache_files.is_intact(path)
        del data
        gc.collect()


def test_a_pixel_cache_slot_holds_what_it_was_given():
    shapes = np.array([[2, 3, 1], [4, 4, 3], [0, 0, 0]])
    cache = PixelCache.in_memory(shapes)
    assert len(cache.array) == 3 + 6 + 48 and cache.get(0) is None
    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    cache.put(1, pixels)
    cache.put(0, np.zeros((3, 2, 1), dtype=np.uint8))  # another shape than its header said: not stored
    cache.put(2, None)  # corrupt
    assert np.array_equal(cache.get(1), pixels) and cache.get(0) is None and cache.get(2) is None
    assert cache.status.tolist() == [0, 1, 2] and not cache.complete


def test_a_resumed_run_with_a_disk_cache_ends_as_an_uncached_one(odd_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HFGEN_CACHE", str(tmp_path / "cache"))
    flags = ["--train_data_dir", str(odd_folder), "--resolution", "8", "--train_batch_size", "4", "--random_flip",
             "--architecture", "conv", "--hidden_dims", "8", "16", "--latent_dim", "4", "--max_train_steps", "12",
             "--checkpointing_steps", "5", "--feature_extractor", "none", "--eval_num_samples", "4",
             "--eval_importance_samples", "2", "--num_validation_images", "4"]
    train_vae.main(quick_training_args(tmp_path / "uncached", *flags, "--no_pixel_cache"))
    cached = quick_training_args(tmp_path / "cached", *flags, "--pixel_cache_memory_gb", "0")
    interrupt_then_resume(monkeypatch, train_vae.main, train_vae.VAETrainer, cached, 7)
    assert same_weights(tmp_path / "uncached", tmp_path / "cached", "vae")


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16", "1"])
def test_png_headers_parsed_directly_agree_with_pil(mode, tmp_path):
    from hfgen.data.transforms import png_header, read_header

    image = PIL.Image.new(mode, (7, 5))
    image.save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    assert png_header(data) == read_header(PIL.Image.open(tmp_path / "a.png"))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.new("RGB", (7, 5)).save(tmp_path / "b.png", exif=exif)
    PIL.Image.new("RGB", (7, 5)).save(tmp_path / "c.jpg")
    for name in ("b.png", "c.jpg"):  # orientation, and other formats, are PIL's to read
        assert png_header((tmp_path / name).read_bytes()) is None

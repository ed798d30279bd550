"""Decoded pixels of an image folder, kept after their first decoding so that later epochs do not decode again.

Each image's `ImageTransform.prepare` output (uint8 (H, W, C), resized, before random crops and flips) has a
fixed place in one buffer, laid out from the images' headers before training: N status bytes (0 empty,
1 filled, 2 a corrupt image), then the pixels of image 0, 1, ... Whoever decodes an image first (the main
process or a DataLoader worker) writes it there; crops and flips are drawn afterwards exactly as without the
cache, so batches are the same with and without it.

- In RAM (`PixelCache.in_memory`) while the buffer fits a budget: anonymous shared memory, which forked
  DataLoader workers write into and the main process sees (under a "spawn" start method a worker decodes
  without it).
- Otherwise in a memory-mapped file under $HFGEN_CACHE/pixels (`PixelCache.on_disk`), keyed by the images'
  fingerprint and the transform, as the latent cache is. A run fills a file of its own
  (`<key>.incomplete-<pid>`); once every image is in it, it is sealed (hfgen.cache_files: size and checksum)
  and renamed to `<key>.pixels`, which later runs open read-only after checking it. A file that fails the
  check is rebuilt with one log line. Memory stays O(batch): the file's pages belong to the page cache.
"""

import hashlib
import itertools
import logging
import mmap
import os
import weakref

import numpy as np

from .. import cache_files
from ..utils import hfgen_cache_dir

logger = logging.getLogger(__name__)

EMPTY, FILLED, CORRUPT = 0, 1, 2
CACHE_SUBDIR = "pixels"
FORMAT = "1"  # part of every key: a new layout never reads an old file
DEFAULT_MEMORY_GB = 2.0
_file_numbers = itertools.count()
_open_caches = weakref.WeakValueDictionary()  # key -> the cache this process has open (train and test may share it)


class PixelCache:
    """A status byte and a (H, W, C) uint8 slot per image; `shapes`: (N, 3) int64."""

    def __init__(self, shapes: np.ndarray, buffer, path: str | None = None, final_path: str | None = None,
                 writable: bool = True):
        self.shapes, self.buffer, self.path, self.final_path, self.writable = shapes, buffer, path, final_path, writable
        sizes = shapes.prod(axis=1)
        self.offsets = len(shapes) + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.array = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
        self.status = self.array[:len(shapes)]
        # every slot of one shape (a folder of equal images): the slots are the rows of one (N, H * W * C) array
        uniform = len(shapes) and bool(np.all(shapes == shapes[0]))
        self.rows = self.array[len(shapes):].reshape(len(shapes), -1) if uniform else None

    @staticmethod
    def num_bytes(shapes: np.ndarray) -> int:
        return int(len(shapes) + shapes.prod(axis=1).sum())

    @classmethod
    def in_memory(cls, shapes: np.ndarray) -> "PixelCache":
        return cls(shapes, mmap.mmap(-1, max(1, cls.num_bytes(shapes))))  # MAP_SHARED | MAP_ANONYMOUS

    @classmethod
    def on_disk(cls, shapes: np.ndarray, key: str, cache_dir: str | None = None) -> "PixelCache | None":
        """The sealed file of `key` when it is intact, else a new file of this process's to fill; None (with one
        log line) when the disk has no room for it."""
        folder = os.path.join(cache_dir or hfgen_cache_dir(), CACHE_SUBDIR)
        final_path = os.path.join(folder, f"{key}.pixels")
        size = cls.num_bytes(shapes)
        if os.path.exists(final_path) or os.path.exists(cache_files.sidecar_path(final_path)):
            reason = cache_files.broken_reason(final_path)
            if reason is None and os.path.getsize(final_path) != size:
                reason = f"it holds {os.path.getsize(final_path)} bytes where these images need {size}"
            if reason is None:
                array = np.memmap(final_path, dtype=np.uint8, mode="r", shape=(size,))
                cache = cls(shapes, array, final_path, final_path, writable=False)
                if cache.complete:
                    return cache
                reason = "it has empty slots"
            cache_files.report_broken(final_path, reason, "pixel cache")
            cache_files.remove(final_path)
        os.makedirs(folder, exist_ok=True)
        _remove_abandoned(final_path)
        path = f"{final_path}.incomplete-{os.getpid()}-{next(_file_numbers)}"
        try:
            with open(path, "wb") as file:
                os.posix_fallocate(file.fileno(), 0, size)  # the space is reserved now, not found missing mid-run
        except OSError as error:
            if os.path.exists(path):
                os.remove(path)
            logger.warning("not caching decoded pixels (images are decoded every epoch): cannot reserve %d bytes "
                           "in %s: %s", size, folder, error.strerror or error)
            return None
        return cls(shapes, np.memmap(path, dtype=np.uint8, mode="r+", shape=(size,)), path, final_path)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getstate__(self):
        # a DataLoader worker started with "spawn" shares no buffer: it reads a sealed file, else decodes itself
        return {"shapes": self.shapes, "path": None if self.writable else self.path}

    def __setstate__(self, state):
        shapes, path = state["shapes"], state["path"]
        if path:
            self.__init__(shapes, np.memmap(path, dtype=np.uint8, mode="r", shape=(self.num_bytes(shapes),)), path,
                          path, writable=False)
        else:  # status bytes only, all empty
            self.__init__(shapes, np.zeros(len(shapes), dtype=np.uint8), writable=False)

    @property
    def complete(self) -> bool:
        return bool(np.all(self.status != EMPTY))

    def get(self, index: int) -> np.ndarray | None:
        """Image `index`'s pixels (a read-only view), or None when it is not cached (or corrupt)."""
        if self.status[index] != FILLED:
            return None
        start = self.offsets[index]
        return self.array[start:start + self.shapes[index].prod()].reshape(self.shapes[index])

    def gather(self, indices: np.ndarray) -> np.ndarray | None:
        """The pixels of `indices` as one (B, H, W, C) array (one indexing operation), when all of them are cached
        and of one shape; else None."""
        if not len(indices) or not np.all(self.status[indices] == FILLED):
            return None
        if self.rows is not None:
            return self.rows[indices].reshape(len(indices), *self.shapes[0])
        shapes = self.shapes[indices]
        if not np.all(shapes == shapes[0]):
            return None
        size = int(shapes[0].prod())
        return self.array[self.offsets[indices][:, None] + np.arange(size)].reshape(len(indices), *shapes[0])

    def put(self, index: int, pixels: np.ndarray | None) -> None:
        """Stores image `index` (None: it is corrupt); pixels of another shape than its slot are not stored (its
        header said otherwise: it is decoded each time)."""
        if not self.writable or self.status[index] != EMPTY:
            return
        if pixels is None:
            self.status[index] = CORRUPT
            return
        if pixels.shape != tuple(self.shapes[index]):
            return
        start = self.offsets[index]
        self.array[start:start + pixels.size] = pixels.reshape(-1)
        self.status[index] = FILLED  # after the pixels: a filled status never points at a half-written slot

    def seal_if_complete(self) -> None:
        """Once this process's file has every image: flush it, move it to its final name and seal it."""
        if not self.writable or self.final_path is None or not self.complete:
            return
        self.array.flush()
        os.replace(self.path, self.final_path)
        cache_files.seal(self.final_path)
        logger.info("cached the decoded pixels of %d images in %s", len(self), self.final_path)
        self.path, self.writable = self.final_path, False


def _remove_abandoned(final_path: str) -> None:
    """Removes files that runs which no longer exist were filling for `final_path`."""
    folder, prefix = os.path.dirname(final_path), os.path.basename(final_path) + ".incomplete-"
    for name in os.listdir(folder):
        pid = name[len(prefix):].split("-")[0]
        if name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
            try:
                os.remove(os.path.join(folder, name))
            except FileNotFoundError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pixel_cache_key(fingerprint: str, transform) -> str:
    """The images' fingerprint (names, sizes, times) and what decides their prepared pixels."""
    text = f"{FORMAT}|{fingerprint}|{transform.prepared_key}"
    return hashlib.sha1(text.encode()).hexdigest()[:24]


def open_pixel_cache(shapes: np.ndarray, fingerprint: str, transform, memory_bytes: int,
                     cache_dir: str | None = None) -> PixelCache | None:
    """In RAM when the pixels fit `memory_bytes`, else on disk under `cache_dir` (default $HFGEN_CACHE); the
    same object for the same images and transform while this process holds it."""
    key = pixel_cache_key(fingerprint, transform)
    cache_dir = cache_dir or hfgen_cache_dir()
    cache = _open_caches.get((key, cache_dir))
    if cache is not None and np.array_equal(cache.shapes, shapes):
        return cache
    if PixelCache.num_bytes(shapes) <= memory_bytes:
        cache = PixelCache.in_memory(shapes)
    else:
        cache = PixelCache.on_disk(shapes, key, cache_dir)
    if cache is not None:
        _open_caches[key, cache_dir] = cache
    return cache

"""Cache files that cannot lie: each one is sealed with a sidecar recording its size and a checksum, and
checked when opened.

A cache (decoded pixels, latents, FD statistics) is written completely first, then `seal(path)` writes
`path + ".check.json"`. `is_intact(path)` is true only when the sidecar is there and the file still has that
size and checksum: a file truncated, zeroed or half-written by a killed run is never read. A reader that finds
a broken cache logs one line naming the file (`report_broken`) and rebuilds it.

The checksum reads the whole file up to `FULL_HASH_BYTES`; a larger file is sampled in `NUM_SAMPLED_BLOCKS`
evenly spaced blocks (plus its size), so that opening a cache of several GB costs milliseconds, and still a
zeroed or truncated file is caught.
"""

import hashlib
import json
import logging
import os

logger = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".check.json"
FULL_HASH_BYTES = 64 * 2**20  # files up to this size are hashed whole
NUM_SAMPLED_BLOCKS = 1024
BLOCK_BYTES = 64 * 2**10


def file_checksum(path: str) -> str:
    """blake2b of the whole file, or of its size and NUM_SAMPLED_BLOCKS evenly spaced blocks when it is larger
    than FULL_HASH_BYTES."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as file:
        if size <= FULL_HASH_BYTES:
            while chunk := file.read(2**20):
                digest.update(chunk)
        else:
            stride = (size - BLOCK_BYTES) // (NUM_SAMPLED_BLOCKS - 1)
            for block in range(NUM_SAMPLED_BLOCKS):
                file.seek(block * stride)
                digest.update(file.read(BLOCK_BYTES))
    return digest.hexdigest()


def sidecar_path(path: str) -> str:
    return path + SIDECAR_SUFFIX


def seal(path: str) -> None:
    """Records `path`'s size and checksum in its sidecar (written to a temporary name, then renamed)."""
    record = {"size": os.path.getsize(path), "checksum": file_checksum(path)}
    staging = sidecar_path(path) + ".tmp"
    with open(staging, "w") as file:
        json.dump(record, file)
    os.replace(staging, sidecar_path(path))


def broken_reason(path: str) -> str | None:
    """Why the cache file `path` cannot be trusted (missing, no sidecar, wrong size, wrong checksum), or None
    when it is intact."""
    if not os.path.isfile(path):
        return "it is missing"
    try:
        with open(sidecar_path(path)) as file:
            record = json.load(file)
        size, checksum = int(record["size"]), str(record["checksum"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"its integrity record {os.path.basename(sidecar_path(path))} is missing or unreadable"
    actual = os.path.getsize(path)
    if actual != size:
        return f"it holds {actual} bytes where {size} were written"
    if file_checksum(path) != checksum:
        return "its checksum differs from the one recorded when it was written"
    return None


def is_intact(path: str) -> bool:
    return broken_reason(path) is None


def report_broken(path: str, reason: str, what: str) -> None:
    """The one log line of a broken cache that is rebuilt, e.g. what="latent cache"."""
    logger.warning("rebuilding the %s: %s cannot be trusted (%s)", what, path, reason)


def remove(path: str) -> None:
    """Removes a cache file and its sidecar, where they exist."""
    for name in (path, sidecar_path(path)):
        if os.path.exists(name):
            os.remove(name)

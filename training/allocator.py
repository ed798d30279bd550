"""Freed tensor memory kept for the next step, on glibc (Linux).

A training step allocates and frees the same activations again and again. glibc serves each block above its
mmap threshold (128 KiB at start) with a fresh mmap and gives it back on free, so the next step faults every page
in again, zeroed by the kernel. glibc raises that threshold by itself once a large mmap'd block is freed; whether
that happened before training began depends on the data path (freeing the bundled digits' arrays raises it,
decoding a folder of small PNGs does not). Measured on the README's GAN recipe: 3.7 M page faults and 9.7 s of
system time in 4 epochs on a PNG folder against 0.18 M and 1.2 s on the bundled array, 1.1-1.25x the time per
epoch (BENCHMARKS.md, small folders). Fixing both thresholds at glibc's own dynamic maximum makes every run
reuse freed blocks the same way, whatever came before.
"""

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 * 2 ** 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest value mallopt accepts
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc pairs with a dynamically raised mmap threshold


def keep_freed_memory_for_reuse() -> bool:
    """Blocks up to 32 MiB come from (and return to) the heap, which keeps up to 64 MiB free at its top instead
    of returning it to the kernel. Returns whether it took effect (False off glibc: nothing to do there)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        logger.info("mallopt refused the mmap/trim thresholds; freed tensor memory is returned to the kernel")
    return done

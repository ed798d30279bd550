"""Saves that fail in one line: the free space is checked before a save, and a full, over-quota or read-only disk
is named as the cause when a write fails (torch and safetensors hide it in their own errors)."""

import errno
import os
import re
import shutil

import torch

# files take whole blocks, folders take metadata, and small files (card, grid, JSON) come beside the weights
SLACK_BYTES = 1 << 20
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors reports an OSError
SHORT_WRITE = "unexpected pos"  # torch's writer, when a write came up short: its OSError is lost


class SaveError(OSError):
    """A checkpoint or the output could not be written (no space, a read-only disk): one line naming the folder
    and the cause. An OSError, so the command line prints it as one line."""


def existing_folder(path: str) -> str:
    """`path`, or its closest ancestor that exists (a folder not created yet is on its parent's disk)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def free_bytes(folder: str) -> int:
    return shutil.disk_usage(existing_folder(folder)).free


def folder_bytes(folder: str) -> int:
    """The disk space the files under `folder` take (whole blocks where the system says)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(root, name))
            total += stat.st_blocks * 512 if hasattr(stat, "st_blocks") else stat.st_size
    return total


def state_bytes(state) -> int:
    """The bytes of the tensors in `state`: a tensor, or dicts, lists and tuples of them (state dicts)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(value) for value in state)
    return 0


def space_shortage(folder: str, needed: int, what: str, kept: str) -> "SaveError | None":
    """The error to stop with when `folder`'s disk has less than `needed` (+ slack) bytes free for `what`, else None."""
    needed, free = needed + SLACK_BYTES, free_bytes(folder)
    if free >= needed:
        return None
    return SaveError(f"not enough space to save {what} in {folder!r}: it needs about {needed:,} bytes and "
                     f"{free:,} are free; {kept}. Free some space (or pass `--checkpoints_total_limit`), then resume "
                     "with `--resume_from_checkpoint latest`")


def disk_error_cause(error: BaseException, folder: str) -> tuple[str, str] | None:
    """(why, what to do) when writing into `folder` failed with `error` because of the disk, else None. Called before
    the partial files are removed, so the free space it reports is that of the failure."""
    code = getattr(error, "errno", None)
    found = RUST_OS_ERROR.search(str(error))
    code = code or (int(found.group(1)) if found else None)
    free_space = "free some space"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"{os.strerror(code)} ({free_bytes(folder):,} bytes free)", free_space
    if code == errno.EROFS or os.statvfs(existing_folder(folder)).f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS), "make it writable"
    if SHORT_WRITE in str(error):
        return (f"a write came up short ({free_bytes(folder):,} bytes free now): the disk or your quota is probably "
                "full"), free_space
    if isinstance(error, OSError):  # any other OSError (permissions, I/O): named in one line as well
        return (os.strerror(code) if code else str(error)), "fix that"
    return None


def save_failure(error: BaseException | None, folder: str, what: str, kept: str) -> BaseException:
    """What to raise when `what` could not be written into `folder`: a one-line SaveError when the disk is to blame
    (or, with `error` None, when another process failed), else `error` itself."""
    if error is None:
        return SaveError(f"could not save {what} in {folder!r}: another process failed to write its part (its "
                         f"error is in its log); {kept}")
    found = disk_error_cause(error, folder)
    if found is None:
        return error
    cause, remedy = found
    failure = SaveError(f"could not save {what} in {folder!r}: {cause}; its partial files were removed and {kept}. "
                        f"{remedy.capitalize()}, then resume with `--resume_from_checkpoint latest`")
    failure.__cause__ = error
    return failure

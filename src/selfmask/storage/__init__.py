"""Mask files at the information limit; applying, merging and many tasks on one backbone.

See docs/storage.md for the file format and METHOD.md section 5 for the storage figures.
"""

from selfmask.storage.apply import apply_mask, check_fingerprint, merge_mask
from selfmask.storage.bank import MaskBank
from selfmask.storage.container import atomic_write_bytes
from selfmask.storage.maskfile import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MaskFile,
    MaskTensorInfo,
    READ_VERSIONS,
    decode_mask_file,
    encode_mask_file,
    load_mask,
    save_mask,
)
from selfmask.storage.run import RunModel, load_run

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MaskBank",
    "MaskFile",
    "MaskTensorInfo",
    "READ_VERSIONS",
    "RunModel",
    "apply_mask",
    "atomic_write_bytes",
    "check_fingerprint",
    "decode_mask_file",
    "encode_mask_file",
    "load_mask",
    "load_run",
    "merge_mask",
    "save_mask",
]

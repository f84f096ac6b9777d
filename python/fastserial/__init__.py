"""fastserial: a Rust-accelerated, drop-in replacement for ``torch.save`` / ``torch.load``.

It reads and writes PyTorch's own zip checkpoint format, in both directions::

    import fastserial
    fastserial.save(model.state_dict(), "ckpt.pt")        # torch.load reads it
    sd = fastserial.load("ckpt.pt", map_location="cpu")   # reads any torch.save file
    sd = fastserial.load("big.pt", mmap=True)             # zero-copy

torch is imported only when a torch function is used: ``fastserial.numpy`` works
without it.
"""

from ._fastserial import CheckpointError, get_num_threads, set_num_threads
from ._optional import MissingDependencyError
from .allowlist import add_safe_globals, clear_safe_globals, get_safe_globals, safe_globals
from .lazy import open
from .location import register_package
from .patch import patch_torch
from .serialization import (
    DEFAULT_PROTOCOL,
    LoadEndianness,
    get_default_load_endianness,
    get_default_mmap_options,
    get_pack_small_tensors,
    get_unsafe_globals_in_checkpoint,
    load,
    save,
    set_default_load_endianness,
    set_default_mmap_options,
    set_pack_small_tensors,
)

__version__ = "0.1.0"

__all__ = [
    "save",
    "load",
    "open",
    "CheckpointError",
    "MissingDependencyError",
    "DEFAULT_PROTOCOL",
    "LoadEndianness",
    "get_default_load_endianness",
    "set_default_load_endianness",
    "get_default_mmap_options",
    "set_default_mmap_options",
    "register_package",
    "add_safe_globals",
    "get_safe_globals",
    "clear_safe_globals",
    "safe_globals",
    "get_unsafe_globals_in_checkpoint",
    "patch_torch",
    "get_num_threads",
    "set_num_threads",
    "set_pack_small_tensors",
    "get_pack_small_tensors",
    "__version__",
]

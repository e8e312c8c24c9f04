"""The nnpatch file format (spec/FORMAT.md is normative): the header's types,
the reader that validates a whole patch, the writer, and the stream reader."""

from .header import *  # noqa: F403 - the format's constants and types are this package's surface
from .header import __all__ as _header_all
from .reader import Patch, parse_header, parse_patch, read_patch, unpack_header
from .stream import STDIN_NAME, read_patch_stream
from .writer import PatchWriter

__all__ = [*_header_all, "Patch", "PatchWriter", "STDIN_NAME", "parse_header", "parse_patch", "read_patch",
           "read_patch_stream", "unpack_header"]

"""vhost-user wire format: codes, Construct definitions, typed models and the codec.

Pure: no I/O, no logging, nothing else of ``vhostmem``. See HACKING.md *protocol*.

This folder sits at the top of the checkout and installs as ``vhostmem.protocol``
(pyproject.toml, package-dir); ``vhostmem/protocol`` links to it in the checkout.
"""

from __future__ import annotations

if __name__ != "vhostmem.protocol":
    # Only a checkout's top folder on sys.path reaches this file as a bare ``protocol``: that
    # name belongs to another distribution on the index, and a second copy of these modules
    # would hold second copies of the enums.
    raise ImportError(
        f"{__file__} is vhostmem's protocol package, imported here as {__name__!r}: "
        "import vhostmem.protocol instead (pyproject.toml installs it under that name only)",
        name=__name__,
    )

from vhostmem.protocol.codec import (
    decode_header,
    decode_message,
    decode_payload,
    decode_reply_payload,
    encode_reply,
    encode_request,
    encode_u64_reply,
    fd_bounds,
    payload_kind,
    reply_payload_kind,
)
from vhostmem.protocol.codes import (
    FDS_ALLOWED,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    FLAG_VERSION,
    FLAG_VERSION_MASK,
    HAS_OWN_REPLY,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_PAYLOAD_SIZE,
    MEMORY_BASELINE_NREGIONS,
    REPLY_FLAGS,
    REPLY_PAYLOAD,
    REQUEST_PAYLOAD,
    VRING_IDX_MASK,
    VRING_NOFD_MASK,
    BackendRequest,
    HeaderFlags,
    PayloadKind,
    ProtocolFeature,
    Request,
    VirtioFeature,
    request_name,
)
from vhostmem.protocol.errors import DecodeError, EncodeError, ProtocolError
from vhostmem.protocol.model import (
    Config,
    DeviceStateParams,
    Header,
    Inflight,
    Log,
    MemoryRegion,
    MemoryTable,
    MemRegMsg,
    Payload,
    VringAddress,
    VringFile,
    VringState,
)

__all__ = [
    "FDS_ALLOWED",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "FLAG_VERSION",
    "FLAG_VERSION_MASK",
    "HAS_OWN_REPLY",
    "HEADER_SIZE",
    "MAX_CONFIG_SIZE",
    "MAX_PAYLOAD_SIZE",
    "MEMORY_BASELINE_NREGIONS",
    "REPLY_FLAGS",
    "REPLY_PAYLOAD",
    "REQUEST_PAYLOAD",
    "VRING_IDX_MASK",
    "VRING_NOFD_MASK",
    "BackendRequest",
    "Config",
    "DecodeError",
    "DeviceStateParams",
    "EncodeError",
    "Header",
    "HeaderFlags",
    "Inflight",
    "Log",
    "MemRegMsg",
    "MemoryRegion",
    "MemoryTable",
    "Payload",
    "PayloadKind",
    "ProtocolError",
    "ProtocolFeature",
    "Request",
    "VirtioFeature",
    "VringAddress",
    "VringFile",
    "VringState",
    "decode_header",
    "decode_message",
    "decode_payload",
    "decode_reply_payload",
    "encode_reply",
    "encode_request",
    "encode_u64_reply",
    "fd_bounds",
    "payload_kind",
    "reply_payload_kind",
    "request_name",
]

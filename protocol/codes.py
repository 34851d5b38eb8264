"""Numbers of the vhost-user protocol as QEMU 10.0.2 speaks it.

Everything here is data taken from ``qemu/qemu:docs/interop/vhost-user.rst`` (10.0.2) and the
headers next to it (``hw/virtio/vhost-user.c``, ``subprojects/libvhost-user/libvhost-user.h``).
Names drop the ``VHOST_USER_`` prefix; ``SLAVE`` is spelt ``BACKEND`` as in the current spec.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag, StrEnum
from typing import Final

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
    "HeaderFlags",
    "PayloadKind",
    "ProtocolFeature",
    "Request",
    "VirtioFeature",
    "request_name",
]


class Request(IntEnum):
    """Front-end -> back-end request codes (vhost-user.rst *Front-end message types*)."""

    #: Ask for the virtio feature bits the back-end offers; reply u64.
    GET_FEATURES = 1
    #: Enable virtio feature bits (u64).
    SET_FEATURES = 2
    #: Claim the back-end for this front-end; no payload.
    SET_OWNER = 3
    #: Deprecated; QEMU stopped sending it on device reset (commit 22d2464f7e).
    RESET_OWNER = 4
    #: Replace the whole memory table (VhostUserMemory); one fd per region.
    SET_MEM_TABLE = 5
    #: Dirty-log area (VhostUserLog); fd and reply only with LOG_SHMFD.
    SET_LOG_BASE = 6
    #: Eventfd to signal dirty-log updates; one fd, no payload.
    SET_LOG_FD = 7
    #: Ring size (vring state).
    SET_VRING_NUM = 8
    #: Ring addresses (vring address), QEMU user addresses unless IOMMU_PLATFORM.
    SET_VRING_ADDR = 9
    #: Next available index (vring state).
    SET_VRING_BASE = 10
    #: Stop the ring and report its index (vring state in both directions).
    GET_VRING_BASE = 11
    #: Kick eventfd for a ring (u64 vring file); no fd when NOFD is set.
    SET_VRING_KICK = 12
    #: Call eventfd for a ring (u64 vring file); no fd when NOFD is set.
    SET_VRING_CALL = 13
    #: Error eventfd for a ring (u64 vring file); no fd when NOFD is set.
    SET_VRING_ERR = 14
    #: Ask for the protocol feature bits; reply u64.
    GET_PROTOCOL_FEATURES = 15
    #: Enable protocol feature bits (u64).
    SET_PROTOCOL_FEATURES = 16
    #: Maximum number of queues (only with MQ); reply u64.
    GET_QUEUE_NUM = 17
    #: Enable or disable one ring (vring state, num 0/1).
    SET_VRING_ENABLE = 18
    #: Ask the back-end to broadcast a RARP for this MAC (u64, first 6 bytes).
    SEND_RARP = 19
    #: Tell a net back-end the MTU (u64).
    NET_SET_MTU = 20
    #: Socket for back-end -> front-end requests; one fd, no payload (was SET_SLAVE_REQ_FD).
    SET_BACKEND_REQ_FD = 21
    #: IOTLB update/invalidate (struct vhost_iotlb_msg); reply u64.
    IOTLB_MSG = 22
    #: Ring endianness for legacy devices (vring state).
    SET_VRING_ENDIAN = 23
    #: Read device config space (VhostUserConfig); reply VhostUserConfig.
    GET_CONFIG = 24
    #: Write device config space (VhostUserConfig).
    SET_CONFIG = 25
    #: Create a crypto session (crypto session struct); reply the same struct.
    CREATE_CRYPTO_SESSION = 26
    #: Close a crypto session (u64 session id).
    CLOSE_CRYPTO_SESSION = 27
    #: Start postcopy; reply carries a userfaultfd.
    POSTCOPY_ADVISE = 28
    #: Switch to postcopy mode; no payload.
    POSTCOPY_LISTEN = 29
    #: End postcopy; reply u64.
    POSTCOPY_END = 30
    #: Ask for the inflight-tracking area (VhostUserInflight); reply with it plus one fd.
    GET_INFLIGHT_FD = 31
    #: Hand over the inflight-tracking area (VhostUserInflight); one fd.
    SET_INFLIGHT_FD = 32
    #: vhost-user-gpu socket; one fd, no payload.
    GPU_SET_SOCKET = 33
    #: Reset the device (only with RESET_DEVICE); no payload.
    RESET_DEVICE = 34
    #: In-band kick (vring state); QEMU does not send it.
    VRING_KICK = 35
    #: Ask how many memory slots the back-end supports (CONFIGURE_MEM_SLOTS); reply u64.
    GET_MAX_MEM_SLOTS = 36
    #: Add one memory region (VhostUserMemRegMsg); exactly one fd.
    ADD_MEM_REG = 37
    #: Remove one memory region (VhostUserMemRegMsg); no fd (MAY carry one, to be closed).
    REM_MEM_REG = 38
    #: Set the virtio device status byte (u64, only with STATUS).
    SET_STATUS = 39
    #: Read the virtio device status byte; reply u64.
    GET_STATUS = 40
    #: Look up a shared object by UUID (VhostUserShared); reply may carry a dma-buf fd.
    GET_SHARED_OBJECT = 41
    #: Start a device-state transfer (direction, phase); one fd; reply u64 (+ maybe an fd).
    SET_DEVICE_STATE_FD = 42
    #: Ask whether the device-state transfer succeeded; reply u64.
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Back-end -> front-end codes on the backend channel (rst *Back-end message types*)."""

    #: IOTLB miss or access failure.
    IOTLB_MSG = 1
    #: The device config space changed.
    CONFIG_CHANGE_MSG = 2
    #: Host notifier area for a ring (VhostUserVringArea); one fd.
    VRING_HOST_NOTIFIER_MSG = 3
    #: In-band call notification (QEMU does not implement it).
    VRING_CALL = 4
    #: In-band error notification (QEMU does not implement it).
    VRING_ERR = 5
    #: Announce a shared object (UUID).
    SHARED_OBJECT_ADD = 6
    #: Withdraw a shared object (UUID).
    SHARED_OBJECT_REMOVE = 7
    #: Look up a shared object; reply an fd plus u64.
    SHARED_OBJECT_LOOKUP = 8


class HeaderFlags(IntFlag):
    """Bits of the header's ``flags`` word (rst *Header*)."""

    #: Protocol version 1, the only version there is.
    VERSION = 0x1
    #: The version field: bits 0-1.
    VERSION_MASK = 0x3
    #: This message is a reply.
    REPLY = 0x4
    #: The sender wants a REPLY_ACK u64 (only once REPLY_ACK is negotiated).
    NEED_REPLY = 0x8


# The HeaderFlags bits as plain ints, for the tests every message makes: IntFlag arithmetic
# runs Python code per operation and builds a member for its result (CPython Lib/enum.py,
# Flag.__and__ / __or__), where int arithmetic is one C operation.
#: ``HeaderFlags.VERSION``: version 1.
FLAG_VERSION: Final = int(HeaderFlags.VERSION)
#: ``HeaderFlags.VERSION_MASK``: the version field, bits 0-1.
FLAG_VERSION_MASK: Final = int(HeaderFlags.VERSION_MASK)
#: ``HeaderFlags.REPLY``.
FLAG_REPLY: Final = int(HeaderFlags.REPLY)
#: ``HeaderFlags.NEED_REPLY``.
FLAG_NEED_REPLY: Final = int(HeaderFlags.NEED_REPLY)


class ProtocolFeature(IntFlag):
    """Protocol feature masks ``1 << bit`` (rst *Protocol features*); 10.0.2 has bits 0-19."""

    #: Multiple queues; enables GET_QUEUE_NUM.
    MQ = 1 << 0
    #: SET_LOG_BASE carries an fd and is answered.
    LOG_SHMFD = 1 << 1
    #: SEND_RARP is understood.
    RARP = 1 << 2
    #: NEED_REPLY may be set on any request and must then be acknowledged.
    REPLY_ACK = 1 << 3
    #: NET_SET_MTU is understood (rst spells it VHOST_USER_PROTOCOL_F_MTU).
    NET_MTU = 1 << 4
    #: Back-end -> front-end channel (was SLAVE_REQ).
    BACKEND_REQ = 1 << 5
    #: SET_VRING_ENDIAN is understood.
    CROSS_ENDIAN = 1 << 6
    #: Crypto sessions.
    CRYPTO_SESSION = 1 << 7
    #: Postcopy live migration (userfaultfd).
    PAGEFAULT = 1 << 8
    #: GET_CONFIG / SET_CONFIG.
    CONFIG = 1 << 9
    #: Back-end requests may carry fds (was SLAVE_SEND_FD).
    BACKEND_SEND_FD = 1 << 10
    #: VRING_HOST_NOTIFIER_MSG.
    HOST_NOTIFIER = 1 << 11
    #: GET_INFLIGHT_FD / SET_INFLIGHT_FD.
    INFLIGHT_SHMFD = 1 << 12
    #: RESET_DEVICE.
    RESET_DEVICE = 1 << 13
    #: In-band notifications; needs BACKEND_REQ and REPLY_ACK.
    INBAND_NOTIFICATIONS = 1 << 14
    #: GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG instead of SET_MEM_TABLE.
    CONFIGURE_MEM_SLOTS = 1 << 15
    #: SET_STATUS / GET_STATUS.
    STATUS = 1 << 16
    #: Xen mmap flags in each region (QEMU does not implement it).
    XEN_MMAP = 1 << 17
    #: Shared objects (virtio-dmabuf).
    SHARED_OBJECT = 1 << 18
    #: SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE.
    DEVICE_STATE = 1 << 19


class VirtioFeature(IntFlag):
    """The virtio feature masks vhostmem uses (virtio spec; vhost-user.rst *Feature bits*)."""

    #: Device handles packets with partial checksum (bit 0).
    NET_F_CSUM = 1 << 0
    #: Driver handles packets with partial checksum (bit 1).
    NET_F_GUEST_CSUM = 1 << 1
    #: Device has a MAC address in config space (bit 5).
    NET_F_MAC = 1 << 5
    #: Driver can merge receive buffers (bit 15).
    NET_F_MRG_RXBUF = 1 << 15
    #: Config space has a link status field (bit 16).
    NET_F_STATUS = 1 << 16
    #: Control virtqueue (bit 17).
    NET_F_CTRL_VQ = 1 << 17
    #: Multiqueue (bit 22).
    NET_F_MQ = 1 << 22
    #: Legacy: notify when the avail ring empties (bit 24).
    F_NOTIFY_ON_EMPTY = 1 << 24
    #: vhost: dirty-page logging for migration, VHOST_F_LOG_ALL (bit 26).
    LOG_ALL = 1 << 26
    #: Indirect descriptors (bit 28).
    RING_F_INDIRECT_DESC = 1 << 28
    #: used_event / avail_event (bit 29).
    RING_F_EVENT_IDX = 1 << 29
    #: VHOST_USER_F_PROTOCOL_FEATURES: GET/SET_PROTOCOL_FEATURES exist (bit 30).
    PROTOCOL_FEATURES = 1 << 30
    #: Virtio 1.0 compliant (bit 32).
    VERSION_1 = 1 << 32
    #: Ring addresses are IOVAs translated through the IOTLB (bit 33).
    F_IOMMU_PLATFORM = 1 << 33
    #: Packed virtqueue layout (bit 34).
    F_RING_PACKED = 1 << 34


#: Bytes in a message header (request, flags, size: three u32).
HEADER_SIZE: Final = 12
#: Largest payload we accept. QEMU's own ``VhostUserPayload`` union is 1072 bytes on x86-64
#: (largest member: the crypto session) and libvhost-user's is 272; 4096 is rust-vmm's
#: ``MAX_MSG_SIZE``, a cap that keeps room for later growth without letting a broken ``size``
#: make us buffer megabytes.
MAX_PAYLOAD_SIZE: Final = 4096
#: Regions a SET_MEM_TABLE can carry (``VHOST_MEMORY_BASELINE_NREGIONS``).
MEMORY_BASELINE_NREGIONS: Final = 8
#: Largest config-space window in GET/SET_CONFIG (``VHOST_USER_MAX_CONFIG_SIZE``).
MAX_CONFIG_SIZE: Final = 256
#: Ring index in a vring-file u64 (``VHOST_USER_VRING_IDX_MASK``).
VRING_IDX_MASK: Final = 0xFF
#: "No fd attached" bit in a vring-file u64 (``VHOST_USER_VRING_NOFD_MASK``).
VRING_NOFD_MASK: Final = 0x100
#: The only flags QEMU accepts on a reply: version 1 | REPLY. QEMU ``vhost_user_read_header``
#: fails with -EPROTO on anything else, NEED_REPLY echoed back included.
REPLY_FLAGS: Final = HeaderFlags.VERSION | HeaderFlags.REPLY


def request_name(request: Request | int) -> str:
    """The protocol name of a request code, or ``UNKNOWN(n)`` for a code vhost-user lacks."""
    return request.name if isinstance(request, Request) else f"UNKNOWN({int(request)})"


#: (min, max) SCM_RIGHTS fds each request may carry (rst, list of messages with fds; facts
#: §1.3/§1.7). SET_MEM_TABLE must carry exactly ``nregions`` fds, which
#: :func:`vhostmem.protocol.codec.fd_bounds` derives from the decoded payload. REM_MEM_REG MAY carry
#: one that must be closed unused (QEMU 5.1-7.0 sent it). The kick/call/err fd is absent when
#: the NOFD bit is set. SET_LOG_BASE carries one only with LOG_SHMFD. Keyed by ``Request``;
#: looking up an unknown plain-int code simply misses (a Request hashes as its value).
FDS_ALLOWED: Final[dict[Request, tuple[int, int]]] = {request: (0, 0) for request in Request} | {
    Request.ADD_MEM_REG: (1, 1),
    Request.SET_MEM_TABLE: (0, MEMORY_BASELINE_NREGIONS),
    Request.REM_MEM_REG: (0, 1),
    Request.SET_VRING_KICK: (0, 1),
    Request.SET_VRING_CALL: (0, 1),
    Request.SET_VRING_ERR: (0, 1),
    Request.SET_LOG_BASE: (0, 1),
    Request.SET_LOG_FD: (1, 1),
    Request.SET_BACKEND_REQ_FD: (1, 1),
    Request.SET_INFLIGHT_FD: (1, 1),
    Request.GPU_SET_SOCKET: (1, 1),
    Request.SET_DEVICE_STATE_FD: (1, 1),
}

#: Requests that are always answered with their own reply payload, whether or not NEED_REPLY
#: is set; for these REPLY_ACK "brings no behavioural change" (rst *REPLY_ACK*). SET_LOG_BASE
#: belongs here only once LOG_SHMFD is negotiated, so it is left out and the session decides.
HAS_OWN_REPLY: Final[frozenset[Request]] = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_STATUS,
        Request.GET_CONFIG,
        Request.GET_INFLIGHT_FD,
        Request.POSTCOPY_ADVISE,
        Request.POSTCOPY_END,
        Request.IOTLB_MSG,
        Request.CREATE_CRYPTO_SESSION,
        Request.GET_SHARED_OBJECT,
        Request.SET_DEVICE_STATE_FD,
        Request.CHECK_DEVICE_STATE,
    }
)


class PayloadKind(StrEnum):
    """rst *Message types* payload layouts, one per Struct in ``vhostmem.protocol.structs``."""

    #: No payload: size must be 0.
    NONE = "none"
    #: One u64 (features, status, REPLY_ACK result, ...).
    U64 = "u64"
    #: VhostUserMemory: nregions, padding, then nregions regions (SET_MEM_TABLE).
    MEMORY_TABLE = "memory_table"
    #: VhostUserMemRegMsg: u64 padding then one region (ADD/REM_MEM_REG).
    MEM_REG = "mem_reg"
    #: struct vhost_vring_state: index, num.
    VRING_STATE = "vring_state"
    #: struct vhost_vring_addr: index, flags and four addresses.
    VRING_ADDR = "vring_addr"
    #: u64 with the ring index in bits 0-7 and NOFD in bit 8 (SET_VRING_KICK/CALL/ERR).
    VRING_FILE = "vring_file"
    #: VhostUserLog: mmap_size, mmap_offset.
    LOG = "log"
    #: VhostUserConfig: offset, size, flags, then ``size`` bytes.
    CONFIG = "config"
    #: VhostUserInflight: mmap_size, mmap_offset, num_queues, queue_size (+4 bytes padding).
    INFLIGHT = "inflight"
    #: Device-state transfer parameters: direction, phase.
    DEVICE_STATE = "device_state"
    #: Not decoded by vhostmem (IOTLB, crypto, shared objects, unknown codes): the bytes as-is.
    RAW = "raw"


_K = PayloadKind

#: What each request carries (rst *Front-end message types*, checked against what QEMU 10.0.2
#: really sends in shared/vectors/: GET_VRING_BASE carries a vring state whose num is 0, the
#: GET_* that answer a u64 carry nothing, SET_LOG_BASE carries a VhostUserLog although the rst
#: says "u64" - QEMU ``vhost_user_set_log_base`` sends ``sizeof(msg.payload.log)``; ADD/REM_MEM_REG
#: carry a VhostUserMemRegMsg although the 10.0.2 rst says "N/A").
#:
#: Postcopy is not decoded: after POSTCOPY_LISTEN QEMU acknowledges the back-end's SET_MEM_TABLE /
#: ADD_MEM_REG reply with an 8-byte u64 0 under the same request code (libvhost-user
#: ``vu_add_mem_reg``). A back-end that never offers PAGEFAULT never sees that.
REQUEST_PAYLOAD: Final[dict[Request, PayloadKind]] = {
    Request.GET_FEATURES: _K.NONE,
    Request.SET_FEATURES: _K.U64,
    Request.SET_OWNER: _K.NONE,
    Request.RESET_OWNER: _K.NONE,
    Request.SET_MEM_TABLE: _K.MEMORY_TABLE,
    Request.SET_LOG_BASE: _K.LOG,
    Request.SET_LOG_FD: _K.NONE,
    Request.SET_VRING_NUM: _K.VRING_STATE,
    Request.SET_VRING_ADDR: _K.VRING_ADDR,
    Request.SET_VRING_BASE: _K.VRING_STATE,
    Request.GET_VRING_BASE: _K.VRING_STATE,
    Request.SET_VRING_KICK: _K.VRING_FILE,
    Request.SET_VRING_CALL: _K.VRING_FILE,
    Request.SET_VRING_ERR: _K.VRING_FILE,
    Request.GET_PROTOCOL_FEATURES: _K.NONE,
    Request.SET_PROTOCOL_FEATURES: _K.U64,
    Request.GET_QUEUE_NUM: _K.NONE,
    Request.SET_VRING_ENABLE: _K.VRING_STATE,
    Request.SEND_RARP: _K.U64,
    Request.NET_SET_MTU: _K.U64,
    Request.SET_BACKEND_REQ_FD: _K.NONE,
    Request.IOTLB_MSG: _K.RAW,
    Request.SET_VRING_ENDIAN: _K.VRING_STATE,
    Request.GET_CONFIG: _K.CONFIG,
    Request.SET_CONFIG: _K.CONFIG,
    Request.CREATE_CRYPTO_SESSION: _K.RAW,
    Request.CLOSE_CRYPTO_SESSION: _K.U64,
    Request.POSTCOPY_ADVISE: _K.NONE,
    Request.POSTCOPY_LISTEN: _K.NONE,
    Request.POSTCOPY_END: _K.NONE,
    Request.GET_INFLIGHT_FD: _K.INFLIGHT,
    Request.SET_INFLIGHT_FD: _K.INFLIGHT,
    Request.GPU_SET_SOCKET: _K.NONE,
    Request.RESET_DEVICE: _K.NONE,
    Request.VRING_KICK: _K.VRING_STATE,
    Request.GET_MAX_MEM_SLOTS: _K.NONE,
    Request.ADD_MEM_REG: _K.MEM_REG,
    Request.REM_MEM_REG: _K.MEM_REG,
    Request.SET_STATUS: _K.U64,
    Request.GET_STATUS: _K.NONE,
    Request.GET_SHARED_OBJECT: _K.RAW,
    Request.SET_DEVICE_STATE_FD: _K.DEVICE_STATE,
    Request.CHECK_DEVICE_STATE: _K.NONE,
}

#: What the back-end's reply to each request carries. Everything not listed answers, when it
#: answers at all, with the REPLY_ACK u64 (0 = success). Postcopy replies (SET_MEM_TABLE /
#: ADD_MEM_REG echoed with back-end addresses) are not covered, see ``REQUEST_PAYLOAD``.
REPLY_PAYLOAD: Final[dict[Request, PayloadKind]] = {request: _K.U64 for request in Request} | {
    Request.GET_VRING_BASE: _K.VRING_STATE,
    Request.GET_CONFIG: _K.CONFIG,
    Request.GET_INFLIGHT_FD: _K.INFLIGHT,
    # Only the userfaultfd, no payload: QEMU ``vhost_user_postcopy_advise`` rejects size != 0.
    Request.POSTCOPY_ADVISE: _K.NONE,
    Request.CREATE_CRYPTO_SESSION: _K.RAW,
    Request.GET_SHARED_OBJECT: _K.RAW,
}

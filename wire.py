"""wire.py - the bytes between the engine and an R-Part worker.

The engine (backend.py) and a worker (rpart.py) talk over one TCP connection each, in
length-prefixed binary frames. Nothing is ever pickled: a frame is a fixed header, a fixed
binary meta struct per message type, and raw little-endian array bytes. Both ends validate
every field; this module only knows the layout, the size cap, the handshake and who may
listen beyond loopback (`check_bind`).

    header (20 bytes)  magic "FDR1" | version u8 | type u8 | reserved u16 | meta length u32 | payload length u64
    meta               the struct in META[type]
    payload            arrays back to back, in the order the message type names

K and V travel in the worker's row dtype (kvcache.KVConfig.row_dtype): float16, float32 or bfloat16 as the
cache stores them, and float16 for an int8 cache, which the worker quantizes as it writes (so
the scales never travel, and the in-process loop rounds exactly the same float16 rows). q
travels in the S-Part's dtype (float32, bfloat16 or float16, as CONFIGURE names it: it was
computed in that dtype, so nothing is rounded, and a bf16 batch's q is half float32's bytes);
o is always float32.

A connection opens with a challenge (HELLO: needs_auth, 32-byte nonce); the engine answers
AUTH with HMAC-SHA256(secret, nonce), or zeros when the worker needs no secret. A bad header
or an oversize frame means framing is lost: that connection is closed, the worker serves on.

Legend: S sequences, Hq/Hkv query/KV heads, D head dim, L cached length of one sequence.
"""
import hashlib
import hmac
import ipaddress
import math
import secrets
import socket
import struct

import ml_dtypes  # noqa: F401  (gives NumPy the "bfloat16" dtype that bfloat16 rows travel in)
import numpy as np

MAGIC, VERSION = b"FDR1", 4                 # 2: STATS_REPLY carries bytes_spare; 3: int8 stores hold float16 scales
                                            # (a token takes 2 bytes a head less: engine and worker must agree);
                                            # 4: q travels in the S-Part's dtype, named in CONFIGURE
HEADER = struct.Struct("<4sBBHIQ")          # magic, version, type, reserved, meta len, payload len
MAX_META = 64
DEFAULT_MAX_FRAME = 256 * 2**20             # bytes of payload; prefill ships one layer per frame

# --- message types and their meta ---

(HELLO, AUTH, CONFIGURE, ADD, FILL, DECODE, DROP, STATS, SHUTDOWN, OK, ERROR, OUT, STATS_REPLY) = range(1, 14)
META = {  # fixed binary meta per message type
    HELLO: struct.Struct("<B32s"),          # needs_auth, nonce
    AUTH: struct.Struct("<32s"),            # HMAC-SHA256(secret, nonce), zeros without a secret
    CONFIGURE: struct.Struct("<IIIIBB"),    # n_layers, Hkv, Hq, D, kv dtype code (KV_DTYPES), q's (not int8)
    ADD: struct.Struct("<QI"),              # seq id, capacity in tokens
    FILL: struct.Struct("<QII"),            # seq id, layer, L; payload K then V [L, Hkv, D], row dtype
    DECODE: struct.Struct("<II"),           # layer, S; payload see decode_parts
    DROP: struct.Struct("<Q"),              # seq id
    STATS: struct.Struct(""), SHUTDOWN: struct.Struct(""), OK: struct.Struct(""),
    ERROR: struct.Struct(""),               # payload: utf-8 message
    OUT: struct.Struct("<IQ"),              # S, kernel nanoseconds; payload o f32 [S, Hq, D]
    STATS_REPLY: struct.Struct("<7Q"),      # see STATS_FIELDS
}
STATS_FIELDS = ("sequences", "tokens", "bytes_used", "bytes_reserved", "bytes_free", "bytes_spare", "threads")
KV_DTYPES = {0: "float16", 1: "float32", 2: "int8", 3: "bfloat16"}  # CONFIGURE's dtype code -> the KV element type
KV_CODES = {name: code for code, name in KV_DTYPES.items()}


def decode_parts(S, n_heads, n_kv_heads, head_dim, row_dtype, q_dtype):
    """The DECODE payload, in order: ids u64 [S], positions u32 [S], q [S, Hq, D] in q_dtype,
    k, v [S, Hkv, D] in the row dtype that travels (float16 for an int8 cache, see above).
    Both ends build it from here."""
    return [(np.uint64, (S,)), (np.uint32, (S,)), (q_dtype, (S, n_heads, head_dim)),
            (row_dtype, (S, n_kv_heads, head_dim)), (row_dtype, (S, n_kv_heads, head_dim))]


class ProtocolError(Exception):
    """The peer broke framing: the connection cannot continue."""


# --- frames ---


def recv_exact(sock, view):
    """Fill the memoryview from the socket with recv_into; EOF mid-frame is a ConnectionError."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("connection closed")
        got += n


def send_frame(sock, mtype, meta=(), payload=()):
    """payload: a sequence of bytes-like objects (numpy arrays are sent without a copy). One
    sendmsg for the whole frame where the socket takes it at once (one system call, not one per
    part); the rest, if any, with sendall."""
    m = META[mtype].pack(*meta)
    # arrays as their bytes: NumPy exports no buffer for ml_dtypes' bfloat16, a uint8 view of it is free
    bufs = [memoryview(p.view(np.uint8) if isinstance(p, np.ndarray) else p).cast("B") for p in payload]
    total = sum(len(b) for b in bufs)
    parts = [HEADER.pack(MAGIC, VERSION, mtype, 0, len(m), total) + m, *bufs]
    sent = sock.sendmsg(parts)
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
            continue
        sock.sendall(part[sent:])
        sent = 0


class FrameReader:
    """Receives frames into one reusable buffer per connection (no allocation per frame)."""

    def __init__(self, sock, max_frame=DEFAULT_MAX_FRAME):
        self.sock, self.max_frame = sock, max_frame
        self.head = bytearray(HEADER.size)
        self.buf = np.empty(1 << 20, dtype=np.uint8)

    def read(self):
        """-> (type, meta tuple, payload memoryview valid until the next read). The meta and the
        payload arrive in one receive into the buffer (two system calls a frame, not three)."""
        hv = memoryview(self.head)
        recv_exact(self.sock, hv[:HEADER.size])
        magic, ver, mtype, _, mlen, plen = HEADER.unpack_from(self.head)
        if magic != MAGIC or ver != VERSION:
            raise ProtocolError(f"bad magic/version {bytes(magic)!r}/{ver}")
        if mtype not in META or mlen != META[mtype].size:
            raise ProtocolError(f"unknown message type {mtype} or meta length {mlen}")
        if plen > self.max_frame:
            raise ProtocolError(f"payload of {plen} bytes exceeds the {self.max_frame}-byte frame cap")
        if mlen + plen > self.buf.nbytes:
            self.buf = np.empty(max(mlen + plen, 2 * self.buf.nbytes), dtype=np.uint8)
        body = memoryview(self.buf)[:mlen + plen]
        recv_exact(self.sock, body)
        # the payload starts at offset mlen: arrays over it may be unaligned, which NumPy allows
        return mtype, META[mtype].unpack_from(body[:mlen]), body[mlen:]


def split_payload(payload, parts):
    """Cut a payload into arrays: parts = [(dtype, shape), ...]; sizes must add up exactly.
    (math.prod and frombuffer's offset: 5x faster than np.prod and a sliced memoryview, 25 ->
    5 us for a DECODE frame, a fifth of a batch-1 worker call's Python.)"""
    out, off = [], 0
    for dtype, shape in parts:
        dtype, count = np.dtype(dtype), math.prod(shape)
        n = count * dtype.itemsize
        if off + n > len(payload):
            raise ValueError(f"payload of {len(payload)} bytes is too short for {parts}")
        out.append(np.frombuffer(payload, dtype, count, off).reshape(shape))
        off += n
    if off != len(payload):
        raise ValueError(f"payload has {len(payload) - off} unexpected trailing bytes")
    return out


# --- the handshake: the worker challenges, the engine answers ---


def _answer(secret, nonce):
    return hmac.new(secret, nonce, hashlib.sha256).digest() if secret is not None else bytes(32)


def check_bind(host, secret):
    """A worker may listen on loopback as it is; on any other address only with a shared secret
    (rpart.py's --secret-file). Raises ValueError."""
    addr = ipaddress.ip_address(socket.gethostbyname(host))
    if not addr.is_loopback and secret is None:
        raise ValueError(f"refusing to listen on {host} ({addr}) without --secret-file: "
                         "workers beyond loopback require a shared secret")


def read_secret(path):
    """The shared secret in the file at `path` (--secret-file; whitespace around it dropped), or
    None when no file is named. Raises OSError if it cannot be read, ValueError if it is empty."""
    if not path:
        return None
    with open(path, "rb") as f:
        secret = f.read().strip()
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


def challenge(sock, reader, secret):
    """Worker side: send HELLO, check the AUTH answer. -> True when the peer may go on (an
    ERROR frame has been sent when not)."""
    nonce = secrets.token_bytes(32)
    send_frame(sock, HELLO, (int(secret is not None), nonce))
    mtype, meta, _ = reader.read()
    if mtype != AUTH or not hmac.compare_digest(meta[0], _answer(secret, nonce)):
        send_frame(sock, ERROR, (), (b"authentication failed",))
        return False
    return True


def answer_challenge(sock, reader, secret, addr):
    """Engine side: read HELLO, send AUTH. Raises PermissionError when the worker needs a
    secret and none was given (a wrong secret shows as the worker's ERROR on the next reply)."""
    mtype, meta, _ = reader.read()
    if mtype != HELLO:
        raise ProtocolError(f"{addr}: expected HELLO, got message type {mtype}")
    needs_auth, nonce = meta
    if needs_auth and secret is None:
        raise PermissionError(f"{addr}: worker requires a shared secret")
    send_frame(sock, AUTH, (_answer(secret if needs_auth else None, nonce),))

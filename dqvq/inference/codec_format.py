"""The `.dqvq` file: a small header, then the range-coded token stream.

`dqvq.codec` writes one file per image. All integers are little-endian:

  offset  bytes  field
  0       4      magic b'DQVQ'
  4       1      format version (1)
  5       1      flags: bit 0 set = a class label follows the image size
  6       8      fingerprint of the generator that coded it (tokenizer
                 weights, transformer weights and token layout); decoding
                 with any other generator cannot give the same tokens
  14      2      image height in pixels
  16      2      image width in pixels
  (18     2      class label, when flag bit 0 is set)
  +0      4      payload length in bytes
  +4      4      CRC-32 of the header bytes before it, the payload and
                 the token streams it codes (`checksum`)
  +8      n      payload: the range coder's 32-bit words, big-endian, with
                 trailing bytes the decoder does not need left off (it reads
                 zeros in their place)

The header is 26 bytes (28 with a class label). The checksum covers the
payload, so any flipped bit is caught (even one in the tail that the range
decoder would not notice), and what the decoder reconstructs, so it also
catches a decoder that diverges from the encoder (another platform's
floating point, see `dqvq.inference.stream_coder`). Every way a file can be
unreadable raises `CodecError` (a ValueError) naming what is wrong.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np

MAGIC = b'DQVQ'
VERSION = 1
SUFFIX = '.dqvq'
_FIXED = struct.Struct('<4sBB8sHH')   # magic .. width
_LABEL = struct.Struct('<H')
_TAIL = struct.Struct('<II')          # payload length, checksum
_HAS_LABEL = 1


class CodecError(ValueError):
  """A .dqvq file that cannot be decoded as it is (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Header:
  """What a .dqvq file says about its image, before the payload."""
  fingerprint: str        # 16 hex digits (`dqvq.codec.generator_fingerprint`)
  height: int
  width: int
  label: int | None       # None: the generator is unconditional
  payload_size: int = 0
  checksum: int = 0

  def prefix(self) -> bytes:
    """The header bytes the checksum covers (all but the checksum)."""
    flags = _HAS_LABEL if self.label is not None else 0
    out = _FIXED.pack(MAGIC, VERSION, flags, bytes.fromhex(self.fingerprint),
                      self.height, self.width)
    if self.label is not None:
      out += _LABEL.pack(self.label)
    return out + struct.pack('<I', self.payload_size)

  @property
  def size(self) -> int:
    return len(self.prefix()) + 4


def checksum(header: Header, payload: bytes, content: np.ndarray,
             position: np.ndarray) -> int:
  """CRC-32 of the header prefix, the payload and the (L,) int32 streams."""
  crc = zlib.crc32(payload, zlib.crc32(header.prefix()))
  for stream in (content, position):
    crc = zlib.crc32(np.ascontiguousarray(stream, '<i4').tobytes(), crc)
  return crc


def pack(header: Header, payload: bytes, content: np.ndarray,
         position: np.ndarray) -> bytes:
  """The file: `header` (its size and checksum set here) + payload.

  `content` / `position` are the (L,) token streams the payload codes.
  """
  if header.label is not None and not 0 <= header.label < 2**16:
    raise ValueError(f'class label {header.label} does not fit the format '
                     '(0..65535).')
  header = dataclasses.replace(header, payload_size=len(payload))
  crc = checksum(header, payload, content, position)
  return header.prefix() + struct.pack('<I', crc) + payload


def unpack(data: bytes, name: str = 'the file') -> tuple[Header, bytes]:
  """(Header, payload) of a .dqvq file; CodecError if it is not a whole one."""
  data = bytes(data)
  if data[:len(MAGIC)] != MAGIC:
    raise CodecError(f'{name} is not a .dqvq file (it starts with '
                     f'{data[:len(MAGIC)]!r}, not {MAGIC!r}).')
  if len(data) < _FIXED.size:
    raise CodecError(f'{name} is truncated: {len(data)} bytes, shorter than '
                     'the header.')
  _, version, flags, fingerprint, height, width = _FIXED.unpack_from(data)
  if version != VERSION:
    raise CodecError(f'{name} is a version-{version} .dqvq file; this dqvq '
                     f'reads version {VERSION}'
                     + (': upgrade dqvq.' if version > VERSION else '.'))
  if flags & ~_HAS_LABEL:
    raise CodecError(f'{name}: unknown header flags {flags:#04x} (the header '
                     'is damaged).')
  offset, label = _FIXED.size, None
  if flags & _HAS_LABEL:
    if len(data) < offset + _LABEL.size:
      raise CodecError(f'{name} is truncated inside its header.')
    (label,) = _LABEL.unpack_from(data, offset)
    offset += _LABEL.size
  if len(data) < offset + _TAIL.size:
    raise CodecError(f'{name} is truncated inside its header ({len(data)} '
                     f'bytes, the header needs {offset + _TAIL.size}).')
  payload_size, crc = _TAIL.unpack_from(data, offset)
  payload = data[offset + _TAIL.size:]
  if len(payload) < payload_size:
    raise CodecError(f'{name} is truncated: its header announces '
                     f'{payload_size} payload bytes, {len(payload)} are there.')
  if len(payload) > payload_size:
    raise CodecError(f'{name} has {len(payload) - payload_size} bytes past '
                     f'the {payload_size} payload bytes its header announces '
                     '(two files joined, or a damaged header).')
  header = Header(fingerprint.hex(), height, width, label, payload_size, crc)
  return header, payload


def words(payload: bytes) -> np.ndarray:
  """Payload bytes -> the range decoder's uint32 words (zeros fill the tail)."""
  padded = payload + bytes(-len(payload) % 4)
  return np.frombuffer(padded, '>u4').astype(np.uint32)


def payload_bytes(compressed: np.ndarray) -> bytes:
  """The range encoder's uint32 words -> payload bytes, big-endian."""
  return np.asarray(compressed, np.uint32).astype('>u4').tobytes()

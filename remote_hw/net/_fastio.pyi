# Type stub of the C extension remote_hw/net/_fastio.c (see its docstrings).
import threading
from typing import Any

from remote_hw.protocol import IoRequestFields

def configure(id_str: dict[bytes, str], id_bytes: dict[str, bytes],
              opt_id_bytes: dict[str, bytes], statuses: int, kinds: int,
              directions: int, io_fields: type[IoRequestFields], /) -> None: ...
def request(fd: int, wlock: threading.Lock, request_id: int, vm_id: int, client_id: int,
            offset: int, data: int, kind: int, size: int, direction: int, hops: int,
            server_id: str, device_id: str, /) -> tuple[int, int] | bytes | None | Any: ...
def post(fd: int, wlock: threading.Lock, request_id: int, vm_id: int, client_id: int,
         offset: int, data: int, kind: int, size: int, hops: int, server_id: str,
         device_id: str, /) -> bool: ...
def recv_io(fd: int, /) -> IoRequestFields | bytes | None: ...
def send_feedback(fd: int, request_id: int, vm_id: int, client_id: int, status: int,
                  size: int, data: int, /) -> bool: ...

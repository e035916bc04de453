# Type stub of the C extension remote_hw/bridge/_fastvfu.c (see its docstrings).
_Access = tuple[int, int, int, int, int, int, int]

def recv_access(fd: int, fds: list[int], ready: bool, /
                ) -> _Access | list[_Access] | bytes: ...
def send_reply(fd: int, msg_id: int, command: int, offset: int, region: int, count: int,
               value: int, /) -> None: ...

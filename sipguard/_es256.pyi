"""Type stub of sipguard/_es256.c: ES256 checks on threads that never take the GIL."""

class Key:
    """A P-256 public key for :meth:`Pool.submit`."""

def key(der: bytes) -> Key:
    """A P-256 SubjectPublicKeyInfo (DER); ValueError for anything else."""

def verify(key: Key, data: bytes, sig: bytes) -> int:
    """One check in this thread: 1 valid, 0 not, -1 could not be set up."""

class Pool:
    fd: int
    waiting: int
    running: int
    capacity: int
    def __init__(self, capacity: int) -> None: ...
    def threads(self, n: int) -> None: ...
    def submit(self, token: int, key: Key, data: bytes, sig: bytes) -> bool: ...
    def take(self) -> list[tuple[int, int]]: ...
    def close(self) -> None: ...

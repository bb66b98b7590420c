# The C fast path of the parser (sipguard/sip/_scan.c).
def scan(
    data: bytes, start: int, eol: int, end: int, cache: dict[bytes, str], max_headers: int,
    max_line: int, /,
) -> tuple[list[bytes], list[str], dict[str, list[int]]] | None: ...
def check(
    lines: list[bytes], index: dict[str, list[int]], methods: dict[bytes, str], request: bool,
    datagram: bool, body_length: int, /,
) -> tuple[tuple[int, str], int | None, int | None, str] | None: ...
def value_text(line: bytes, /) -> str: ...

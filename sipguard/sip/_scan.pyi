# The C fast path of the parser's header scan (sipguard/sip/_scan.c).
def scan(
    data: bytes, start: int, eol: int, end: int, cache: dict[bytes, str], max_headers: int,
    max_line: int, /,
) -> tuple[list[bytes], list[str], dict[str, list[int]]] | None: ...

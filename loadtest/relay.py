"""The Python floor: a UDP relay that does no SIP work, for the ``relay`` path of ``run.py``.

What one call costs a Python process on this machine before any SIP processing: the same
runtime as sipguard (CPython, uvloop, one ``recvfrom``/``sendto`` pair per datagram), and per
datagram only a ``find`` for the Call-ID and a dict operation. Requests from anyone but the core
go to the core, the sender remembered by Call-ID; datagrams from the core go back to the sender
of their Call-ID. No parsing, no Via, no transactions, no rules, no logging — it is not a proxy
and forwards anything; the comparison uses it to split sipguard's CPU per call into what the
runtime costs and what sipguard's own work costs.

    .venv/bin/python loadtest/relay.py --listen 127.0.0.1:5070 --core 127.0.0.1:5080

Prints ``relay ready`` once bound. The Call-ID table is cleared when it reaches ``--max-calls``
(a load-test tool, not a router: a call cut by the clearing shows up as failed).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any


def host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Relay(asyncio.DatagramProtocol):
    def __init__(self, core: tuple[str, int], max_calls: int) -> None:
        self.core = core
        self.max_calls = max_calls
        self.senders: dict[bytes, Any] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's UDPTransport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        start = data.find(b"\nCall-ID:")
        if start < 0:
            start = data.find(b"\ni:")
            if start < 0:
                return
        end = data.find(b"\r", start + 3)
        call_id = data[start + 3 : end]
        transport = self.transport
        assert transport is not None
        if addr == self.core:
            back = self.senders.get(call_id)
            if back is not None:
                transport.sendto(data, back)
            return
        senders = self.senders
        if call_id not in senders and len(senders) >= self.max_calls:
            senders.clear()
        senders[call_id] = addr
        transport.sendto(data, self.core)


async def serve(listen: tuple[str, int], core: tuple[str, int], max_calls: int) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: Relay(core, max_calls), local_addr=listen)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("relay ready", flush=True)
    try:
        await stop.wait()
    finally:
        transport.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=host_port, required=True, metavar="HOST:PORT")
    ap.add_argument("--core", type=host_port, required=True, metavar="HOST:PORT")
    ap.add_argument("--max-calls", type=int, default=200_000)
    args = ap.parse_args()
    try:
        import uvloop
    except ImportError:  # the same loop as sipguard when it is installed
        asyncio.run(serve(args.listen, args.core, args.max_calls))
    else:
        uvloop.run(serve(args.listen, args.core, args.max_calls))


if __name__ == "__main__":
    main()

"""A small stand-in for sipguard, used to validate the SIPp scenarios and the e2e harness.

It is NOT part of sipguard and enforces no policy.  It speaks the same command line
(``run --config FILE --listen udp://H:P --listen tcp://H:P --core udp://H:P``) and prints
the same two JSON log events the harness relies on (``sipguard_started`` once bound,
``invite_decided`` per initial INVITE), and behaves like a minimal transaction-stateful,
record-routing proxy so that the scenarios see what they will see through sipguard:

* answers ``100 Trying`` to every INVITE at once and absorbs request retransmissions
  (re-sending the last response upstream instead of forwarding them);
* adds its Via (branch derived from the incoming top branch, so a CANCEL or a non-2xx
  ACK maps onto the INVITE's branch) and, on dialog-creating INVITEs, a Record-Route;
* pops its own Route entry and forwards by the next Route or the Request-URI; initial
  requests go to ``--core``;
* answers CANCEL itself with 200 and sends its own CANCEL (single Via) downstream,
  absorbing the downstream 200 (``MOCK_CANCEL_200_DELAY_MS`` delays the upstream 200,
  to exercise a 487 overtaking it);
* ACKs non-2xx final responses hop by hop and absorbs the caller's ACK for them.

Use with the harness: ``SIPGUARD_E2E_CMD="python tests/e2e/mock_proxy.py" pytest -m e2e``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

Addr = tuple[str, int]


def log(event: str, **kw: Any) -> None:
    print(json.dumps({"event": event, "ts": time.time(), **kw}), flush=True)


@dataclass
class Msg:
    first: str
    headers: list[list[str]]
    body: bytes

    @property
    def is_request(self) -> bool:
        return not self.first.startswith("SIP/2.0")

    @property
    def method(self) -> str:
        return self.first.split(" ", 1)[0]

    @property
    def status(self) -> int:
        return int(self.first.split(" ", 2)[1])

    @property
    def ruri(self) -> str:
        return self.first.split(" ")[1]

    def get(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        out: list[str] = []
        for n, v in self.headers:
            if n.lower() == name.lower():
                out.extend(split_commas(v))
        return out

    def remove_first_value(self, name: str) -> str | None:
        for i, (n, v) in enumerate(self.headers):
            if n.lower() == name.lower():
                vals = split_commas(v)
                first = vals.pop(0)
                if vals:
                    self.headers[i][1] = ", ".join(vals)
                else:
                    del self.headers[i]
                return first
        return None

    def set(self, name: str, value: str) -> None:
        for h in self.headers:
            if h[0].lower() == name.lower():
                h[1] = value
                return
        self.headers.append([name, value])

    def encode(self) -> bytes:
        self.set("Content-Length", str(len(self.body)))
        head = self.first + "\r\n" + "".join(f"{n}: {v}\r\n" for n, v in self.headers)
        return head.encode() + b"\r\n" + self.body

    def copy(self) -> Msg:
        return Msg(self.first, [list(h) for h in self.headers], self.body)


COMPACT = {
    "v": "Via",
    "f": "From",
    "t": "To",
    "i": "Call-ID",
    "m": "Contact",
    "l": "Content-Length",
}


def split_commas(v: str) -> list[str]:
    out, depth, cur, quote = [], 0, "", False
    for ch in v:
        if ch == '"':
            quote = not quote
        elif ch == "<" and not quote:
            depth += 1
        elif ch == ">" and not quote:
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse(data: bytes) -> Msg:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    headers: list[list[str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:
            headers[-1][1] += " " + line.strip()
            continue
        n, _, v = line.partition(":")
        n = n.strip()
        headers.append([COMPACT.get(n, n), v.strip()])
    return Msg(lines[0], headers, body)


def uri_hostport(uri: str) -> tuple[Addr, str]:
    """(host, port), transport of a SIP URI or name-addr."""
    m = re.search(r"<([^>]*)>", uri)
    if m:
        uri = m.group(1)
    uri = uri.split(":", 1)[1] if uri.lower().startswith("sip:") else uri
    uri = uri.split("@", 1)[-1]
    hp, _, params = uri.partition(";")
    host, _, port = hp.partition(":")
    tm = re.search(r"transport=(\w+)", params, re.I)
    return (host, int(port or 5060)), (tm.group(1).lower() if tm else "udp")


def via_addr(via: str) -> tuple[Addr, str]:
    proto, _, rest = via.partition(" ")
    transport = proto.rsplit("/", 1)[-1].lower()
    sent_by, _, params = rest.strip().partition(";")
    host, _, port = sent_by.partition(":")
    pm = dict((p.split("=", 1) + [""])[:2] for p in params.split(";") if p)
    host = pm.get("received") or host
    if pm.get("rport"):
        port = pm["rport"]
    return (host, int(port or 5060)), transport


def branch_of(via: str) -> str:
    m = re.search(r"branch=([^;,\s]+)", via)
    return m.group(1) if m else ""


@dataclass
class Flow:
    transport: str
    addr: Addr
    writer: asyncio.StreamWriter | None = None


@dataclass
class ServerTxn:
    flow: Flow
    last_response: bytes | None = None
    final: int = 0


@dataclass
class ClientTxn:
    upstream: ServerTxn | None
    request: Msg
    flow: Flow
    final: int = 0
    absorb: bool = False


@dataclass
class Proxy:
    listens: dict[str, Addr]
    core: tuple[Addr, str]
    udp: asyncio.DatagramTransport | None = None
    tcp_conns: dict[Addr, asyncio.StreamWriter] = field(default_factory=dict)
    stxns: dict[tuple[str, str], ServerTxn] = field(default_factory=dict)
    ctxns: dict[tuple[str, str], ClientTxn] = field(default_factory=dict)
    cancel_delay: float = float(os.environ.get("MOCK_CANCEL_200_DELAY_MS", "0")) / 1000

    def me(self, transport: str) -> Addr:
        return self.listens.get(transport) or next(iter(self.listens.values()))

    def is_me(self, uri: str) -> bool:
        (host, port), _ = uri_hostport(uri)
        return any((host, port) == a for a in self.listens.values())

    async def send(self, flow: Flow, data: bytes) -> None:
        if flow.transport == "udp":
            assert self.udp is not None
            self.udp.sendto(data, flow.addr)
            return
        w = flow.writer or self.tcp_conns.get(flow.addr)
        if w is None or w.is_closing():
            reader, w = await asyncio.open_connection(*flow.addr)
            self.tcp_conns[flow.addr] = w
            asyncio.get_running_loop().create_task(self.tcp_reader(reader, w, flow.addr))
        w.write(data)

    def respond(self, req: Msg, code: int, reason: str, to_tag: str | None = None) -> bytes:
        r = Msg(f"SIP/2.0 {code} {reason}", [], b"")
        for n in ("Via", "From", "To", "Call-ID", "CSeq"):
            for nn, v in req.headers:
                if nn.lower() == n.lower():
                    r.headers.append([n, v])
        if to_tag and "tag=" not in (r.get("To") or ""):
            r.set("To", (r.get("To") or "") + ";tag=" + to_tag)
        return r.encode()

    async def on_message(self, data: bytes, flow: Flow) -> None:
        try:
            msg = parse(data)
        except Exception:
            return
        if msg.is_request:
            await self.on_request(msg, flow)
        else:
            await self.on_response(msg)

    async def on_request(self, req: Msg, flow: Flow) -> None:
        top_via = req.get_all("Via")[0]
        if flow.transport == "tcp" and flow.writer is not None:
            self.tcp_conns.setdefault(via_addr(top_via)[0], flow.writer)
        br = branch_of(top_via)
        method = req.method
        key = (br, "INVITE" if method == "ACK" else method)
        stx = self.stxns.get(key)
        if method == "ACK":
            if stx is not None and stx.final >= 300:
                return  # ACK for a non-2xx: we ACKed downstream already
        elif stx is not None:
            if stx.last_response:
                await self.send(stx.flow, stx.last_response)
            return  # retransmission: absorbed
        if method == "CANCEL":
            await self.on_cancel(req, flow, br)
            return
        stx: ServerTxn | None = None
        if method != "ACK":
            stx = self.stxns[key] = ServerTxn(flow)
        if method == "INVITE" and stx is not None:
            stx.last_response = self.respond(req, 100, "Trying")
            await self.send(flow, stx.last_response)
        fwd = req.copy()
        mf = int(fwd.get("Max-Forwards") or 70)
        if mf <= 0:
            await self.send(flow, self.respond(req, 483, "Too Many Hops"))
            return
        fwd.set("Max-Forwards", str(mf - 1))
        routes = fwd.get_all("Route")
        if routes and self.is_me(routes[0]):
            fwd.remove_first_value("Route")
            routes = routes[1:]
        to_tag = "tag=" in (fwd.get("To") or "")
        if routes:
            dest, transport = uri_hostport(routes[0])
        elif not to_tag and method in ("INVITE", "OPTIONS", "MESSAGE"):
            dest, transport = self.core
            if method == "INVITE":
                log("invite_decided", call_id=fwd.get("Call-ID"), action="allow")
        else:
            dest, transport = uri_hostport(fwd.ruri)
        me = self.me(transport)
        mybr = "z9hG4bK-mp-" + hashlib.sha1(br.encode()).hexdigest()[:16]
        if method == "ACK":
            mybr += "-ack"
        fwd.headers.insert(0, ["Via", f"SIP/2.0/{transport.upper()} {me[0]}:{me[1]};branch={mybr}"])
        if method == "INVITE" and not to_tag:
            fwd.headers.insert(
                1, ["Record-Route", f"<sip:{me[0]}:{me[1]};transport={transport};lr>"]
            )
        out = Flow(transport, dest)
        if method != "ACK":
            self.ctxns[(mybr, method)] = ClientTxn(stx, fwd, out)
        await self.send(out, fwd.encode())

    async def on_cancel(self, req: Msg, flow: Flow, br: str) -> None:
        inv = self.stxns.get((br, "INVITE"))
        ok = self.respond(
            req, 200 if inv else 481, "OK" if inv else "Call/Transaction Does Not Exist"
        )
        self.stxns[(br, "CANCEL")] = ServerTxn(flow, ok, 200)
        mybr = "z9hG4bK-mp-" + hashlib.sha1(br.encode()).hexdigest()[:16]
        ctx = self.ctxns.get((mybr, "INVITE"))
        if ctx is not None and ctx.final == 0:
            inv_req = ctx.request
            c = Msg(f"CANCEL {inv_req.ruri} SIP/2.0", [], b"")
            c.headers.append(["Via", inv_req.get_all("Via")[0]])
            for n in ("From", "To", "Call-ID"):
                c.headers.append([n, inv_req.get(n) or ""])
            c.headers.append(["CSeq", (inv_req.get("CSeq") or "1").split()[0] + " CANCEL"])
            c.headers.append(["Max-Forwards", "70"])
            self.ctxns[(mybr, "CANCEL")] = ClientTxn(None, c, ctx.flow, absorb=True)
            await self.send(ctx.flow, c.encode())
        if self.cancel_delay:
            await asyncio.sleep(self.cancel_delay)
        await self.send(flow, ok)

    async def on_response(self, resp: Msg) -> None:
        top = resp.get_all("Via")
        if not top:
            return
        br = branch_of(top[0])
        cseq = (resp.get("CSeq") or "1 X").split()
        method = cseq[1] if len(cseq) > 1 else ""
        ctx = self.ctxns.get((br, method))
        if ctx is None:
            # stray 2xx retransmission of an INVITE: forward statelessly
            if not br.startswith("z9hG4bK-mp-") or len(top) < 2:
                return
            resp.remove_first_value("Via")
            dest, transport = via_addr(resp.get_all("Via")[0])
            await self.send(Flow(transport, dest), resp.encode())
            return
        code = resp.status
        if code == 100:
            return  # hop by hop, never relayed
        if code >= 200:
            ctx.final = code
        if ctx.absorb:
            return
        if method == "INVITE" and code >= 300:
            ack = Msg(f"ACK {ctx.request.ruri} SIP/2.0", [], b"")
            ack.headers.append(["Via", ctx.request.get_all("Via")[0]])
            for n in ("From", "Call-ID"):
                ack.headers.append([n, ctx.request.get(n) or ""])
            ack.headers.append(["To", resp.get("To") or ""])
            ack.headers.append(["CSeq", cseq[0] + " ACK"])
            ack.headers.append(["Max-Forwards", "70"])
            await self.send(ctx.flow, ack.encode())
            if ctx.upstream is not None and ctx.upstream.final >= 300:
                return  # retransmitted final: already relayed, our ACK repeated
        resp.remove_first_value("Via")
        data = resp.encode()
        stx = ctx.upstream
        if stx is None:
            return
        if code > 100:
            stx.last_response = data
        if code >= 200:
            stx.final = code
        await self.send(stx.flow, data)

    async def tcp_reader(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Addr
    ) -> None:
        buf = b""
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf += chunk
                while True:
                    buf = buf.lstrip(b"\r\n")
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    m = re.search(
                        rb"\r\n(?:Content-Length|l)[ \t]*:[ \t]*(\d+)", buf[: end + 2], re.I
                    )
                    blen = int(m.group(1)) if m else 0
                    if len(buf) < end + 4 + blen:
                        break
                    data, buf = buf[: end + 4 + blen], buf[end + 4 + blen :]
                    await self.on_message(data, Flow("tcp", peer, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            for k, w in list(self.tcp_conns.items()):
                if w is writer:
                    del self.tcp_conns[k]
            writer.close()


class UdpProto(asyncio.DatagramProtocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def datagram_received(self, data: bytes, addr: Any) -> None:
        asyncio.get_running_loop().create_task(
            self.proxy.on_message(data, Flow("udp", (addr[0], addr[1])))
        )


def parse_url(u: str) -> tuple[str, Addr]:
    m = re.fullmatch(r"(udp|tcp)://([^:/]+):(\d+)", u.strip())
    if not m:
        raise SystemExit(f"bad address {u!r}")
    return m.group(1), (m.group(2), int(m.group(3)))


async def main_async(args: argparse.Namespace) -> None:
    listens = dict(parse_url(u) for u in args.listen)
    ctransport, caddr = parse_url(args.core)
    proxy = Proxy(listens, (caddr, ctransport))
    loop = asyncio.get_running_loop()
    if "udp" in listens:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: UdpProto(proxy), local_addr=listens["udp"]
        )
        proxy.udp = transport  # type: ignore[assignment]
    if "tcp" in listens:

        async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            peer = w.get_extra_info("peername")
            await proxy.tcp_reader(r, w, (peer[0], peer[1]))

        await asyncio.start_server(on_conn, *listens["tcp"])
    log("sipguard_started", listen=args.listen, core=args.core, mock=True)
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--config")
    run.add_argument("--listen", action="append", default=[])
    run.add_argument("--core", required=True)
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

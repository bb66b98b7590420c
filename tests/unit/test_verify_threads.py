"""The signature-check threads (sipguard/verify_threads.py over sipguard/_es256.c): real ES256
signatures checked on real threads, the same answers as ``verify_signature`` in the loop,
answers delivered on the event loop, the queue bound, resizing, closing and the fallback."""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sipguard import verify_threads
from sipguard.policy.passport import Passport, decode_passport, verify_signature
from sipguard.verify_threads import AUTO_MAX, SignatureVerifier, auto_threads

from .stir_pki import new_key, sign_passport

try:
    from sipguard import _es256
except ImportError:
    _es256 = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(_es256 is None, reason="sipguard._es256 not built (sipguard.native)")

X5U = "https://cert.example.org/a.pem"
KEY = new_key()
OTHER = new_key()
ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 n


def passport(i: int = 0) -> Passport:
    return decode_passport(sign_passport(KEY, X5U, iat=1700000000 + i))


def with_signature(p: Passport, sig: bytes) -> Passport:
    return Passport(x5u=p.x5u, attest=p.attest, orig=p.orig, dest=p.dest, iat=p.iat,
                    origid=p.origid, signing_input=p.signing_input, signature=sig)


def c_key(key: ec.EllipticCurvePublicKey) -> _es256.Key:
    return _es256.key(key.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo))


@needs_c
def test_the_c_check_agrees_with_cryptography() -> None:
    """On good signatures, tampered bytes, a wrong key, r or s zero, equal to or above the
    order, all ones and random: the C check and ``verify_signature`` say the same."""
    rng = random.Random(7)
    good = passport()
    n = ORDER.to_bytes(32, "big")
    sigs = [good.signature, bytes(64), b"\xff" * 64, n + good.signature[32:],
            good.signature[:32] + n, bytes(32) + good.signature[32:],
            good.signature[:32] + (ORDER - 1).to_bytes(32, "big"),
            good.signature[:31] + bytes([good.signature[31] ^ 1]) + good.signature[32:]]
    sigs += [rng.randbytes(64) for _ in range(40)]
    cases = [(with_signature(good, s), KEY) for s in sigs]
    cases += [(passport(i), OTHER if i % 2 else KEY) for i in range(10)]
    tampered = Passport(x5u=good.x5u, attest=good.attest, orig=good.orig, dest=good.dest,
                        iat=good.iat, origid=good.origid,
                        signing_input=good.signing_input + b"x", signature=good.signature)
    cases.append((tampered, KEY))
    for p, key in cases:
        expected = verify_signature(p, key.public_key())
        assert _es256.verify(c_key(key.public_key()), p.signing_input, p.signature) == int(
            expected), p.signature.hex()
    assert sum(verify_signature(p, k.public_key()) for p, k in cases) == 6  # 1 + the 5 even i


@needs_c
def test_only_p256_keys_are_taken() -> None:
    with pytest.raises(ValueError):
        _es256.key(b"junk")
    other_curve = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(ValueError):
        c_key(other_curve)


@needs_c
def test_checks_on_threads_answer_on_the_loop() -> None:
    """Good and bad signatures come back right, on the loop, and are counted; the waiting
    gauge goes back to 0."""

    async def run() -> tuple[list[bool], Counter[str], int, int]:
        counters: Counter[str] = Counter()
        verifier = SignatureVerifier(asyncio.get_running_loop(), counters)
        verifier.configure(2, 100)
        assert verifier.threads == 2
        futures = []
        for i in range(40):
            f = verifier.submit(passport(i), (KEY if i % 3 else OTHER).public_key())
            assert f is not None
            futures.append(f)
        waiting = verifier.waiting
        results = list(await asyncio.wait_for(asyncio.gather(*futures), 10))
        verifier.close()
        return results, counters, waiting, verifier.waiting

    results, counters, waiting, after = asyncio.run(run())
    assert results == [bool(i % 3) for i in range(40)]
    assert counters["identity_verify_threaded"] == 40
    assert waiting == 40 and after == 0


@needs_c
def test_full_queue_and_no_threads_mean_verify_in_the_loop() -> None:
    """With no threads submit declines (no counter); past ``max_pending`` waiting checks it
    declines and counts ``identity_verify_queue_full`` — the caller verifies inline."""

    async def run() -> tuple[list[bool], Counter[str]]:
        counters: Counter[str] = Counter()
        verifier = SignatureVerifier(asyncio.get_running_loop(), counters)
        assert verifier.submit(passport(), KEY.public_key()) is None  # no threads yet
        verifier.configure(1, 3)
        # all submitted in one pass of the loop: no answer can have been taken yet
        taken = [verifier.submit(passport(i), KEY.public_key()) for i in range(5)]
        assert [f is not None for f in taken] == [True, True, True, False, False]
        results = await asyncio.wait_for(asyncio.gather(*[f for f in taken if f]), 10)
        again = verifier.submit(passport(), KEY.public_key())  # answered: room again
        assert again is not None and await asyncio.wait_for(again, 10)
        verifier.close()
        assert verifier.submit(passport(), KEY.public_key()) is None  # closed: inline
        return list(results), counters

    results, counters = asyncio.run(run())
    assert results == [True, True, True]
    assert counters["identity_verify_queue_full"] == 2
    assert counters["identity_verify_threaded"] == 4


@needs_c
def test_resize_and_close_end_threads() -> None:
    """Fewer threads: the surplus ones end; 0: checks go back to the loop; close ends all and
    delivers what was queued."""

    async def run() -> None:
        verifier = SignatureVerifier(asyncio.get_running_loop(), Counter())
        pool = verifier._pool
        assert pool is not None
        verifier.configure(3, 10)
        assert pool.running == 3
        verifier.configure(1, 10)
        for _ in range(100):
            if pool.running == 1:
                break
            await asyncio.sleep(0.01)
        assert pool.running == 1
        f = verifier.submit(passport(), KEY.public_key())
        assert f is not None and await asyncio.wait_for(f, 10)
        queued = [verifier.submit(passport(i), KEY.public_key()) for i in range(5)]
        verifier.close()  # waits for the queue, then delivers
        assert pool.running == 0
        assert all(q is not None and q.done() and q.result() for q in queued)

    asyncio.run(run())


@needs_c
def test_a_cancelled_wait_is_skipped() -> None:
    """A call that went away while its check waited: its answer is dropped, the rest are
    delivered."""

    async def run() -> bool:
        verifier = SignatureVerifier(asyncio.get_running_loop(), Counter())
        verifier.configure(1, 10)
        gone = verifier.submit(passport(1), KEY.public_key())
        kept = verifier.submit(passport(2), KEY.public_key())
        assert gone is not None and kept is not None
        gone.cancel()
        ok = await asyncio.wait_for(kept, 10)
        assert verifier.waiting == 0
        verifier.close()
        return ok

    assert asyncio.run(run())


@needs_c
def test_keys_of_other_kinds_are_checked_in_the_loop() -> None:
    """A key that is not P-256 is not handed over (the loop's check refuses it)."""

    async def run() -> None:
        verifier = SignatureVerifier(asyncio.get_running_loop(), Counter())
        verifier.configure(1, 10)
        other = ec.generate_private_key(ec.SECP384R1()).public_key()
        assert verifier.submit(passport(), other) is None
        verifier.close()

    asyncio.run(run())


def test_without_the_extension_every_check_is_in_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_threads, "_es256", None)

    async def run() -> None:
        verifier = SignatureVerifier(asyncio.get_running_loop(), Counter())
        verifier.configure(2, 10)
        assert verifier.threads == 0 and not verify_threads.available()
        assert verifier.submit(passport(), KEY.public_key()) is None
        verifier.close()

    asyncio.run(run())


def test_auto_follows_the_cpu_affinity() -> None:
    """auto: CPUs this process may run on minus one, at most AUTO_MAX."""
    cpus = len(os.sched_getaffinity(0))
    assert auto_threads() == max(0, min(AUTO_MAX, cpus - 1))
    original = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(original)})
        assert auto_threads() == 0
    finally:
        os.sched_setaffinity(0, original)


@needs_c
def test_auto_checks_in_the_loop_until_it_is_busy() -> None:
    """``auto`` hands a check over only while the server reports the loop busy: otherwise
    the caller checks in the loop (counted ``identity_verify_in_loop``), at most
    ``HERE_PER_WINDOW`` per report, the rest to the threads; while busy every check goes to
    the threads. A number of threads set explicitly takes every check whatever the load.
    ``check_here`` gives the threads' answers."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("auto starts no thread on one CPU")

    async def run() -> Counter[str]:
        counters: Counter[str] = Counter()
        verifier = SignatureVerifier(asyncio.get_running_loop(), counters)
        verifier.configure("auto", 1000)
        assert verifier.threads >= 1 and verifier.adaptive
        verifier.note_load(False)
        here = [verifier.submit(passport(i), KEY.public_key())
                for i in range(verify_threads.HERE_PER_WINDOW + 3)]
        assert [f is None for f in here].count(True) == verify_threads.HERE_PER_WINDOW
        assert all(f is not None for f in here[verify_threads.HERE_PER_WINDOW:])
        assert all(await asyncio.wait_for(asyncio.gather(*[f for f in here if f]), 10))
        verifier.note_load(False)  # the next report: the loop's allowance again
        assert verifier.submit(passport(), KEY.public_key()) is None
        verifier.note_load(True)  # busy: every check to the threads
        busy = [verifier.submit(passport(i), KEY.public_key()) for i in range(5)]
        assert all(f is not None for f in busy)
        assert all(await asyncio.wait_for(asyncio.gather(*busy), 10))  # type: ignore[arg-type]
        verifier.note_load(False)  # quiet again: in the loop
        assert verifier.submit(passport(), KEY.public_key()) is None
        assert verifier.check_here(passport(), KEY.public_key())
        assert not verifier.check_here(passport(), OTHER.public_key())
        assert not verifier.check_here(with_signature(passport(), bytes(64)), KEY.public_key())
        verifier.configure(1, 1000)  # a number: every check to the threads, whatever the load
        verifier.note_load(False)
        explicit = verifier.submit(passport(), KEY.public_key())
        assert explicit is not None and await asyncio.wait_for(explicit, 10)
        verifier.close()
        return counters

    counters = asyncio.run(run())
    assert counters["identity_verify_in_loop"] == verify_threads.HERE_PER_WINDOW + 2
    assert counters["identity_verify_threaded"] == 3 + 5 + 1

"""Write loadtest/numbers.csv: SIPp -inf injection file of caller;callee E.164 pairs.

    python loadtest/gen_numbers.py [--count 5000] [--order SEQUENTIAL|RANDOM] [--out FILE]

Callers are +1212555NNNN, callees +1646555NNNN (fictional 555 exchanges), one distinct
caller per line, so a 10 s step at 500 calls/s uses each caller once.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--order", choices=["SEQUENTIAL", "RANDOM"], default="SEQUENTIAL")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "numbers.csv")
    args = ap.parse_args()
    if not 1 <= args.count <= 10000:
        raise SystemExit("--count must be 1..10000")
    lines = [args.order]
    for i in range(args.count):
        lines.append(f"+1212555{i:04d};+1646555{(i * 7919) % 10000:04d};")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.count} lines to {args.out}")


if __name__ == "__main__":
    main()

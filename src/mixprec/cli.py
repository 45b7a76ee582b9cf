"""The ``mixprec`` command line."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .formats import get_format, list_formats


def _fmt_num(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    import math
    e = math.log2(v)
    if e == int(e) and abs(e) >= 4:
        return f"2^{int(e)}"
    return f"{v:.6g}"


def cmd_formats(args: argparse.Namespace) -> int:
    fmts = [get_format(n) for n in args.names] if args.names else list_formats()
    header = ["name", "bits", "E", "M", "bias", "max", "min normal", "min subnormal",
              "inf", "NaN", "storage"]
    rows = [[f.name, str(f.bits), str(f.ebits), str(f.mbits), str(f.bias), _fmt_num(f.max),
             _fmt_num(f.min_normal), _fmt_num(f.min_subnormal),
             "yes" if f.has_inf else "no", f.nan_codes, f.storage] for f in fmts]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixprec", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("formats", help="print the table of number formats and their limits")
    f.add_argument("names", nargs="*", help="formats to show (default: all builtins)")
    f.set_defaults(func=cmd_formats)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"mixprec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

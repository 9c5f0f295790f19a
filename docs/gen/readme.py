"""Bring README.md's generated blocks and figures up to date (`make docs`), or check them (`--check`).

python -m docs.gen.readme           # rewrite README.md in place
python -m docs.gen.readme --check   # exit 1 if README.md is not what its markers generate
"""

import argparse
import sys

from docs.gen.render import sync
from docs.gen.results import ROOT

README = ROOT / "README.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when README.md is out of date")
    args = parser.parse_args()
    text = README.read_text()
    fresh = sync(text)
    if args.check:
        if fresh != text:
            print("README.md is out of date with its generated blocks: run `make docs`", file=sys.stderr)
            sys.exit(1)
        return
    if fresh != text:
        README.write_text(fresh)
        print("README.md: generated blocks updated")


if __name__ == "__main__":
    main()

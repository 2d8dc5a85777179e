"""Print or update the generated reference tables of docs/trace-format.md.

    python -m tracevisor.trace.gendoc                           # print the tables
    python -m tracevisor.trace.gendoc --update docs/trace-format.md
"""

from __future__ import annotations

import sys

from .schema import markdown_tables, update_doc


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--update":
        print(("updated " if update_doc(argv[1]) else "up to date: ") + argv[1])
        return 0
    if argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    sys.stdout.write(markdown_tables())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

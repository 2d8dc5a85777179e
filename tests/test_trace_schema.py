"""schema.py is the one definition; docs/trace-format.md must say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

from tracevisor.trace import schema

DOC = Path(__file__).resolve().parents[1] / "docs" / "trace-format.md"


def test_generated_tables_are_up_to_date():
    text = DOC.read_text(encoding="utf-8")
    start = text.index(schema.DOC_BEGIN)
    end = text.index(schema.DOC_END) + len(schema.DOC_END)
    assert text[start:end] + "\n" == schema.markdown_tables(), (
        "docs/trace-format.md is out of date: run python -m tracevisor.trace.gendoc --update docs/trace-format.md")


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = text.find("\n### ", start + len(heading))
    return text[start : nxt if nxt >= 0 else len(text)]


def test_every_kind_is_documented_with_its_fields():
    text = DOC.read_text(encoding="utf-8")
    for name, kind in schema.KINDS.items():
        section = _section(text, f"### Event kind `{name}`")
        documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", section, re.M))
        assert documented == {f.name for f in kind.fields}, name
        for f in kind.required:
            assert re.search(rf"^\| `{f.name}` \| [^|]+ \| yes \|", section, re.M), (name, f.name)
        for f in kind.optional:
            assert re.search(rf"^\| `{f.name}` \| [^|]+ \| no \|", section, re.M), (name, f.name)


def test_header_footer_and_reasons_are_documented():
    text = DOC.read_text(encoding="utf-8")
    header = _section(text, "### Header fields")
    assert set(re.findall(r"^\| `([a-z_0-9]+)` \|", header, re.M)) == {f.name for f in schema.HEADER_FIELDS}
    footer = _section(text, "### Footer fields")
    assert set(re.findall(r"^\| `([a-z_0-9]+)` \|", footer, re.M)) == {f.name for f in schema.FOOTER_FIELDS}
    reasons = _section(text, "### Exit reasons")
    for num, name in schema.EXIT_REASONS.items():
        assert f"| {num} | {name} |" in reasons


def test_layout_constants_agree():
    assert schema.MAGIC == b"\x89TVT\r\n\x1a\n"
    assert schema.FRAME_HEADER_SIZE == 12 and schema.TRAILER_SIZE == 16
    assert schema.EXIT_ROW_SIZE == 31 and schema.EXIT_ROW_SIZE_V1 == 27
    assert [n for n, _ in schema.EXIT_DTYPE_FIELDS] == list(schema.EXIT_FIELDS) == list(schema.EXIT_FIELD_LAYOUT)
    off = 0
    for name, dt in schema.EXIT_DTYPE_FIELDS:
        assert schema.EXIT_FIELD_LAYOUT[name] == (off, int(dt[-1]))
        off += int(dt[-1])
    assert off == 31
    assert set(schema.HYPERCALL_ARGS) == set(schema.HYPERCALL_PORTS)
    assert schema.reason_name(2) == "IO" and schema.reason_name(200) == "REASON_200"
    for kind in ("virtio", "net"):  # defined in format 1.1 (the network device)
        assert not schema.KINDS[kind].reserved and schema.KINDS[kind].required


def test_numpy_dtype_matches_the_row():
    import numpy as np

    dt = np.dtype(schema.EXIT_DTYPE_FIELDS)
    assert dt.itemsize == schema.EXIT_ROW_SIZE
    row = schema.EXIT_ROW.pack(1, 2, 3, 4, 5, 6, 7, 8, 9)
    assert np.frombuffer(row, dtype=dt).tolist() == [(1, 2, 3, 4, 5, 6, 7, 8, 9)]
    v1 = np.dtype(schema.EXIT_DTYPE_FIELDS_V1)
    assert v1.itemsize == schema.EXIT_ROW_SIZE_V1 == schema.EXIT_ROW_V1.size


def test_hypercall_args_keys_are_what_the_sample_traces_carry():
    """The documented `args` keys come from the hypercall table, and recordings carry exactly them."""
    from pathlib import Path

    from tracevisor.trace import open_trace

    seen = set()
    for path in sorted((Path(__file__).resolve().parent.parent / "traces").glob("*.tvt")):
        for ev in open_trace(path).events(kinds=["hypercall"]):
            assert tuple(ev["args"]) == schema.HYPERCALL_ARGS[ev["call"]], (path.name, ev)
            seen.add(ev["call"])
    assert {"cmdsize", "cmdval", "write", "exit"} <= seen
    assert "uart" not in schema.HYPERCALL_PORTS  # console bytes are console events, never hypercalls


def test_every_host_request_is_named_in_the_schema():
    from tracevisor.hostio import HOST_OPS

    doc = next(f.doc for f in schema.KINDS["hostio"].required if f.name == "op")
    for name in HOST_OPS:
        assert name in doc, name

"""The suite's own rules (tests/README.md): no float compared bit for bit with a recorded value."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).parent.parent
HEX_FLOAT = re.compile(r"[-+]?0x[0-9a-f]+(\.[0-9a-f]*)?p[-+]?\d+", re.IGNORECASE)


def test_fixtures_hold_no_hex_floats():
    """A hex float in a fixture is a value meant to be matched bit for bit."""
    found = [str(f) for f in (TESTS / "data").rglob("*") if f.is_file() and HEX_FLOAT.search(f.read_text())]
    assert not found, f"hex floats (bit-exact recorded values) in {found}"


def test_no_test_parses_recorded_hex_floats():
    offenders = [f.name for f in TESTS.glob("**/*.py") if f.name != Path(__file__).name and "fromhex" in f.read_text()]
    assert not offenders, offenders


def test_tests_reading_a_fixture_compare_through_the_equality_promise():
    readers = [f for f in TESTS.glob("**/test_*.py") if re.search(r"""parent\s*/\s*["']data["']""", f.read_text())]
    assert readers, "no fixture reader found: the check would be empty"
    for f in readers:
        text = f.read_text()
        assert "assert_same_results" in text, f"{f.name} reads tests/data but does not compare with _equality"
        assert not re.search(r"==\s*recorded\[", text), f"{f.name} compares a recorded value with =="

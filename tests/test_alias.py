"""``src/bnfast_alias.h``: the 4K-aliasing rule that picks the flat walks'
direction and keeps the upward leaves from streaming, against the rule written
here.  An input stalls an upward walk where the output lies 1..256 bytes past it
modulo 4 KiB, a downward walk where it lies 1..256 bytes past the output; the
walk goes down where fewer inputs stall it that way (a tie, in place, or no
input: up); NULL inputs never count, whatever the output's place in its page.
(That the directions give the same bits: tests/test_flat_runs.py,
tests/test_flat_tiles.py.)
"""
from conftest import run_c_driver

NEAR = 256


def near(frm, to):
    """``to`` lies 1..NEAR bytes past ``frm`` modulo 4 KiB (None: never)."""
    if frm is None or to is None:
        return False
    return 0 < (to - frm) % 4096 <= NEAR


def test_the_rule_on_every_page_offset(tmp_path):
    lines = run_c_driver(tmp_path, "alias.c").decode().split("\n")
    cases = [line.split() for line in lines if line]
    assert len(cases) == 256 * 21 * 21
    checked_null_near_page_end = False
    for offset, d1, d2, down, stalls in cases:
        out = (1 << 20) + int(offset)
        inputs = [None if d == "null" else out + int(d) for d in (d1, d2)]
        behind = sum(near(i, out) for i in inputs)  # stall a walk up
        ahead = sum(near(out, i) for i in inputs)  # stall a walk down
        assert (int(down), int(stalls)) == (int(behind > ahead), int(behind > 0)), \
            (offset, d1, d2)
        checked_null_near_page_end |= "null" in (d1, d2) and int(offset) >= 4096 - NEAR
    assert checked_null_near_page_end

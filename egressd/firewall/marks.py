"""Who else writes the conntrack mark bits egressd owns (pure: parses ruleset dumps).

egressd continues an established flow only when its conntrack mark carries the profile's
id under ``ct_mask``. Another rule on the host that writes those bits (a CONNMARK
``--set-mark`` or ``--save-mark`` with a wide mask, an nft ``ct mark set``) could stamp a
foreign flow with a profile's id, which would let the agent continue it, or wipe the id off
the agent's own flows, which would cut them. Reading marks (``--restore-mark``, ``-m
connmark``) and packet marks (``MARK``, ``meta mark``) are harmless and not reported.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from typing import Any

from .rules import CHAIN_PREFIX

FULL = 0xFFFFFFFF


def _mask(value: str) -> int:
    """``V/M`` -> M, ``V`` -> all bits (what iptables does without a mask)."""
    return int(value.split("/", 1)[1], 0) if "/" in value else FULL


def _connmark_writes(args: list[str]) -> int:
    """The ctmark bits one CONNMARK target's options write."""
    written = 0
    for i, arg in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else ""
        if arg in ("--set-xmark", "--set-mark"):
            written |= _mask(nxt)
        elif arg == "--save-mark":
            ctmask = FULL
            for j, opt in enumerate(args):
                if opt in ("--ctmask", "--mask") and j + 1 < len(args):
                    ctmask = int(args[j + 1], 0)
            written |= ctmask
    return written


def iptables_writers(saved: str, mask: int) -> Iterator[str]:
    """Rules of an ``iptables-save`` dump that write ctmark bits inside ``mask``."""
    table = ""
    for line in saved.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if not line.startswith("-A ") or " CONNMARK" not in line:
            continue
        try:
            args = shlex.split(line)
        except ValueError:
            args = line.split()
        if len(args) < 2 or args[1].startswith(CHAIN_PREFIX):
            continue
        try:
            j = args.index("-j")
        except ValueError:
            continue
        if args[j + 1 : j + 2] != ["CONNMARK"]:
            continue
        try:
            written = _connmark_writes(args[j + 2 :])
        except ValueError:
            written = FULL  # a mask we cannot read: assume the worst
        if written & mask:
            yield f"{table}: {line}"


def _is_ct_mark(expr: Any) -> bool:
    return isinstance(expr, dict) and expr.get("ct", {}).get("key") == "mark"


def _nft_writes(value: Any) -> int:
    """Bits of the ct mark an nft ``ct mark set VALUE`` statement changes."""
    if isinstance(value, dict):
        for op in ("|", "^"):
            operands = value.get(op)
            if isinstance(operands, list) and operands:
                kept = operands[0]
                if isinstance(kept, dict) and isinstance(kept.get("&"), list):
                    a = kept["&"]
                    if len(a) == 2 and _is_ct_mark(a[0]) and isinstance(a[1], int):
                        return ~a[1] & FULL  # ct mark and KEEP or/xor V
    return FULL


def nft_writers(ruleset_json: str, mask: int) -> Iterator[str]:
    """Rules of ``nft -j list ruleset`` (native nft syntax) that write bits in ``mask``.

    iptables-nft's own rules show up here as opaque ``xt`` expressions; those are read from
    ``iptables-save`` instead.
    """
    try:
        data = json.loads(ruleset_json)
    except ValueError:
        return
    items = data.get("nftables", []) if isinstance(data, dict) else []
    for item in items:
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or str(rule.get("chain", "")).startswith(CHAIN_PREFIX):
            continue
        for stmt in rule.get("expr", []):
            m = stmt.get("mangle") if isinstance(stmt, dict) else None
            if (
                isinstance(m, dict)
                and _is_ct_mark(m.get("key"))
                and _nft_writes(m.get("value")) & mask
            ):
                yield (
                    f"nft {rule.get('family')} {rule.get('table')} {rule.get('chain')} "
                    f"handle {rule.get('handle')}: ct mark set"
                )

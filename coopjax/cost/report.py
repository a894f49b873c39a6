r"""What a compiled step communicates: collectives, bytes, and where they run.

:func:`comm_report` compiles a step and reads the optimized HLO that XLA will
execute (``jitted.lower(*args).compile().as_text()``). Each cross-device
collective (all-reduce, collective-permute, all-gather, all-to-all,
reduce-scatter, collective-broadcast; for asynchronous pairs the ``-start``
half) becomes one :class:`Collective` with

* ``kind`` (``-start`` removed) and the HLO instruction ``name``;
* ``bytes``: the size of its operands on one device (from their shapes and
  dtypes; for an all-gather the local piece, for an all-reduce the buffer
  reduced), and ``result_bytes``;
* ``wire``: those operand bytes per HLO dtype, ``(("u8", 5000), ("f32", 4))``:
  what actually travels (a compressed mix should show ``u8``/``s32``
  payloads; a collective on 8-bit floats shows the ``f16`` it was widened to);
* ``in_branch``: whether its computation is reachable from the entry only
  through a branch of a ``conditional`` (``lax.cond``), i.e. whether it runs
  only on the steps that take that branch. For the cooperative step that is
  the mixing branch, ``k mod τ = 0``: a collective with ``in_branch=False``
  runs on every step, off-steps included;
* ``in_loop``: whether it sits inside a ``while`` loop (a ``lax.scan`` over
  a period's steps) or outside every loop, as a reduction issued before the
  loop is.

  >>> text = '''
  ... %mix (p: f32[4]) -> f32[4] {
  ...   %p = f32[4]{0} parameter(0)
  ...   ROOT %cp = f32[4]{0} collective-permute(%p), source_target_pairs={{0,1},{1,0}}
  ... }
  ... %skip (q: f32[4]) -> f32[4] {
  ...   ROOT %q = f32[4]{0} parameter(0)
  ... }
  ... ENTRY %main (x: f32[4], k: s32[]) -> f32[4] {
  ...   %x = f32[4]{0} parameter(0)
  ...   %k = s32[] parameter(1)
  ...   ROOT %c = f32[4]{0} conditional(%k, %x, %x), branch_computations={%skip, %mix}
  ... }'''
  >>> [(c.kind, c.bytes, c.wire, c.in_branch, c.branch) for c in parse_hlo(text)]
  [('collective-permute', 16, (('f32', 16),), True, 1)]
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax

__all__ = ["Collective", "CommReport", "comm_report", "parse_hlo", "COLLECTIVE_KINDS"]

COLLECTIVE_KINDS = (
  "all-reduce",
  "all-gather",
  "collective-permute",
  "all-to-all",
  "ragged-all-to-all",
  "reduce-scatter",
  "collective-broadcast",
)

_DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}

_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\((.*)\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(
  r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OPERAND = re.compile(r"%([\w.\-]+)")


class Collective(NamedTuple):
  """One collective of a compiled program.

  Attributes:
    kind: ``"all-reduce"``, ``"collective-permute"``, ``"all-gather"``, …
    name: the HLO instruction name.
    computation: the HLO computation that holds it.
    shape: its result type, as printed in the HLO.
    bytes: bytes of its operands on one device.
    result_bytes: bytes of its result on one device.
    in_branch: True when it runs only inside a branch of a conditional.
    conditional: the conditional whose branch holds it (None if in_branch is False).
    branch: that branch's index (for ``lax.cond(p, f, g)``: 1 is ``f``, 0 is ``g``).
    wire: ``(dtype, bytes)`` of its operands per HLO dtype, in order of appearance.
    in_loop: True when it runs inside the body (or condition) of a ``while``
      loop (e.g. a ``lax.scan`` over a period's steps); False for one issued
      outside every loop, as an early reduction is.

  Examples:
    An all-reduce of four float32 values in the entry computation runs on every
    step and moves 16 bytes:

    >>> text = '''
    ... ENTRY %main (x: f32[4]) -> f32[4] {
    ...   %x = f32[4]{0} parameter(0)
    ...   ROOT %ar = f32[4]{0} all-reduce(%x), replica_groups={}, to_apply=%add
    ... }'''
    >>> (c,) = parse_hlo(text)
    >>> c.kind, c.name, c.bytes, c.result_bytes, c.in_branch, c.wire
    ('all-reduce', 'ar', 16, 16, False, (('f32', 16),))
  """

  kind: str
  name: str
  computation: str
  shape: str
  bytes: int
  result_bytes: int
  in_branch: bool
  conditional: str | None
  branch: int | None
  wire: tuple[tuple[str, int], ...] = ()
  in_loop: bool = False

  @property
  def dtypes(self) -> tuple[str, ...]:
    """The HLO dtypes of its operands (``("u8", "f32")``)."""
    return tuple(d for d, _ in self.wire)


class CommReport(list):
  """A list of :class:`Collective` with totals and a printable table.

  Examples:
    An all-reduce on every step and a collective-permute inside branch 1 of a
    conditional:

    >>> ar = Collective("all-reduce", "ar", "main", "f32[4]{0}", 16, 16, False, None, None,
    ...                 (("f32", 16),))
    >>> cp = Collective("collective-permute", "cp", "mix", "(u8[8]{0}, s32[2]{0})", 16, 16, True,
    ...                 "c", 1, (("u8", 8), ("s32", 8)))
    >>> report = CommReport([ar, cp])
    >>> report.kinds(), report.total_bytes
    (['all-reduce', 'collective-permute'], 32)
    >>> report.every_step().kinds()
    ['all-reduce']
    >>> report.bytes_by_dtype()
    {'f32': 16, 'u8': 8, 's32': 8}
    >>> print(report)  # doctest: +NORMALIZE_WHITESPACE
    kind                         bytes  wire                in branch result shape                      name
    --------------------------------------------------------------------------------------------------------
    all-reduce                      16  f32 16              NO        f32[4]{0}                         ar
    collective-permute              16  u8 8 + s32 8        yes (1)   (u8[8]{0}, s32[2]{0})             cp
    2 collectives, 32 bytes in operands (f32 16, u8 8, s32 8)
  """

  @property
  def total_bytes(self) -> int:
    """Bytes of all collectives' operands (one device, one execution of every branch)."""
    return sum(c.bytes for c in self)

  def kinds(self) -> list[str]:
    """The kinds, in program order."""
    return [c.kind for c in self]

  def bytes_by_dtype(self) -> dict[str, int]:
    """Operand bytes of all collectives per wire dtype (``{"u8": 5000, "f32": 8}``)."""
    out: dict[str, int] = {}
    for c in self:
      for dtype, nbytes in c.wire:
        out[dtype] = out.get(dtype, 0) + nbytes
    return out

  def outside_loops(self) -> CommReport:
    """The collectives outside every ``while`` loop (e.g. a reduction issued before a period's loop)."""
    return CommReport(c for c in self if not c.in_loop)

  def every_step(self) -> CommReport:
    """The collectives outside any conditional branch: they run on every step."""
    return CommReport(c for c in self if not c.in_branch)

  def table(self) -> str:
    """A fixed-width table, one row per collective."""
    head = f"{'kind':<22}{'bytes':>12}  {'wire':<20}{'in branch':<10}{'result shape':<34}name"
    rows = [head, "-" * len(head)]
    for c in self:
      where = f"yes ({c.branch})" if c.in_branch else "NO"
      shape = c.shape if len(c.shape) <= 32 else c.shape[:29] + "..."
      wire = _wire_text(c.wire)
      wire = wire if len(wire) <= 18 else wire[:15] + "..."
      rows.append(f"{c.kind:<22}{c.bytes:>12}  {wire:<20}{where:<10}{shape:<34}{c.name}")
    by_dtype = ", ".join(f"{d} {n}" for d, n in self.bytes_by_dtype().items())
    total = f"{len(self)} collectives, {self.total_bytes} bytes in operands"
    rows.append(f"{total} ({by_dtype})" if by_dtype else total)
    return "\n".join(rows)

  def __str__(self) -> str:
    return self.table()


def _wire_text(wire) -> str:
  return " + ".join(f"{d} {n}" for d, n in wire)


def type_bytes(type_text: str) -> int:
  """Bytes of an HLO type such as ``f32[2,3]{1,0}`` or a tuple of them."""
  return sum(n for _, n in type_dtype_bytes(type_text))


def type_dtype_bytes(type_text: str) -> tuple[tuple[str, int], ...]:
  """``(dtype, bytes)`` per dtype of an HLO type or tuple of types, in order of appearance.

  Sub-byte and 8-bit float types count one byte per element (as stored).

  Examples:
    >>> type_dtype_bytes("(u8[100]{0}, f32[], s32[25]{0}, u8[4]{0})")
    (('u8', 104), ('f32', 4), ('s32', 100))
  """
  out: dict[str, int] = {}
  for dtype, dims in _SHAPE.findall(type_text):
    size = _DTYPE_BYTES.get(dtype)
    if size is None:
      if dtype.startswith(("f8", "s4", "u4", "f4", "s2", "u2")):
        size = 1
      else:
        continue
    count = 1
    for d in dims.split(","):
      if d:
        count *= int(d)
    out[dtype] = out.get(dtype, 0) + size * count
  return tuple(out.items())


def _split_type(rest: str) -> tuple[str, str]:
  """Splits ``"TYPE opcode(...)..."`` into the type and the remainder."""
  rest = rest.strip()
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :].strip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _operands(text: str) -> str:
  """The text inside the opcode's parentheses."""
  start = text.find("(")
  if start < 0:
    return ""
  depth = 0
  for i in range(start, len(text)):
    depth += text[i] == "("
    depth -= text[i] == ")"
    if depth == 0:
      return text[start + 1 : i]
  return text[start + 1 :]


def _params(signature: str) -> dict[str, str]:
  """``name -> type`` of a computation's parameters, from its header."""
  out, depth, start = {}, 0, 0
  parts = []
  for i, ch in enumerate(signature):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(signature[start:i])
      start = i + 1
  parts.append(signature[start:])
  for part in parts:
    name, _, typ = part.partition(":")
    if typ:
      out[name.strip().lstrip("%")] = typ.strip()
  return out


class _Instr(NamedTuple):
  name: str
  type: str
  opcode: str
  text: str


def _parse(text: str):
  comps: dict[str, list[_Instr]] = {}
  types: dict[str, dict[str, str]] = {}
  entry = None
  current = None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      comps[current] = []
      types[current] = _params(header.group(3))
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.strip() == "}":
      current = None
      continue
    instr = _INSTR.match(line)
    if not instr:
      continue
    typ, rest = _split_type(instr.group(2))
    opcode = rest.split("(", 1)[0].strip()
    comps[current].append(_Instr(instr.group(1), typ, opcode, rest))
    types[current][instr.group(1)] = typ
  return comps, types, entry


def parse_hlo(text: str) -> CommReport:
  """The collectives of an HLO module's text (see the module docstring).

  Args:
    text: an HLO module as text, e.g. ``jitted.lower(*args).compile().as_text()``.

  Returns:
    A :class:`CommReport`, the collectives in the order of the text.

  Examples:
    >>> text = '''
    ... ENTRY %main (x: f32[2,3]) -> f32[2,3] {
    ...   %x = f32[2,3]{1,0} parameter(0)
    ...   ROOT %ar = f32[2,3]{1,0} all-reduce(%x), replica_groups={}, to_apply=%add
    ... }'''
    >>> [(c.kind, c.bytes, c.in_branch) for c in parse_hlo(text)]  # 2 x 3 x 4 bytes
    [('all-reduce', 24, False)]
  """
  comps, types, entry = _parse(text)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text; pass compiled.as_text().")
  plain: dict[str, set[str]] = {c: set() for c in comps}
  loops: dict[str, set[str]] = {c: set() for c in comps}  # while bodies and conditions
  branches: dict[str, list[tuple[str, int, str]]] = {c: [] for c in comps}
  for comp, instrs in comps.items():
    for ins in instrs:
      for how, callee in _CALLS.findall(ins.text):
        plain[comp].add(callee)
        if how in ("body", "condition"):
          loops[comp].add(callee)
      found = _BRANCHES.search(ins.text)
      if found:
        names = [n.strip().lstrip("%") for n in found.group(1).split(",") if n.strip()]
        for i, callee in enumerate(names):
          branches[comp].append((ins.name, i, callee))

  def reach(start: str, with_branches: bool, through_loops: bool = True) -> set[str]:
    seen, todo = set(), [start]
    while todo:
      c = todo.pop()
      if c in seen or c not in comps:
        continue
      seen.add(c)
      todo.extend(plain[c] if through_loops else plain[c] - loops[c])
      if with_branches:
        todo.extend(callee for _, _, callee in branches[c])
    return seen

  outside_loops = reach(entry, with_branches=True, through_loops=False)

  always = reach(entry, with_branches=False)
  owner: dict[str, tuple[str, int]] = {}
  for comp in reach(entry, with_branches=True):
    for cond, i, callee in branches.get(comp, []):
      for c in reach(callee, with_branches=True):
        owner.setdefault(c, (cond, i))
  report = CommReport()
  for comp, instrs in comps.items():
    for ins in instrs:
      kind = ins.opcode[: -len("-start")] if ins.opcode.endswith("-start") else ins.opcode
      if kind not in COLLECTIVE_KINDS:
        continue
      names = _OPERAND.findall(_operands(ins.text))
      known = [types[comp][n] for n in names if n in types[comp]]
      wire = type_dtype_bytes(" ".join(known) if known else ins.type)
      in_branch = comp not in always
      cond, branch = owner.get(comp, (None, None)) if in_branch else (None, None)
      report.append(
        Collective(
          kind,
          ins.name,
          comp,
          ins.type,
          sum(n for _, n in wire),
          type_bytes(ins.type),
          in_branch,
          cond,
          branch,
          wire,
          comp not in outside_loops,
        )
      )
  return report


def comm_report(step: Callable[..., Any], *args, **kwargs) -> CommReport:
  """Compiles ``step(*args, **kwargs)`` and lists its collectives.

  Args:
    step: a jitted function (e.g. from :func:`coopjax.make_step`); a plain
      function is wrapped in ``jax.jit``.
    *args: example arguments (arrays or ``jax.ShapeDtypeStruct`` with shardings).
    **kwargs: keyword arguments for ``step``.

  Returns:
    A :class:`CommReport` (a list of :class:`Collective`); ``print`` it for a table.

  Examples:
    ``print(coopjax.comm_report(step, X, opt_state, batch))`` shows what a
    cooperative step sends. A smaller case: the mean over a row-sharded axis
    reduces each device's four float32 partial sums (16 bytes) with one
    all-reduce (none on a single device):

    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> n = len(jax.devices())
    >>> mesh = jax.make_mesh((n,), ("workers",))
    >>> x = jax.device_put(jnp.ones((n, 4)), NamedSharding(mesh, P("workers")))
    >>> report = comm_report(lambda x: x.mean(axis=0), x)
    >>> [(c.kind, c.bytes, c.in_branch) for c in report] == (
    ...   [("all-reduce", 16, False)] if n > 1 else []
    ... )
    True
  """
  lower = getattr(step, "lower", None)
  if lower is None:
    lower = jax.jit(step).lower
  return parse_hlo(lower(*args, **kwargs).compile().as_text())

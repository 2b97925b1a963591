"""Math problems with exact answers, generated in-framework from a seed.

The mid-training mix has a math slot (medical : general : math = 2 : 2 : 1)
and rule-based RL needs verifiable answers; both use the same generator:

    items = generate_math(1000, seed=0)     # list[QAItem], source "math"
    items[0].question, items[0].answer      # "Compute (17 + 5) × 3.", "66"
    is_correct(items[0], "... so the answer is 66.")   # True

Kinds (`KINDS`): `arithmetic` (+ − × ÷ with parentheses, exact integer steps),
`linear` (solve a·x + b = c), `percent`, and word problems (`shopping`,
`travel`, `sharing`, and clinical `dose` / `infusion` calculations). Every item
carries a worked solution in `explanation` (what the LM document shows after
the answer) and its kind in `meta["kind"]`. Answers are integers or
terminating decimals written canonically ("12", "2.5", "-3"); ids are
"math:<kind>:<hash of the question>", so the same problem always has the same
id and held-out splits by id never leak a duplicate. The output depends only
on `(n, seed, kinds)`.
"""

from __future__ import annotations

import fractions
import hashlib
import random
import re
from typing import Callable, Sequence

from m2.data.records import QAItem

Fraction = fractions.Fraction


def fmt(x: Fraction | int) -> str:
  """Canonical answer text: "12", "-3", "2.5"; a fraction only if it does not terminate."""
  x = Fraction(x)
  if x.denominator == 1:
    return str(x.numerator)
  d = x.denominator
  while d % 2 == 0:
    d //= 2
  while d % 5 == 0:
    d //= 5
  if d != 1:
    return f"{x.numerator}/{x.denominator}"
  text = f"{float(x):.10f}".rstrip("0").rstrip(".")
  assert Fraction(text) == x, (x, text)
  return text


_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def parse_number(text: str) -> Fraction | None:
  """The last number in `text` ("1,250 mg" -> 1250, "x = -2.5" -> -5/2), or None."""
  found = _NUMBER_RE.findall(text.replace("−", "-"))
  if not found:
    return None
  try:
    return Fraction(found[-1].replace(",", ""))
  except (ValueError, ZeroDivisionError):
    return None


def is_correct(item: QAItem, response: str) -> bool:
  """Whether the last number in `response` equals the item's exact answer."""
  got = parse_number(response)
  return got is not None and got == Fraction(item.answer)


# ------------------------------------------------------------------- kinds

_OPS = {"+": lambda a, b: a + b, "−": lambda a, b: a - b, "×": lambda a, b: a * b,
        "÷": lambda a, b: a / b}


def _arithmetic(rng: random.Random):
  """(a op b) op c [op d]: every intermediate result an integer, division exact."""
  value = Fraction(rng.randint(2, 60))
  expr, steps = str(value), []
  for _ in range(rng.randint(1, 3)):
    op = rng.choice("+−×÷")
    if op == "÷":
      divisors = [d for d in range(2, 13) if value % d == 0]
      if not divisors or value == 0:
        op = "+"
      else:
        b = Fraction(rng.choice(divisors))
    if op != "÷":
      b = Fraction(rng.randint(2, 12) if op == "×" else rng.randint(1, 99))
    new = _OPS[op](value, b)
    steps.append(f"{fmt(value)} {op} {fmt(b)} = {fmt(new)}")
    expr, value = f"({expr} {op} {fmt(b)})", new
  expr = expr[1:-1] if expr.startswith("(") else expr   # the outer parentheses say nothing
  return f"Compute {expr}.", value, ". ".join(steps) + "."


def _linear(rng: random.Random):
  a, x = rng.randint(2, 12), rng.randint(-20, 30)
  b = rng.randint(-50, 50)
  c = a * x + b
  sign, mag = ("+", b) if b >= 0 else ("−", -b)
  return (f"Solve for x: {a}x {sign} {mag} = {c}.", Fraction(x),
          f"{a}x = {c} {'−' if b >= 0 else '+'} {mag} = {c - b}, so x = {c - b} ÷ {a} = {x}.")


def _percent(rng: random.Random):
  p = rng.choice([1, 2, 4, 5, 8, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 65, 70, 75, 80, 90])
  base = rng.randint(1, 250) * 20
  value = Fraction(p * base, 100)
  return (f"What is {p}% of {base}?", value, f"{p}% of {base} = {p} × {base} ÷ 100 = {fmt(value)}.")


# Roles, not names: generated text has no PHI for the de-identification gate to find.
_BUYERS = ("A nurse", "A student", "A teacher", "A pharmacist", "A porter", "A parent",
           "A volunteer", "A cook", "A clerk", "A driver", "A coach", "A gardener")
_ITEMS = (("notebooks", 3, 9), ("apples", 1, 4), ("pens", 2, 6), ("tickets", 8, 25),
          ("sandwiches", 4, 11), ("bandage rolls", 2, 7))


def _shopping(rng: random.Random):
  who = rng.choice(_BUYERS)
  item, lo, hi = rng.choice(_ITEMS)
  qty, price = rng.randint(2, 15), rng.randint(lo, hi)
  paid = (qty * price // 10 + 1 + rng.randint(0, 5)) * 10
  change = paid - qty * price
  return (f"{who} buys {qty} {item} at ${price} each and pays with ${paid}. "
          f"How many dollars of change does {who.lower().replace('a ', 'the ', 1)} get?",
          Fraction(change),
          f"The {item} cost {qty} × {price} = {qty * price} dollars; "
          f"the change is {paid} − {qty * price} = {change} dollars.")


def _travel(rng: random.Random):
  speed, hours = rng.choice([30, 40, 45, 50, 60, 72, 80, 90]), rng.randint(2, 9)
  extra = rng.randint(1, 60)
  total = speed * hours + extra
  return (f"A bus travels at {speed} km/h for {hours} hours, then another {extra} km. "
          f"How many kilometres does it travel in total?", Fraction(total),
          f"{speed} × {hours} = {speed * hours} km, and {speed * hours} + {extra} = {total} km.")


def _sharing(rng: random.Random):
  people, each = rng.randint(2, 12), rng.randint(3, 40)
  left = rng.randint(0, people - 1)
  total = people * each + left
  rest = f"the teacher keeps the {left} left over" if left else "none are left over"
  return (f"{total} stickers are shared equally among {people} children, and {rest}. "
          f"How many stickers does each child get?", Fraction(each),
          f"{total} ÷ {people} = {each} remainder {left}, so each child gets {each}.")


def _dose(rng: random.Random):
  weight = rng.randint(3, 120)
  per_kg = rng.choice([Fraction(1, 10), Fraction(1, 4), Fraction(1, 2), 1, Fraction(3, 2), 2,
                       Fraction(5, 2), 3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50])
  dose = weight * Fraction(per_kg)
  return (f"A drug is dosed at {fmt(per_kg)} mg/kg. How many milligrams should a patient "
          f"weighing {weight} kg receive?", dose,
          f"{fmt(per_kg)} mg/kg × {weight} kg = {fmt(dose)} mg.")


def _infusion(rng: random.Random):
  volume = rng.randint(2, 60) * 50
  hours = rng.choice([h for h in range(2, 25) if volume * 100 % h == 0])
  rate = Fraction(volume, hours)
  return (f"{volume} mL of fluid is to be infused over {hours} hours. At what rate in mL per "
          f"hour should the pump be set?", rate, f"{volume} mL ÷ {hours} h = {fmt(rate)} mL/h.")


KINDS: dict[str, Callable[[random.Random], tuple[str, Fraction, str]]] = {
    "arithmetic": _arithmetic, "linear": _linear, "percent": _percent, "shopping": _shopping,
    "travel": _travel, "sharing": _sharing, "dose": _dose, "infusion": _infusion,
}


def generate_math(n: int, seed: int = 0, kinds: Sequence[str] | None = None) -> list[QAItem]:
  """`n` distinct problems; the same (n, seed, kinds) gives the same list.

  Each problem's kind is drawn uniformly; a duplicate question is redrawn, so
  kinds with few distinct problems (percent, infusion) thin out at large `n`.

  Raises ValueError for an unknown kind, or if the kinds cannot make `n`
  distinct problems.
  """
  kinds = tuple(kinds or KINDS)
  unknown = [k for k in kinds if k not in KINDS]
  if unknown:
    raise ValueError(f"unknown math kind(s) {unknown}; known: {list(KINDS)}")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  rng = random.Random(f"m2.math:{seed}")   # str seeds hash stably across processes
  items, seen, tries = [], set(), 0
  while len(items) < n:
    tries += 1
    if tries > 20 * n + 1000:
      raise ValueError(f"could only make {len(items)} distinct problems of kinds {kinds}")
    kind = rng.choice(kinds)
    question, answer, solution = KINDS[kind](rng)
    if question in seen:
      continue
    seen.add(question)
    digest = hashlib.sha1(question.encode()).hexdigest()[:12]
    items.append(QAItem(id=f"math:{kind}:{digest}", source="math", question=question,
                        answer=fmt(answer), explanation=solution, meta={"kind": kind}))
  return items

"""Generated math: deterministic from a seed, exact answers checked independently."""

import ast
import fractions
import operator
import re

import pytest

from m2.data import deid
from m2.data.math import KINDS, generate_math, is_correct, parse_number

F = fractions.Fraction


def _evaluate(expr: str) -> F:
  """Exact value of a "Compute ..." expression, by a parser independent of the generator."""
  ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
         ast.Div: operator.truediv}

  def ev(node):
    if isinstance(node, ast.BinOp):
      return ops[type(node.op)](ev(node.left), ev(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
      return -ev(node.operand)
    if isinstance(node, ast.Constant):
      return F(node.value)
    raise ValueError(ast.dump(node))

  py = expr.replace("×", "*").replace("÷", "/").replace("−", "-")
  return ev(ast.parse(py, mode="eval").body)


def _nums(text):
  return [F(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text.replace("−", "-"))]


def test_same_seed_same_items_and_other_seeds_differ():
  a, b = generate_math(300, seed=7), generate_math(300, seed=7)
  assert a == b
  assert [i.question for i in generate_math(300, seed=8)] != [i.question for i in a]
  assert len({i.question for i in a}) == len({i.id for i in a}) == 300
  assert {i.meta["kind"] for i in a} == set(KINDS)
  assert all(i.source == "math" and i.id.startswith(f"math:{i.meta['kind']}:") for i in a)


def test_answers_are_exact():
  items = generate_math(2000, seed=1)
  checked = 0
  for it in items:
    answer, kind, q = F(it.answer), it.meta["kind"], it.question
    if kind == "arithmetic":
      assert _evaluate(q[len("Compute "):-1]) == answer, q
    elif kind == "linear":
      a, b, c = _nums(q.replace("x", " "))
      sign = -1 if "x −" in q else 1
      assert a * answer + sign * abs(b) == c, q
    elif kind == "percent":
      p, base = _nums(q)
      assert answer == p * base / 100, q
    elif kind == "dose":
      per_kg, weight = _nums(q)
      assert answer == per_kg * weight, q
    elif kind == "infusion":
      volume, hours = _nums(q)
      assert answer == volume / hours, q
    elif kind == "shopping":
      qty, price, paid = _nums(q)
      assert answer == paid - qty * price >= 0, q
    elif kind == "sharing":
      total, people = _nums(q)[:2]
      assert answer == total // people, q
    elif kind == "travel":
      speed, hours, extra = _nums(q)
      assert answer == speed * hours + extra, q
    checked += 1
    assert is_correct(it, f"Working: {it.explanation} The answer is {it.answer}.")
  assert checked == len(items)


def test_answer_checking():
  item = generate_math(1, seed=0)[0]
  assert parse_number("the total is 1,250 mg") == 1250
  assert parse_number("x = -2.5") == F(-5, 2) and parse_number("no number") is None
  wrong = str(F(item.answer) + 1)
  assert not is_correct(item, f"I think it is {wrong}") and not is_correct(item, "unsure")


def test_generated_text_has_nothing_for_the_deid_gate():
  items = generate_math(500, seed=3)
  clean, report = deid.gate(items)
  assert clean == items and report.changed == 0


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="unknown math kind"):
    generate_math(3, kinds=["calculus"])
  with pytest.raises(ValueError, match="distinct"):
    generate_math(10_000, kinds=["infusion"])

"""Tasks: deterministic examples, disjoint splits, gold answers verify, verifiers never raise (hypothesis)."""

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoseek.tasks import TASKS, arithmetic, countdown, get_task, gsm8k
from nanoseek.tasks.rewards import answer_part, extract_number, format_ok, overlong_penalty

QUESTIONS = [f"Sam has {i} apples and buys {i % 7 + 2} more. How many apples now?" for i in range(60)]


@pytest.fixture(scope="module")
def gsm_path(tmp_path_factory):
    """A small GSM8K-shaped file: hermetic (the real data/gsm8k/train.jsonl may not be there)."""
    p = tmp_path_factory.mktemp("gsm8k") / "train.jsonl"
    rows = [{"question": q, "answer": f"Add them.\n#### {i + i % 7 + 2:,}"} for i, q in enumerate(QUESTIONS)]
    rows.append({"question": "Big one?", "answer": "x\n#### 1,234,567"})
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def make(name, n, seed, split, gsm_path):
    if name == "gsm8k":
        return gsm8k.examples(n, seed, split, path=gsm_path)
    return get_task(name).examples(n, seed, split)


def ok_response(ex, name):
    return f"<think>\nlet me see\n</think>\n{ex.answer}"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_deterministic_and_splits_disjoint(name, gsm_path):
    n = 40 if name != "gsm8k" else 5
    a, b = make(name, n, 0, "train", gsm_path), make(name, n, 0, "train", gsm_path)
    assert [e.prompt for e in a] == [e.prompt for e in b] and len(a) == n
    assert [e.prompt for e in make(name, n, 1, "train", gsm_path)] != [e.prompt for e in a]
    # Split by problem identity: no held-out prompt ever shows up in train, whatever the seed.
    train = {e.prompt for s in range(3) for e in make(name, 200 if name != "gsm8k" else -1, s, "train", gsm_path)}
    test = {e.prompt for s in range(3) for e in make(name, 10 if name != "gsm8k" else -1, s, "test", gsm_path)}
    assert test and not train & test
    with pytest.raises(ValueError):
        make(name, 1, 0, "valid", gsm_path)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_gold_answer_scores(name, gsm_path):
    task = get_task(name)
    for ex in make(name, 20, 3, "train", gsm_path):
        msgs = task.messages(ex)
        assert msgs[0]["role"] == "user" and ex.prompt in msgs[0]["content"] and "</think>" in msgs[0]["content"]
        good = ok_response(ex, name)
        assert task.reward(good, ex) == {"accuracy": 1.0, "format": 1.0, "total": 1.1}
        # The prompt may have prefilled "<think>\n": the response then starts inside the thought.
        assert task.reward(good[len("<think>\n"):], ex)["total"] == 1.1
        assert task.reward(f"<think>\n</think>\n{ex.answer}", ex)["accuracy"] == 1.0
        assert task.reward(f"<think>{ex.answer}", ex) == {"accuracy": 0.0, "format": 0.0, "total": 0.0}
        assert task.reward("<think>\nhmm\n</think>\n999999999", ex) == {"accuracy": 0.0, "format": 1.0, "total": 0.1}


# --- fuzzing: any string, tag soup, numbers of any size, unicode digits
PIECES = st.sampled_from(["<think>", "</think>", "\n", " ", "\\boxed{", "}", "{", "=", "-", "+", "*", "/", "(", ")",
                          ",", ".", "$", "١٨", "٣", "𝟗", "1" * 5000, "9" * 400 + ".5", "-0", "0.000", "None",
                          "null", "<｜end▁of▁sentence｜>", "**", "__import__('os')", "1e309", "nan", "inf"])
RESPONSES = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(PIECES, st.integers(-10**30, 10**30).map(str), st.text(max_size=5)), max_size=40).map("".join),
)


def examples_for_fuzz(gsm_path):
    return {"arithmetic": arithmetic.examples(2, 0), "countdown": countdown.examples(2, 0),
            "gsm8k": gsm8k.examples(2, 0, path=gsm_path)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(resp=RESPONSES)
def test_reward_never_raises(resp, gsm_path):
    for name, exs in examples_for_fuzz(gsm_path).items():
        task = TASKS[name]
        for ex in exs:
            r = task.reward(resp, ex)
            assert set(r) == {"accuracy", "format", "total"}
            assert r["accuracy"] in (0.0, 1.0) and r["format"] in (0.0, 1.0)
            assert r["total"] == pytest.approx(r["accuracy"] + 0.1 * r["format"])
            task.extract_answer(resp)
    # Nested thoughts are never well formatted.
    assert not format_ok("<think><think>" + resp + "</think></think>x")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_reward_non_string(name, gsm_path):
    ex = examples_for_fuzz(gsm_path)[name][0]
    for bad in (None, "", "</think>", "<think></think>"):
        assert TASKS[name].reward(bad, ex)["total"] == 0.0


# --- answer extraction and format
@pytest.mark.parametrize("text,want", [
    ("18", "18"), ("The answer is 1,234.", "1234"), ("$18", "18"), ("18 dollars", "18"), ("18.", "18"),
    ("-5", "-5"), ("It is -$5.", "-5"), ("18.0", "18"), ("18.50", "18.5"), ("\\boxed{18}", "18"),
    ("\\boxed{1,234} and then 7", "1234"), ("3-5", "5"), ("10 - 5", "5"), ("$ 18", "18"), ("x = -0", "0"),
    ("007", "7"), ("1, 2, 3", "3"), ("costs $1,000,000 total", "1000000"), ("no digits", None),
    ("١٨", None), ("", None), ("12345678901234567890123456789012345", "12345678901234567890123456789012345"),
    (".5", "0.5"), ("it is -.25", "-0.25"), ("\u22125", "-5"), ("1.5", "1.5"),   # ".5" was read as 5, "\u22125" as 5
])
def test_extract_number(text, want):
    assert extract_number(text) == want


@pytest.mark.parametrize("row, says", [
    ('{"answer": "#### 7"}', 'expected an object with "question" and "answer" strings'),
    ('{"question": 5, "answer": "#### 3"}', 'expected an object'), ("[1, 2]", "expected an object"),
    ("not json", "not valid JSON"), ('{"question": "q", "answer": "no hashes"}', "no number after '####'"),
])
def test_gsm8k_file_errors_name_the_line(tmp_path, row, says):
    path = tmp_path / "g.jsonl"
    path.write_text('{"question": "1+1?", "answer": "#### 2"}\n\n' + row + "\n")
    with pytest.raises(ValueError, match=f"g.jsonl:3: {says}"):
        gsm8k.examples(2, 0, "test", path=path)


def test_impossible_task_sizes_fail_at_once():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="there are 300 in all"):
        arithmetic.examples(100_000, 0, "test", n_digits=1)
    with pytest.raises(ValueError, match=r"n_numbers=200 \(2..10\)"):
        countdown.examples(5, 0, "test", n_numbers=200)
    assert time.perf_counter() - t0 < 1.0     # (they took 37 s and minutes)


def test_gsm8k_extraction_and_gold(gsm_path):
    assert gsm8k.gold_answer("blah\n#### 1,234") == "1234"
    ex = next(e for e in gsm8k.examples(-1, 0, "train", path=gsm_path) + gsm8k.examples(-1, 0, "test", path=gsm_path)
              if e.prompt == "Big one?")
    assert ex.answer == "1234567"
    for resp in ["<think>ok</think> The total is $1,234,567.", "<think>ok</think>\n\\boxed{1234567}",
                 "<think>ok</think> 1234567.0 dollars", "</think>1,234,567<｜end▁of▁sentence｜>"]:
        assert gsm8k.reward(resp, ex)["accuracy"] == 1.0, resp
    assert gsm8k.reward("<think>1234567</think> I am not sure", ex)["accuracy"] == 0.0   # only the answer part counts
    assert gsm8k.reward("The answer is 1234567", ex)["accuracy"] == 0.0                 # no </think>, no answer
    assert gsm8k.DEFAULT_PATH.parts[-3:] == ("data", "gsm8k", "train.jsonl")
    assert gsm8k.DEFAULT_PATH.parent.parent.parent == gsm8k.REPO_ROOT and (gsm8k.REPO_ROOT / "nanoseek").is_dir()


def test_format_ok():
    assert format_ok("<think>\nx\n</think>\n42") and format_ok("x\n</think>\n42") and format_ok("  <think></think>4")
    for bad in ["<think>x</think>", "<think>x</think>   ", "42", "<think>a</think>b</think>c", "x<think>y</think>z",
                "<think>x</think><think>y</think>z", None]:
        assert not format_ok(bad), bad
    assert answer_part("a</think>b</think> c ") == "c" and answer_part("no tags") is None


def test_overlong_penalty():
    # DAPO eq. 13 with L_max 100, L_cache 20: 0 up to 80, linear to -1 at 100, -1 beyond.
    assert [overlong_penalty(n, 100, 20) for n in (10, 80, 90, 100, 101)] == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(85, 100, 20) == pytest.approx(-0.25)


# --- countdown verifier
def test_countdown_parser():
    nums, target = [3, 5, 2], 16
    assert countdown.check("(3+5)*2", nums, target) and countdown.check(" ( 5 + 3 ) * 2 ", nums, target)
    assert countdown.check("2*(5+3)", nums, target)
    for bad in ["(3+5)*2+0", "(3+3)*2", "(3+5)*2*1", "3+5*2", "(3+5)**2", "__import__('os').system('x')",
                "-3+5*2", "(3+5)*2)", "((3+5)*2", "3 5 2", "", "(3+5)x2", "(３+5)*2", "1" * 300]:
        assert not countdown.check(bad, nums, target), bad
    assert countdown.check("6/4*2", [6, 4, 2], 3)                  # exact fractions: 6/4 = 3/2
    assert not countdown.check("6/(4-4)*2", [6, 4, 4, 2], 0)       # division by zero is wrong, not an error
    assert countdown.parse("(" * 150 + "1" + ")" * 150) is None    # too long: rejected before recursing
    ex = countdown.Example(prompt="", answer="(3+5)*2", meta={"numbers": nums, "target": target})
    assert countdown.reward("<think>\nhm\n</think>\n(3+5)*2 = 16", ex)["accuracy"] == 1.0
    assert countdown.reward("<think>\nhm\n</think>\n\\boxed{2*(3+5)}", ex)["accuracy"] == 1.0
    assert countdown.reward("<think>\nhm\n</think>\n16", ex)["accuracy"] == 0.0


def test_countdown_examples_solvable():
    for ex in countdown.examples(50, 7, n_numbers=4, max_number=30):
        assert countdown.check(ex.answer, ex.meta["numbers"], ex.meta["target"]), ex
        assert 1 <= ex.meta["target"] <= 100 and len(ex.meta["numbers"]) == 4


# --- arithmetic extras
def test_arithmetic_precedence_trace_and_corpus():
    ex = arithmetic.Example(prompt="What is 12+34*5-6?", answer="176",
                            meta={"expr": "12+34*5-6", "operands": [12, 34, 5, 6], "ops": ["+", "*", "-"]})
    assert arithmetic.worked(ex) == "<think>\n34*5=170\n12+170=182\n182-6=176\n</think>\n176"
    assert arithmetic.reward(arithmetic.worked(ex), ex)["total"] == 1.1
    sft = arithmetic.sft_messages(ex)
    assert [m["role"] for m in sft] == ["user", "assistant"]
    for e in arithmetic.examples(100, 1, n_digits=3, n_operands=3):
        assert int(e.answer) == eval(e.meta["expr"])                 # our own generated string: safe to eval here
    lines = arithmetic.corpus(300, 0, n_digits=1)
    held_out = {e.meta["expr"] for e in arithmetic.examples(5, 0, "test", n_digits=1)}
    assert len(lines) == 300 and all(line.split("=")[0] not in held_out for line in lines)
    assert all(eval(line.split("=")[0]) == int(line.split("=")[1]) for line in lines)
    with pytest.raises(ValueError):                                  # 1-digit, 2 operands, '+': only 100 problems
        arithmetic.examples(200, 0, n_digits=1, ops="+")


@pytest.mark.parametrize("knobs, says", [(dict(test_frac=1.5), "test_frac=1.5 must be in"),
                                         (dict(test_frac=0.0), "test_frac=0.0 must be in"),
                                         (dict(n_digits=5000), "above 4000 digits"),
                                         (dict(n_digits=0, ops="+^"), r"n_digits=0 \(at least 1\), ops='\+\^'"),
                                         (dict(n_operands=1), r"bad knobs: n_operands=1 \(at least 2\)$")])
def test_arithmetic_knobs_out_of_range_say_which(knobs, says):
    with pytest.raises(ValueError, match=says):
        arithmetic.examples(5, 0, **knobs)
    if "test_frac" in knobs:                                         # every task's split: the same check
        with pytest.raises(ValueError, match=says):
            countdown.examples(5, 0, **knobs)

"""Reward functions (qwenvl_ft/rewards): every built-in with its edge cases (empty completion, malformed box, NaN,
unparseable references), the registry's config errors, users' own functions by path, and the calling convention of
TRL's GRPOTrainer (keywords in, one float or None per completion out, logged under the reward's name)."""

import math
import sys
import textwrap

import pytest

from qwenvl_ft.errors import ConfigError
from qwenvl_ft.rewards import AsyncReward, Reward, build_rewards, check_fields, score, summarise
from qwenvl_ft.rewards.boxes import box_format, box_iou, iou_reward, parse_box
from qwenvl_ft.rewards.builtins import choice_match, completion_text, exact_match, extract_answer, format_match, \
    normalised_match, number_match, parse_number, valid_json


def chat(*texts):
    """Completions as TRL hands them for chat prompts: one assistant message each."""
    return [[{"role": "assistant", "content": text}] for text in texts]


def scores(function, completions, references, **options):
    return function(completions=chat(*completions), solution=list(references), **options)


# ----------------------------------------------------------------------------------------------------------------
# reading completions and answers


def test_completion_text_reads_every_completion_form():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "chat"}]) == "chat"
    content = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    assert completion_text([{"role": "assistant", "content": content}]) == "ab"
    assert completion_text([]) == "" and completion_text(None) == ""


@pytest.mark.parametrize("text, how, expected", [
    ("  42 ", "all", "42"),
    ("<think>x</think><answer> 7 </answer><answer>8</answer>", "answer_tag", "8"),
    ("no tags", "answer_tag", None),
    (r"so \boxed{\frac{1}{2}} and \boxed{3}", "boxed", "3"),
    (r"\boxed{\frac{a}{b}}", "boxed", r"\frac{a}{b}"),
    (r"\boxed{unclosed", "boxed", None),
    ("first\n\nlast line\n", "last_line", "last line"),
    ("Answer: B. Final: C", r"Final: (\w)", "C"),
    ("", "all", None),
    ("   ", "all", None),
])
def test_extract_answer(text, how, expected):
    assert extract_answer(text, how) == expected


# ----------------------------------------------------------------------------------------------------------------
# match rewards


def test_exact_and_normalised_match():
    completions = ["a red circle", "A red circle.", "  a red circle\n", "a blue circle", ""]
    refs = ["a red circle"] * 5
    assert scores(exact_match, completions, refs) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert scores(normalised_match, completions, refs) == [1.0, 1.0, 1.0, 0.0, 0.0]
    tagged = ["<answer>Red Circle</answer>", "red circle"]
    assert scores(normalised_match, tagged, ["red circle"] * 2, extract="answer_tag") == [1.0, 0.0]


@pytest.mark.parametrize("missing", [None, float("nan"), "", "   "])
def test_a_missing_reference_means_not_applicable(missing):
    for function in (exact_match, normalised_match, number_match, choice_match, box_iou):
        assert scores(function, ["anything", "3"], [missing, missing]) == [None, None], function.__name__


def test_reference_extract_reads_tagged_solutions():
    got = scores(exact_match, ["4"], ["<think>2+2</think><answer>4</answer>"], reference_extract="answer_tag")
    assert got == [1.0]


def test_a_reward_without_its_field_names_it():
    with pytest.raises(KeyError, match="no field 'answer'"):
        exact_match(completions=chat("x"), solution=["x"], field="answer")


@pytest.mark.parametrize("text, value", [
    ("42", 42.0), ("-3.5", -3.5), ("1,234", 1234.0), ("2/3", 2 / 3), (r"\frac{1}{2}", 0.5), (r"\dfrac{3}{4}", 0.75),
    (r"2\sqrt{3}", 2 * math.sqrt(3)), (r"\sqrt{2}", math.sqrt(2)), (r"3\pi", 3 * math.pi), ("$12$", 12.0),
    ("50%", 50.0), (r"\frac{\sqrt{3}}{2}", math.sqrt(3) / 2), (7, 7.0),
    ("nan", None), ("inf", None), (float("nan"), None), (float("inf"), None), (True, None), ("", None),
    ("10**1000", None), ("1/0", None), ("__import__('os')", None), ("x + 1", None), ("a cat", None),
])
def test_parse_number(text, value):
    got = parse_number(text)
    assert (got is None and value is None) or got == pytest.approx(value)


def test_number_match():
    completions = ["There are 3 cats.", "3.0", "about 4", "", "nan", r"\frac{6}{2}", "I count 3, no, 5"]
    assert scores(number_match, completions, ["3"] * 7) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert scores(number_match, ["3.4641"], [r"2\sqrt{3}"], tolerance=1e-3) == [1.0]
    assert scores(number_match, ["3.4641"], [r"2\sqrt{3}"]) == [0.0]  # default tolerance 1e-6
    assert scores(number_match, ["102"], ["100"], relative_tolerance=0.05) == [1.0]
    assert scores(number_match, ["106"], ["100"], relative_tolerance=0.05) == [0.0]
    assert scores(number_match, [r"x = \boxed{12}"], [12], extract="boxed") == [1.0]  # a numeric column
    assert scores(number_match, ["5"], ["five"]) == [None]  # the reference is not a number


def test_choice_match():
    completions = ["B", "(B)", "The answer is B.", "Answer: (b)", "B. because", "A red circle", "", "(C)"]
    assert scores(choice_match, completions, ["B"] * 8) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert scores(choice_match, ["A red circle", "(A)"], ["A"] * 2) == [0.0, 1.0]  # a word is not an option
    assert scores(choice_match, ["B"], ["(B) 42 apples"]) == [1.0]
    assert scores(choice_match, ["E"], ["E"], letters="ABCD") == [None]  # not a valid option: not applicable
    assert scores(choice_match, ["B"], ["forty-two"]) == [None]


# ----------------------------------------------------------------------------------------------------------------
# form rewards


def test_format_match():
    good = "<think>red, round</think>\n<answer>a red circle</answer>"
    completions = chat(good, "a red circle", "", "<think></think><answer>x</answer>", good + " trailing")
    assert format_match(completions=completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert format_match(completions=chat("a red circle", "a red"), pattern=r"^a \w+ \w+$") == [1.0, 0.0]
    assert format_match(completions=chat("so: a red circle"), pattern="red", full=False) == [1.0]


def test_valid_json():
    completions = chat('{"label": "cat", "count": 2}', '```json\n{"label": "cat"}\n```', "NaN", '{"x": NaN}',
                       '{"x": Infinity}', "not json", "", "[1, 2]")
    assert valid_json(completions=completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert valid_json(completions=chat('{"label": 1}', '{"other": 1}', "[1]"), keys=["label"]) == [1.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# boxes


@pytest.mark.parametrize("text, box", [
    ("<|box_start|>(10,20),(110,220)<|box_end|>", (10, 20, 110, 220)),
    ("the cat is at (10, 20),(110, 220)", (10, 20, 110, 220)),  # tags stripped by TRL's decoding
    ("[10, 20, 110, 220]", (10, 20, 110, 220)),
    ([10, 20, 110, 220], (10, 20, 110, 220)),
    ("(110,20),(10,220)", None),  # x2 < x1
    ("(10,20),(10,220)", None),  # no area
    ("(10,20),(110)", None),
    ("(nan,20),(110,220)", None),
    ([10, 20, float("nan"), 220], None),
    ([10, 20, 30], None),
    ("", None),
])
def test_parse_box(text, box):
    assert parse_box(text) == box


def test_box_iou():
    ref = "<|box_start|>(0,0),(100,100)<|box_end|>"
    completions = ["(0,0),(100,100)", "<|box_start|>(50,0),(150,100)<|box_end|>", "(200,200),(300,300)",
                   "(100,0),(0,100)", "", "no box at all"]
    got = scores(box_iou, completions, [ref] * 6)
    assert got == pytest.approx([1.0, 1 / 3, 0.0, 0.0, 0.0, 0.0])
    assert scores(box_iou, completions[:3], [ref] * 3, threshold=0.3) == [1.0, 1.0, 0.0]
    assert scores(box_iou, ["(0,0),(1,1)"], ["(5,5),(1,1)"]) == [None]  # malformed reference
    assert box_iou(completions=chat("(0,0),(10,10)"), bbox=[[0, 0, 10, 10]], field="bbox") == [1.0]


def test_iou_matches_every_box_in_either_form():
    ref = '```json\n[\n\t{"bbox_2d": [0, 0, 100, 100], "label": "cat"}\n]\n```'
    completions = ['[{"bbox_2d": [0, 0, 100, 100], "label": "cat"}]', "(50,0),(150,100)",
                   '[{"bbox_2d": [0, 0, 100, 100]}, {"bbox_2d": [200, 200, 300, 300]}]', "no box", ""]
    assert scores(iou_reward, completions, [ref] * 5) == pytest.approx([1.0, 1 / 3, 0.5, 0.0, 0.0])
    assert scores(iou_reward, completions[:2], [ref] * 2, threshold=0.5) == [1.0, 0.0]
    two = [[0, 0, 10, 10], [20, 20, 30, 30]]  # an object list's boxes as the reference
    assert iou_reward(completions=chat("(20,20),(30,30) (0,0),(10,10)"), boxes=[two], field="boxes") == [1.0]
    assert scores(iou_reward, ["(0,0),(1,1)"], ["no box"]) == [None]  # nothing to compare with


def test_box_format():
    completions = ['[{"bbox_2d": [0, 0, 10, 10]}]', "(0,0),(10,10)", '[{"bbox_2d": [10, 0, 0, 10]}]',
                   '[{"point_2d": [3, 4]}]', "a cat"]
    assert box_format(completions=chat(*completions)) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert box_format(completions=chat(*completions), form="json") == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert box_format(completions=chat(*completions), form="box_tokens") == [0.0, 1.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------------------------------------------
# the registry


def test_built_ins_resolve_with_their_options():
    rewards = build_rewards([{"function": "normalised_match", "name": "accuracy"},
                             {"function": "format", "weight": 0.5, "options": {"pattern": "^a .*$"}},
                             {"function": "number_match", "options": {"field": "answer", "tolerance": 0.5}}])
    assert [r.name for r in rewards] == ["accuracy", "format", "number_match"]
    assert [r.weight for r in rewards] == [1.0, 0.5, 1.0]
    assert [r.fields for r in rewards] == [("solution",), (), ("answer",)]
    check_fields(rewards, ["prompt", "images", "solution", "answer"])
    with pytest.raises(ConfigError, match="'number_match' .* reads the field 'answer'.*fields: images, solution"):
        check_fields(rewards, ["prompt", "images", "solution"])


@pytest.mark.parametrize("config, message", [
    ([], "trainer.grpo.rewards is empty"),
    ([{"function": "exact_mach"}], r"unknown reward 'exact_mach'. Did you mean 'exact_match'\?.*Built-ins: exact"),
    ([{"function": "???"}], r"rewards\[0\].function is required"),
    ([{"function": "exact_match", "options": {"tolerance": 1}}], "'tolerance' is not an option of exact_match"),
    ([{"function": "number_match", "options": {"tolerance": -1}}], r"options.tolerance must be a number in \[0"),
    ([{"function": "exact_match", "options": {"extract": "(unclosed"}}], "nor a valid regular expression"),
    ([{"function": "exact_match", "options": {"extract": "answer: .*"}}], "without a group"),
    ([{"function": "format", "options": {"pattern": "*bad"}}], "options.pattern is not a valid regular expression"),
    ([{"function": "choice_match", "options": {"letters": "abc"}}], "distinct capital letters"),
    ([{"function": "box_iou", "options": {"threshold": 2}}], r"threshold must be a number in \[0, 1\]"),
    ([{"function": "box_format", "options": {"form": "xml"}}], r"options.form must be one of"),
    ([{"function": "exact_match", "weight": float("nan")}], "weight must be a finite number"),
    ([{"function": "exact_match"}, {"function": "exact_match"}], "used by two rewards"),
])
def test_bad_declarations_are_config_errors(config, message):
    with pytest.raises(ConfigError, match=message):
        build_rewards(config)


def test_a_bad_reward_fails_when_the_config_is_validated():
    from qwenvl_ft.config.compose import compose

    with pytest.raises(ConfigError, match="unknown reward 'nope'"):
        compose(["recipe=grpo_demo", "trainer.grpo.rewards=[{function: nope}]"], output_dir="/tmp/unused")


USER_MODULE = '''
import asyncio

calls = []

def colour_named(completions, solution, bonus=0.0, **kwargs):
    calls.append(sorted(kwargs))
    return [float(s.split()[1] in c[0]["content"]) + bonus for c, s in zip(completions, solution)]

async def length_penalty(completions, limit=3, **kwargs):
    await asyncio.sleep(0)
    return [-max(0, len(c[0]["content"].split()) - limit) for c in completions]

def no_kwargs(completions, solution):
    return [0.0 for _ in completions]

def not_applicable(completions, **kwargs):
    return [None if i % 2 else 1.0 for i in range(len(completions))]

broken = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_rewards", None)


def test_user_rewards_by_module_and_by_file_are_called_as_trl_calls_them(user_module):
    from trl.trainer.utils import get_callable_name, is_async_callable

    rewards = build_rewards([
        {"function": "my_rewards:colour_named", "options": {"bonus": 0.5}},
        {"function": f"{user_module / 'my_rewards.py'}:length_penalty", "name": "short", "weight": 0.1},
    ])
    named, short = rewards
    assert type(named) is Reward and type(short) is AsyncReward and named.fields == ("solution",)
    assert [get_callable_name(r) for r in rewards] == ["colour_named", "short"]  # TRL's log names
    assert [is_async_callable(r) for r in rewards] == [False, True]  # TRL awaits the async one
    # exactly TRL's call (GRPOTrainer._calculate_rewards): keywords, every dataset column, trainer hooks
    kwargs = dict(prompts=[[{"role": "user", "content": "q"}]] * 2, completions=chat("a red circle", "green, no"),
                  completion_ids=[[1], [2]], solution=["a red circle", "a red square"], images=[[], []],
                  source=["f:row 0", "f:row 1"], trainer_state=None, log_extra=print, log_metric=print)
    assert named(**kwargs) == [1.5, 0.5]
    import my_rewards

    assert my_rewards.calls[-1] == ["completion_ids", "images", "log_extra", "log_metric", "prompts", "source",
                                    "trainer_state"]
    result = score(rewards, kwargs["prompts"], kwargs["completions"],
                   {"solution": kwargs["solution"], "images": [[], []]})
    assert result == {"colour_named": [1.5, 0.5], "short": [0.0, 0.0]}


@pytest.mark.parametrize("spec, message", [
    ("my_rewards:no_kwargs", r"must accept \*\*kwargs"),
    ("my_rewards:missing", r"my_rewards has no 'missing' \(callables there: .*colour_named"),
    ("my_rewards:broken", "is a int, not a function"),
    ("no_such_module_xyz:f", "no module named no_such_module_xyz"),
    ("does/not/exist.py:f", "not found"),
    ("my_rewards", "unknown reward 'my_rewards'"),
])
def test_a_bad_user_reward_is_a_config_error(user_module, spec, message):
    with pytest.raises(ConfigError, match=message):
        build_rewards([{"function": spec}])
    with pytest.raises(ConfigError, match="option 'bonuss' is not a parameter of colour_named"):
        build_rewards([{"function": "my_rewards:colour_named", "options": {"bonuss": 1}}])
    with pytest.raises(ConfigError, match="option 'prompts' is a keyword TRL passes itself"):
        build_rewards([{"function": "my_rewards:colour_named", "options": {"prompts": 1}}])


def test_summary_leaves_out_what_does_not_apply(user_module):
    """As TRL: None (or NaN) is left out of a reward's mean and of the weighted total; a completion no reward
    applies to is left out of the total."""
    rewards = build_rewards([{"function": "my_rewards:not_applicable", "weight": 2.0},
                             {"function": "exact_match", "weight": 1.0}])
    completions = chat("x", "y", "z")
    result = score(rewards, [None] * 3, completions, {"solution": ["x", None, "q"]})
    assert result == {"not_applicable": [1.0, None, 1.0], "exact_match": [1.0, None, 0.0]}
    summary = summarise(rewards, result)
    assert summary == {"not_applicable": 1.0, "exact_match": 0.5, "reward": pytest.approx((3.0 + 2.0) / 2)}

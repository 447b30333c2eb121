"""A user's reward function that fails (qwenvl_ft/rewards/checked.py): raising, returning None, strings or the wrong
number of scores is one message naming the reward and its module:function, the row (file:row), the line of the
user's file that raised and what was expected; the run checks user rewards on a first batch before the model loads.
"""

import asyncio
import sys
import textwrap

import pytest

from qwenvl_ft.errors import ConfigError
from qwenvl_ft.rewards import build_rewards, score

BROKEN = '''
import asyncio

def raises_on_blue(completions, solution, **kwargs):
    out = []
    for s in solution:
        if "blue" in s:
            raise KeyError("colour " + s)
        out.append(1.0)
    return out

def returns_none(completions, **kwargs):
    scores = [1.0 for _ in completions]

def returns_strings(completions, **kwargs):
    return ["1.0" if i else 1.0 for i in range(len(completions))]

def too_few(completions, **kwargs):
    return [1.0]

def numbers_and_none(completions, **kwargs):
    return [None, 0.5, float("nan"), 1][:len(completions)]

async def async_raises(completions, **kwargs):
    await asyncio.sleep(0)
    return [1 / 0 for _ in completions]
'''

COLUMNS = dict(prompts=[[{"role": "user", "content": "q"}]] * 3, solution=["a red circle", "a blue square", "x"],
               source=["train.jsonl:row 1", "train.jsonl:row 2", "train.jsonl:row 3"], completion_ids=None,
               trainer_state=None, log_extra=print, log_metric=print)
COMPLETIONS = [[{"role": "assistant", "content": text}] for text in ("a", "b", "c")]


@pytest.fixture
def broken(tmp_path):
    path = tmp_path / "my_broken.py"
    path.write_text(textwrap.dedent(BROKEN))
    yield path
    for name in [n for n in sys.modules if "my_broken" in n]:
        sys.modules.pop(name)


def _reward(path, function):
    (reward,) = build_rewards([{"function": f"{path}:{function}"}])
    return reward


def _failure(reward) -> str:
    with pytest.raises(ConfigError) as err:
        result = reward(completions=COMPLETIONS, **COLUMNS)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    return str(err.value)


def test_a_reward_that_raises_names_the_row_and_the_users_line(broken):
    message = _failure(_reward(broken, "raises_on_blue"))
    assert message.startswith(f"reward 'raises_on_blue' ({broken}:raises_on_blue) raised KeyError: 'colour a blue "
                              f"square'")
    assert f"at {broken}:8 in raises_on_blue: raise KeyError" in message  # the user's own frame
    assert "on row train.jsonl:row 2" in message  # the row that raises alone
    assert "expected" not in message.split("\n")[0] and "and not raise" in message


@pytest.mark.parametrize("function, what, where", [
    ("returns_none", "returned None for 3 completions", "the batch of rows train.jsonl:row 1, train.jsonl:row 2"),
    ("returns_strings", "returned '1.0' (str) for completion 2 of 3", "row train.jsonl:row 2"),
    ("too_few", "returned 1 scores for 3 completions", "the batch of rows"),
])
def test_a_reward_that_returns_the_wrong_thing_says_what_was_expected(broken, function, what, where):
    message = _failure(_reward(broken, function))
    assert message.startswith(f"reward '{function}' ({broken}:{function}) {what}")
    assert f"on {where}" in message
    assert "one number per completion (None where the reward does not apply)" in message


def test_async_rewards_are_checked_the_same_way(broken):
    message = _failure(_reward(broken, "async_raises"))
    assert "raised ZeroDivisionError: division by zero" in message and f"{broken}:" in message
    assert "on row train.jsonl:row 1" in message


def test_numbers_none_and_nan_pass(broken):
    reward = _reward(broken, "numbers_and_none")
    assert score([reward], COLUMNS["prompts"], COMPLETIONS, {"solution": COLUMNS["solution"]}) == \
        {"numbers_and_none": [None, 0.5, None]}


def test_a_broken_user_reward_stops_the_run_before_the_model_loads(broken, tmp_path, capsys):
    from qwenvl_ft.commands.cli import main

    run = tmp_path / "run"
    status = main(["train", "recipe=grpo_demo", "model.start_from=null", "data.shapes.num_train=16",
                   "data.shapes.num_eval=0", "trainer.max_steps=1", "trainer.batch_size=8",
                   "trainer.grpo.num_generations=4", "trainer.report_to=[none]",
                   f"trainer.grpo.rewards=[{{function: '{broken}:returns_strings', name: mine}}]",
                   f"hydra.run.dir={run}"])
    out, err = capsys.readouterr()
    assert status == 2 and "Traceback" not in out + err
    assert f"reward 'mine' ({broken}:returns_strings) returned '1.0' (str) for completion 2 of 8" in err
    assert "on row shapes:train:1\n" in err
    log = (run / "cli.log").read_text()
    assert "model load" not in log and "parameters:" not in log  # stopped before the model was built

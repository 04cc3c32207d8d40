"""tasks.py: what a task name means, and the built-in tasks made from the validation text."""

import pytest

from tasks import BUILTIN, load_tasks, validation_text
from utils import UserError


@pytest.fixture(scope="module")
def builtin():
    return {task.name: task for task in load_tasks(list(BUILTIN))}


def test_builtin_tasks_have_four_choices_and_a_gold_spread_over_them(builtin):
    for task in builtin.values():
        assert len(task.examples) == 500
        assert all(len(e.choices) == 4 == len(set(e.choices)) for e in task.examples)
        golds = [e.gold for e in task.examples]
        assert all(100 <= golds.count(g) <= 150 for g in range(4))  # chance is 1/4


def test_builtin_tasks_come_from_the_validation_text_and_are_the_same_every_time(builtin):
    text = validation_text()
    for task in builtin.values():
        for example in task.examples[:50]:
            assert example.context.strip() in text
    line = builtin["shakespeare-line"].examples[0]
    gold = line.choices[line.gold]
    assert f"{line.context} {gold}" in text  # the gold ending completes the line
    next_line = builtin["shakespeare-next-line"].examples[0]
    assert next_line.context + next_line.choices[next_line.gold] in text
    assert {task.name: task for task in load_tasks(list(BUILTIN))} == builtin


def test_an_unknown_name_a_missing_file_and_an_empty_file_are_one_line_each(tmp_path):
    with pytest.raises(UserError, match="unknown task 'hellaswag' — give a JSONL file or a "
                                        "built-in task: shakespeare-line, shakespeare-next-line"):
        load_tasks(["hellaswag"])
    with pytest.raises(UserError, match="task file 'nope.jsonl' not found"):
        load_tasks(["nope.jsonl"])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl' holds no examples"):
        load_tasks([str(tmp_path / "empty.jsonl")])
    (tmp_path / "a").mkdir()
    for path in (tmp_path / "t.jsonl", tmp_path / "a" / "t.jsonl"):
        path.write_text('{"context": "", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(UserError, match="two tasks are named t"):
        load_tasks([str(tmp_path / "t.jsonl"), str(tmp_path / "a" / "t.jsonl")])

"""The instruct mixture and TrainConfig with the paper's task structure (issue 23): multi-question
conversations, abstaining turns answered without a call in every syntax, options off by default."""
import random

import pytest

from collapse_probe import world
from collapse_probe.errors import UserError
from collapse_probe.formats.registry import SYNTAXES
from collapse_probe.train import instruct
from collapse_probe.train.config import TrainConfig, apply_overrides


def test_mixture_holds_multi_question_conversations_and_abstaining_turns_in_every_syntax():
    tasks = world.task_split("train", 400, user_turns=4, abstain_frac=0.2)
    rng = random.Random(0)
    seen_multi = seen_abstain = 0
    for task in tasks:
        for syntax in SYNTAXES:
            if syntax not in dict(instruct.SYNTAX_MIX):
                continue
            turns = instruct.tool_turns(task, syntax, rng, error_frac=0.3)
            questions = [obs for _, obs in turns if obs in {u.question for u in task.user_turns[1:]}]
            assert questions == [u.question for u in task.user_turns[1:]]  # each user turn in order
            seen_multi += len(task.user_turns) > 1
            # the first assistant turn of each abstaining user turn is its reply: no call
            firsts = [0] + [i + 1 for i, (_, obs) in enumerate(turns[:-1]) if obs in questions]
            for u, i in zip(task.user_turns, firsts):
                if u.abstain:
                    assert turns[i][0] == world.ABSTAIN_REPLY[u.abstain]
                    seen_abstain += 1
    assert seen_multi > 300 and seen_abstain > 100


def test_miss_func_prompt_lists_the_tools_without_the_withheld_one():
    task = next(t for t in world.task_split("train", 500, user_turns=3, abstain_frac=0.3) if t.withheld)
    prompt, _ = instruct.instruct_conversation(task, random.Random(3))
    if "Facts:" not in prompt:
        assert f'"{task.withheld}"' not in prompt and '"find_user"' in prompt


def test_plain_tasks_give_the_old_mixture():
    # options off: the same tasks, so the same conversations and the same cached instruct model key
    plain = world.task_split("train", 50)
    assert plain == world.task_split("train", 50, user_turns=1, abstain_frac=0.0)
    assert "user_turns" not in TrainConfig().to_json() and "abstain_frac" not in TrainConfig().to_json()


def test_config_fields():
    cfg = apply_overrides(TrainConfig(), ["user_turns=4", "abstain_frac=0.2"])
    assert (cfg.user_turns, cfg.abstain_frac) == (4, 0.2) and '"user_turns": 4' in cfg.to_json()
    assert TrainConfig.from_json(cfg.to_json()).abstain_frac == 0.2
    for bad in (["user_turns=0"], ["abstain_frac=1.5"], ["user_turns=9"]):
        with pytest.raises(UserError):
            apply_overrides(TrainConfig(), bad)


def test_rollout_plays_every_user_turn_with_the_next_question_as_a_user_message():
    from collapse_probe.train import tiny
    from collapse_probe.train.rollout import rollout

    tok = tiny.build_tokenizer()
    model = tiny.build_model(tok, "tiny", seed=0)
    tasks = [t for t in world.task_split("train", 40, user_turns=3, abstain_frac=0.3) if len(t.user_turns) == 3][:3]
    trajs = rollout(model, tok, tasks, group_size=2, max_turns=12, max_new_tokens=6, seed=0, harness=world.PAPER)
    for t in trajs:
        text = tok.decode(t.ids, skip_special_tokens=False)
        reached = t.episode.user_turn
        for u in t.task.user_turns[1:reached + 1]:
            assert f"{world.IM_START}user\n{u.question}{world.IM_END}" in text
        assert t.episode.done and len(t.episode.replies) <= 3

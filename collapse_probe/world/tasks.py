"""The embedded tool world: a seeded, multi-step tool-use environment with a verifiable reward.

Each episode draws a fresh little database (people, user ids, friends, cities, temperatures), so the model
cannot memorise answers: it has to call tools in sequence and copy what it observes into the next call.

Tasks need 2-4 calls where later arguments come from earlier observations, then a final answer turn:

    "Which city does alice live in?"                      find_user -> get_city                     (2 calls)
    "What is the weather where alice lives?"              find_user -> get_city -> get_weather      (3 calls)
    "Which city does the friend of alice live in?"        find_user -> get_friend -> get_city       (3 calls)
    "What is the weather where the friend of alice lives?" find_user -> get_friend -> get_city -> get_weather

Values (names, user ids, cities, weather) are quoted wherever they appear, so each is the same single token in
the question, the JSON arguments, the observations and the answer: copying is what the policy must learn.

Conversations follow ChatML with the Qwen/Hermes tool convention: tools listed in the system prompt, calls as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, results in a user turn as `<tool_response>`.
Calls are parsed with `json` only. The harness is strict: a call it cannot execute (broken JSON, an unclosed
tag, an unknown tool, a bad or unknown argument) ends the episode, as does running out of turns. Only an empty
call (`<tool_call>` and nothing in it) is answered with an error observation and the episode goes on, the way
agent harnesses treat a no-op; `Episode(end_on_call_error=False)` answers every error with an observation.

The paper's task structure (BFCL multi-turn base / miss_param / miss_func), as options of `make_task` and
`task_split` that are off by default (a task made without them is exactly the single-question task above):

    user_turns=N     an episode holds 1..N user turns (uniform, from the task seed), each its own question about
                     the same database (the state carried over), each with its own calls and answer
    abstain_frac=f   each user turn is, with probability f, one whose right action is to call nothing:
                     miss_func   a tool the question needs is withheld from the episode's tool list (and cannot
                                 be executed); the oracle says it cannot do that
                     miss_param  the question names nobody; the oracle asks who is meant, and (when the episode
                                 has room) the next user turn names the person and the calls follow, as in BFCL
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass


NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "ken", "laura",
         "mike", "nina", "oscar", "peggy", "quinn", "rita", "sam", "tina", "uma", "victor", "wendy", "yara"]
CITIES = ["oslo", "paris", "lima", "cairo", "tokyo", "rome", "delhi", "quito", "perth", "dakar", "hanoi",
          "seoul", "bern", "riga", "accra", "lagos"]
USER_IDS = [f"u{a}{b}" for a in "bdfgkmprst" for b in "aeiou"]  # letters only: one BPE token each
SKIES = ["sunny", "rainy", "cloudy", "windy", "snowy", "foggy", "stormy", "clear"]

TOOLS = [
    {"name": "find_user", "description": "Find a user id by name.",
     "parameters": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
    {"name": "get_friend", "description": "Get the user id of a user's best friend.",
     "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}, "required": ["user_id"]}},
    {"name": "get_city", "description": "Get the city a user lives in.",
     "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}, "required": ["user_id"]}},
    {"name": "get_weather", "description": "Get the current weather of a city.",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
]
TOOL_NAMES = frozenset(t["name"] for t in TOOLS)

# (question template, tool chain); the answer is the last observation's value.
TASK_KINDS = {
    "city": ("Which city does {name} live in?", ["find_user", "get_city"]),
    "weather": ("What is the weather where {name} lives?", ["find_user", "get_city", "get_weather"]),
    "friend_city": ("Which city does the friend of {name} live in?", ["find_user", "get_friend", "get_city"]),
    "friend_weather": ("What is the weather where the friend of {name} lives?",
                       ["find_user", "get_friend", "get_city", "get_weather"]),
}

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
RESP_OPEN, RESP_CLOSE = "<tool_response>", "</tool_response>"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, TOOL_OPEN, TOOL_CLOSE, RESP_OPEN, RESP_CLOSE]


HERMES_INSTRUCTION = ("Call a tool as <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
                      "\n</tool_call>")


def system_prompt(tools: list[dict] = TOOLS, call_instruction: str | None = None) -> str:
    """A Qwen2.5-style tool prompt kept short for CPU training: one compact JSON schema line per tool, then the
    sentence that says how to call a tool (Hermes tags unless another syntax's `call_instruction` is given)."""
    lines = "\n".join(json.dumps({"name": t["name"], "parameters": {k: v["type"] for k, v in
                                                                     t["parameters"]["properties"].items()}})
                       for t in tools)
    return "# Tools\n<tools>\n" + lines + "\n</tools>\n" + (call_instruction or HERMES_INSTRUCTION)


def render_call(name: str, arguments: dict) -> str:
    """The canonical (Hermes) rendering of one tool call, as the oracle writes it."""
    return f"{TOOL_OPEN}\n" + json.dumps({"name": name, "arguments": arguments}) + f"\n{TOOL_CLOSE}"


def render_answer(answer: str) -> str:
    return f'The answer is "{answer}".'


MISS_FUNC, MISS_PARAM = "miss_func", "miss_param"  # the two kinds of abstaining user turn (BFCL's names)
ABSTAIN_KINDS = (MISS_FUNC, MISS_PARAM)
# the oracle's reply on an abstaining turn: a plain text turn, no call
ABSTAIN_REPLY = {MISS_FUNC: "I cannot do that with the tools I have.",
                 MISS_PARAM: "Which person do you mean? Please give me the name."}
UNNAMED = "my colleague"  # stands where a miss_param question would name the person
WITHHOLDABLE = ("get_weather", "get_friend")  # every kind needs find_user and get_city


@dataclass(frozen=True)
class UserTurn:
    """One user turn of an episode: its question, the tools its calls use in order (empty when the right action
    is to call nothing), whose facts it asks about, and why it abstains (None, MISS_FUNC or MISS_PARAM)."""

    question: str
    chain: tuple[str, ...]
    subject: str
    abstain: str | None = None


@dataclass
class Task:
    """One episode's world state and question(s). Everything is derived from `seed` (and the structure options).

    The first user turn is `question` / `chain` / `subject` (`abstain` says whether it is one to call nothing
    on); `more` holds the later user turns; `withheld` is a tool left out of the tool list (miss_func)."""

    seed: int
    kind: str
    question: str
    chain: list[str]
    subject: str
    users: dict[str, str]  # name -> user id
    friend: dict[str, str]  # user id -> friend's user id
    city: dict[str, str]  # user id -> city
    sky: dict[str, str]  # city -> weather
    more: tuple[UserTurn, ...] = ()
    abstain: str | None = None
    withheld: str | None = None

    @property
    def user_turns(self) -> list[UserTurn]:
        return [UserTurn(self.question, tuple(self.chain), self.subject, self.abstain), *self.more]

    @property
    def tools(self) -> list[dict]:
        """The tool list the episode's system prompt shows (all but a withheld tool)."""
        return [t for t in TOOLS if t["name"] != self.withheld]

    def turn_calls(self, turn: UserTurn) -> list[tuple[str, dict, dict]]:
        """(tool, arguments, observation) of the oracle's calls on one user turn ([] on an abstaining turn)."""
        out, value = [], turn.subject
        for name in () if turn.abstain else turn.chain:
            arg = {"find_user": "name", "get_weather": "city"}.get(name, "user_id")
            obs = self.execute(name, {arg: value})
            out.append((name, {arg: value}, obs))
            value = next(iter(obs.values()))
        return out

    def turn_reply(self, turn: UserTurn) -> str:
        """The oracle's closing text of one user turn: the answer, or the abstaining turn's reply."""
        if turn.abstain:
            return ABSTAIN_REPLY[turn.abstain]
        return render_answer(str(next(iter(self.turn_calls(turn)[-1][2].values()))))

    def execute(self, name: str, arguments: dict) -> dict:
        """Run one tool. Errors are observations, never exceptions."""
        if name not in TOOL_NAMES or name == self.withheld:
            return {"error": f"unknown tool {name!r}"}
        arg = {"find_user": "name", "get_weather": "city"}.get(name, "user_id")
        value = arguments.get(arg)
        if not isinstance(value, str) or set(arguments) != {arg}:
            return {"error": f"{name} takes one string argument {arg!r}"}
        table = {"find_user": (self.users, "user_id"), "get_friend": (self.friend, "friend_id"),
                 "get_city": (self.city, "city"), "get_weather": (self.sky, "weather")}[name]
        if value not in table[0]:
            return {"error": f"no result for {arg} {value!r}"}
        return {table[1]: table[0][value]}

    def oracle_calls(self) -> list[tuple[str, dict, dict]]:
        """(tool, arguments, observation) for the expert solution of the first user turn."""
        return self.turn_calls(self.user_turns[0])

    @property
    def answer(self) -> str:
        """The first user turn's answer (an abstaining first turn has none: ValueError)."""
        if self.abstain:
            raise ValueError(f"task {self.seed}: its first user turn ({self.abstain}) has no answer")
        return str(next(iter(self.oracle_calls()[-1][2].values())))


def make_task(seed: int, kind: str | None = None, *, user_turns: int = 1, abstain_frac: float = 0.0) -> Task:
    """The task of `seed`; `user_turns` > 1 or `abstain_frac` > 0 give it the paper's structure (module doc),
    drawn from a second generator so that the database and first question stay those of the plain task."""
    if user_turns < 1 or not 0.0 <= abstain_frac <= 1.0:
        raise ValueError(f"user_turns {user_turns} must be >= 1 and abstain_frac {abstain_frac} in [0, 1]")
    task = _plain_task(seed, kind)
    if user_turns == 1 and abstain_frac == 0.0:
        return task
    return _structured(task, random.Random(f"structure-{seed}"), user_turns, abstain_frac, fixed_kind=kind)


def _plain_task(seed: int, kind: str | None) -> Task:
    rng = random.Random(seed)
    kind = kind or rng.choice(sorted(TASK_KINDS))
    template, chain = TASK_KINDS[kind]
    people = rng.sample(NAMES, 5)
    users = dict(zip(people, rng.sample(USER_IDS, len(people))))
    uids = list(users.values())
    friend = {u: rng.choice([v for v in uids if v != u]) for u in uids}
    city = {u: rng.choice(CITIES) for u in uids}
    sky = {c: rng.choice(SKIES) for c in sorted(set(city.values()))}
    subject = people[0]
    return Task(seed, kind, template.format(name=f'"{subject}"'), chain, subject, users, friend, city, sky)


def _structured(task: Task, rng: random.Random, user_turns: int, abstain_frac: float,
                fixed_kind: str | None) -> Task:
    """`task` with 1..user_turns user turns, each abstaining with probability `abstain_frac`: a miss_func turn
    needs the withheld tool, every answerable turn avoids it; a miss_param turn is followed by a turn that names
    the person (same kind) when the episode has room for it."""
    n = rng.randint(1, user_turns)
    why: list[str | None] = [rng.choice(ABSTAIN_KINDS) if rng.random() < abstain_frac else None for _ in range(n)]
    for i in range(n - 1):  # the user answers a miss_param question in the next turn
        if why[i] == MISS_PARAM:
            why[i + 1] = "supply"
    withheld = rng.choice(WITHHOLDABLE) if MISS_FUNC in why else None
    people = list(task.users)  # people[0] is the plain task's subject
    turns: list[UserTurn] = []
    kinds: list[str] = []
    for i, w in enumerate(why):
        needs = [k for k in sorted(TASK_KINDS) if (withheld in TASK_KINDS[k][1]) == (w == MISS_FUNC)]
        if w == "supply":
            kind = kinds[-1]
        elif i == 0 and (fixed_kind or task.kind) in needs:
            kind = fixed_kind or task.kind
        else:
            kind = rng.choice(needs)
        subject = turns[-1].subject if w == "supply" else people[i % len(people)]
        template, chain = TASK_KINDS[kind]
        if w == MISS_PARAM:
            turns.append(UserTurn(template.format(name=UNNAMED), tuple(chain), subject, MISS_PARAM))
        elif w == "supply":
            turns.append(UserTurn(f'I mean "{subject}".', tuple(chain), subject))
        else:
            turns.append(UserTurn(template.format(name=f'"{subject}"'), tuple(chain), subject, w))
        kinds.append(kind)
    first = turns[0]
    return dataclasses.replace(task, kind=kinds[0], question=first.question, chain=list(first.chain),
                               subject=first.subject, abstain=first.abstain, more=tuple(turns[1:]),
                               withheld=withheld)


# Every consumer draws tasks from its own split. The presets were tuned on the layout of version 0.1 (train tasks
# of run seed s at s * 1e6, eval at 1e7, probe at 2e7), which run seeds 0-9 keep so that their runs reproduce;
# run seeds >= 10 used to train on the eval and probe tasks and now train far above every other range.
# Train, eval, probe and repair are disjoint for every run seed (tests/test_world.py checks seeds 0..10,000).
# `train_fill` (interleaved SFT filler) and `tokenizer` (BPE corpus) are training data too: they may share tasks
# with a train split, never with eval, probe or repair.
SPLITS = ("train", "train_fill", "eval", "probe", "format_probe", "repair", "tokenizer")
TASKS_PER_RUN_SEED = 1_000_000  # indices a run seed may use within one split
_LEGACY_RUN_SEEDS = 10
_FIXED_BASE = {"eval": 10_000_000, "probe": 20_000_000, "format_probe": 20_000_777, "tokenizer": 5_000_000}
_REPAIR_BASE, _HIGH_TRAIN_BASE = 30_000_000_000, 100_000_000_000


def task_seed(split: str, index: int, run_seed: int = 0) -> int:
    """The seed of task `index` of `split` for run seed `run_seed` (eval/probe/format_probe/tokenizer are fixed
    sets that ignore the run seed)."""
    if split not in SPLITS:
        raise ValueError(f"unknown task split {split!r}: use one of {', '.join(SPLITS)}")
    if index < 0 or run_seed < 0 or (index >= TASKS_PER_RUN_SEED and split != "train_fill"):
        raise ValueError(f"task index {index} / run seed {run_seed} out of range")
    if split in _FIXED_BASE:
        return _FIXED_BASE[split] + index
    if split == "repair":
        return _REPAIR_BASE + run_seed * TASKS_PER_RUN_SEED + index
    if split == "train_fill":
        return 9_000_000 + index  # the 0.1 filler pool (training data)
    if run_seed < _LEGACY_RUN_SEEDS:
        return run_seed * TASKS_PER_RUN_SEED + index
    return _HIGH_TRAIN_BASE + run_seed * TASKS_PER_RUN_SEED + index


def task_split(split: str, n: int, offset: int = 0, run_seed: int = 0, *, user_turns: int = 1,
               abstain_frac: float = 0.0) -> list[Task]:
    """Tasks `offset .. offset + n - 1` of `split` for `run_seed` (with the structure options of `make_task`)."""
    return [make_task(task_seed(split, offset + i, run_seed), user_turns=user_turns, abstain_frac=abstain_frac)
            for i in range(n)]

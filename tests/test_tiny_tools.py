"""The tiny tool-use task (`python -m furlong.tiny OUT --tools`) and multi-turn RL on it.

Fast: the files, tokenizer and template, the tool, and that the token layout the warm-up
teaches is the one multi-turn generation builds. Slow (one SFT warm-up shared): GRPO
through train.py with furlong.rollout.multi_turn raises the held-out reward, and an
OpenAI-client agent through sessions (scripts/tiny_tools_agent.py) samples the same
tokens as multi_turn at temperature 0, and GRPO runs through that agent.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from conftest import REPO, model_args, train_argv
from furlong import cli
from furlong.config import load_config
from furlong.engine.hf_engine import HFEngine
from furlong.engine.server import chat_template
from furlong.model.loading import load_hf_model, resolve_hf_dir
from furlong.output.metrics import read_metrics
from furlong.rollout import agentic, multi_turn
from furlong.sample import Sample
from furlong.tiny import (MODEL_SHAPE, NUM_EVAL, build_tokenizer, execute_tool, secret,
                          tool_conversation, write_tiny)

pytestmark = pytest.mark.timeout(600)
GENERATE = "furlong.rollout.multi_turn:generate"
EVAL = ["--eval-prompt-data", "lookup", "EVAL_FILE", "--eval-input-key", "prompt",
        "--eval-label-key", "label", "--eval-temperature", "1",
        "--eval-max-response-len", "40"]
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_tools(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny_tools"), seed=0, tools=True)


@pytest.fixture(scope="module")
def tokenizer(tiny_tools):
    return AutoTokenizer.from_pretrained(tiny_tools / "model")


@pytest.fixture(scope="module")
def tools_yaml(tmp_path_factory) -> Path:
    """The --generate-* flags as --custom-config-path keys (a YAML of Miles' kind)."""
    path = tmp_path_factory.mktemp("config") / "tools.yaml"
    path.write_text("generate_max_turns: 2\n"
                    "generate_execute_tool_function_path: furlong.tiny:execute_tool\n")
    return path


# ---------------------------------------------------------------- the task

def test_prompts_labels_and_warm_up_conversations(tiny_tools):
    data = tiny_tools / "data"
    train, held_out = read_jsonl(data / "train.jsonl"), read_jsonl(data / "eval.jsonl")
    assert len(held_out) == NUM_EVAL and len(train) == 9000 - NUM_EVAL
    assert not {row["prompt"] for row in train} & {row["prompt"] for row in held_out}
    for row in train + held_out:
        assert len(row["prompt"]) == 4 and row["label"] == str(secret(row["prompt"]))
    sft = read_jsonl(data / "sft.jsonl")
    assert [row["messages"] for row in sft] == [tool_conversation(row["prompt"])
                                               for row in train]
    assert len({row["label"] for row in train}) > 800  # the secrets are spread over 100-999


def test_the_tool_answers_lookups_only():
    assert asyncio.run(execute_tool("lookup", {"key": "4821"})) == str(secret("4821"))
    assert 100 <= secret("4821") <= 999
    assert asyncio.run(execute_tool("search", {"key": "4821"})) == "error"
    assert asyncio.run(execute_tool("lookup", {"id": "4821"})) == "error"
    assert asyncio.run(execute_tool("lookup", None)) == "error"


def test_tokenizer_keeps_the_addition_ids_and_spells_the_conversation(tokenizer):
    addition = build_tokenizer()
    assert tokenizer.convert_ids_to_tokens(list(range(len(addition)))) == \
        addition.convert_ids_to_tokens(list(range(len(addition))))
    text = tokenizer.apply_chat_template(tool_conversation("4821"), tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    assert len(ids) == 40 <= MODEL_SHAPE["max_position_embeddings"]
    answer = tokenizer.convert_ids_to_tokens(ids[ids.index(tokenizer.eos_token_id) + 5:])
    assert answer[:9] == ["<tool_call>", '{"name": "lookup", "arguments": {"key": "', "4",
                          "8", "2", "1", '"}}', "</tool_call>", "<|im_end|>"]


def test_the_warm_up_teaches_the_layout_multi_turn_generation_builds(tokenizer):
    """The SFT rendering of a conversation = its prompt, the first assistant turn as
    sampled up to <|im_end|>, then the tool reply as chat_template.continuation_ids writes
    it, then the answer: RL continues exactly the sequences the warm-up taught."""
    conversation = tool_conversation("4821")
    render = lambda messages, prompt: chat_template.encode_text(  # noqa: E731
        tokenizer, chat_template.render(tokenizer, messages, None, prompt, {}))
    warm_up = render(conversation, False)
    first_turn = render(conversation[:2], False)[:-1]  # the template's "\n" is not sampled
    reply = chat_template.continuation_ids(tokenizer, conversation[:2], conversation[2:3],
                                           tokenizer.eos_token_id, None, {})
    assert render(conversation[:3], True) == first_turn + reply
    assert warm_up[:len(first_turn + reply)] == first_turn + reply


def test_tiny_tools_sh_passes_the_config_check(tiny_tools):
    argv = model_args("tiny-tools.sh") + train_argv(
        tiny_tools, apply_chat_template=False, n_samples_per_prompt=None, num_rollout=None)
    config, warnings = load_config(argv)
    assert config.model.vocab_size == 37 and warnings == []


def test_the_generate_flags_reach_the_hooks(tiny_tools, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # the agent is loaded at startup
    from furlong.hooks import load_function
    from furlong.rollout.context import HookArgs
    config, _ = load_config(train_argv(
        tiny_tools, custom_generate_function_path="miles.rollout.generate_hub.multi_turn.generate",
        generate_max_turns=2, generate_tool_specs_path="furlong.tiny:TOOL_SPECS",
        generate_tool_call_parser="qwen25",
        generate_execute_tool_function_path="furlong.tiny:execute_tool",
        custom_agent_function_path="tiny_tools_agent:agent"))
    args = HookArgs(config)
    assert (args.generate_max_turns, args.generate_tool_specs_path,
            args.generate_tool_call_parser, args.generate_execute_tool_function_path,
            args.custom_agent_function_path) == (
        2, "furlong.tiny:TOOL_SPECS", "qwen25", "furlong.tiny:execute_tool",
        "tiny_tools_agent:agent")
    flag = "--custom-generate-function-path"
    assert load_function("miles.rollout.generate_hub.multi_turn.generate", flag) is \
        multi_turn.generate
    assert load_function("miles.rollout.generate_hub.agentic_tool_call.generate", flag) is \
        agentic.generate


# ---------------------------------------------------------------- learning (slow)

def run(argv: list[str]) -> list[dict]:
    """train.py in this process; the metrics rows of its --save directory."""
    assert cli.main(argv) == 0
    return read_metrics(Path(argv[argv.index("--save") + 1]) / "metrics.jsonl")


def eval_flags(tiny_tools: Path) -> list[str]:
    return [str(tiny_tools / "data/eval.jsonl@[0:256]") if flag == "EVAL_FILE" else flag
            for flag in EVAL]


def last_eval(rows: list[dict]) -> float:
    return [row["eval/lookup"] for row in rows if "eval/lookup" in row][-1]


@pytest.fixture(scope="module")
def warm_start(tiny_tools, tools_yaml, tmp_path_factory) -> tuple[Path, float]:
    """The SFT warm-up of scripts/run-tiny-tools.sh, 50 steps, and its held-out reward
    (sampled at temperature 1, multi-turn with the tool)."""
    save = tmp_path_factory.mktemp("sft")
    rows = run(train_argv(
        tiny_tools, prompt_data=tiny_tools / "data/sft.jsonl", input_key="messages",
        label_key=None, n_samples_per_prompt=None, loss_type="sft_loss",
        rollout_max_response_len=None, rollout_batch_size=128, micro_batch_size=128,
        num_rollout=50, lr="1e-3", weight_decay=0, save=save, eval_interval=50,
        skip_eval_before_train=True, custom_generate_function_path=GENERATE,
        custom_config_path=tools_yaml) + eval_flags(tiny_tools))
    return save, last_eval(rows)


@pytest.mark.slow
def test_grpo_with_a_tool_raises_the_held_out_reward(tiny_tools, tools_yaml, warm_start,
                                                     tmp_path):
    sft, before = warm_start
    assert 0.1 <= before <= 0.7, f"the warm-up should leave room to learn: {before}"
    rows = run(train_argv(
        tiny_tools, ref_load=sft, save=tmp_path / "grpo", rollout_shuffle=True,
        num_rollout=20, rollout_batch_size=8, n_samples_per_prompt=16,
        over_sampling_batch_size=16,
        dynamic_sampling_filter_path="furlong.rollout.filters:check_reward_nonzero_std",
        rollout_max_response_len=40, global_batch_size=128, micro_batch_size=128,
        use_rollout_logprobs=True, lr="1e-3", weight_decay=0, eval_interval=20,
        skip_eval_before_train=True, custom_generate_function_path=GENERATE,
        custom_config_path=tools_yaml) + eval_flags(tiny_tools))
    after = last_eval(rows)
    assert after >= before + 0.1, (before, after)
    rollout = next(row for row in rows if "rollout/raw_reward" in row)
    assert 15 < rollout["rollout/response_len/mean"] < 80  # two turns and a tool reply


def load_agent():
    """scripts/tiny_tools_agent.py's agent, imported from its file."""
    spec = importlib.util.spec_from_file_location(
        "tiny_tools_agent", REPO / "scripts/tiny_tools_agent.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.agent


@pytest.mark.slow
def test_an_agent_through_sessions_samples_what_multi_turn_samples(tiny_tools, tokenizer,
                                                                     warm_start):
    """Temperature 0 on the warmed-up model: the OpenAI-client agent through the session
    routes of an EngineServer and the multi-turn hook over an in-process engine give the
    same tokens, masks and log-probs, tool turns included."""
    from test_openai_api import Served
    model_dir = str(resolve_hf_dir(str(warm_start[0])))
    served = Served(HFEngine(load_hf_model(model_dir), tokenizer), tokenizer)
    host, port = served.url.removeprefix("http://").split(":")
    args = SimpleNamespace(
        tokenizer=tokenizer, engine=HFEngine(load_hf_model(model_dir), tokenizer),
        apply_chat_template_kwargs=None, rollout_max_context_len=None,
        use_rollout_routing_replay=False, generate_max_turns=2,
        generate_tool_specs_path=None, generate_tool_call_parser=None,
        generate_execute_tool_function_path="furlong.tiny:execute_tool")
    params = {"temperature": 0.0, "max_new_tokens": 40, "sampling_seed": 3}
    agent = load_agent()
    try:
        pairs = []
        for row in read_jsonl(tiny_tools / "data/eval.jsonl")[:8]:
            text = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                 tokenize=False, add_generation_prompt=True)
            rendered = Sample(prompt=text, tokens=chat_template.encode_text(tokenizer, text))
            own = asyncio.run(multi_turn.generate(args, rendered, params))
            through = asyncio.run(agentic.run_agent(
                agent, f"http://{host}:{port}", Sample(prompt=row["prompt"]), params))
            pairs.append((own, through))
    finally:
        served.stop()
    for own, through in pairs:
        assert through.tokens == own.tokens and through.loss_mask == own.loss_mask
        assert through.rollout_log_probs == pytest.approx(own.rollout_log_probs, abs=1e-4)
        assert through.metadata["num_turns"] == own.metadata["num_turns"]
    assert sum(own.metadata["num_turns"] == 2 for own, _ in pairs) >= 6  # it calls the tool
    assert sum(through.metadata["num_lookups"] for _, through in pairs) >= 6


def test_async_grpo_through_an_agent_runs(tiny_tools, warm_start, tmp_path, monkeypatch):
    """train_async.py with Miles' agentic generate path and an OpenAI-client agent: the
    next rollout's sessions run while the last one trains."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    argv = train_argv(  # no chat template: the agent gets the prompt as the data has it
        tiny_tools, apply_chat_template=False, ref_load=warm_start[0],
        save=tmp_path / "grpo", num_rollout=3, rollout_batch_size=4,
        n_samples_per_prompt=4, rollout_max_response_len=40,
        custom_generate_function_path="miles.rollout.generate_hub.agentic_tool_call.generate",
        custom_agent_function_path="tiny_tools_agent:agent")
    assert cli.main(argv, prog="train_async.py", overlap=True) == 0
    rows = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    rollouts = [row for row in rows if "rollout/raw_reward" in row]
    assert len(rollouts) == 3 and rollouts[0]["rollout/raw_reward"] > 0  # it looks keys up
    assert rollouts[0]["rollout/num_turns"] > 1  # the sessions' turns and template drift
    assert rollouts[0]["rollout/retokenize_mismatch_tokens"] >= 0
    assert max(row.get("rollout/staleness", 0) for row in rows) == 1  # overlapped

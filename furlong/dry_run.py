"""--dry-run: check everything that can be checked without loading weights, then exit 0.

Validates the flags and config.json (already done by load_config), reads the first
rows of every data file and renders their prompts with the tokenizer (the chat
template included), prints the resolved configuration with the source of each
value, and states the devices the run needs, checking them only where they exist, the
engines (which devices each takes, who feeds it weights), and the trainer's mesh and
pipeline stages (placement and `pipeline_layout` refuse the layouts the model or the
ranks cannot take). On a machine without GPUs a GPU layout is described as it is and
checked as the CPU processes that would run it here; "valid" means the run would start.
"""
from __future__ import annotations

import torch

from furlong.cluster.placement import (check_engine_devices, cluster_flags_given, describe_mesh,
                                       plan_placement)
from furlong.config import Config, ConfigError, eval_datasets
from furlong.config.model_check import read_hf_config
from furlong.config.report import format_config
from furlong.data import DataError, DataKeys, PromptEncoder, load_records, read_tools
from furlong.engine.factory import engine_options, resolve_backend
from furlong.train.pipeline_layout import PipelineLayout, describe_layout

PEEK_ROWS = 5


def data_files(config: Config) -> list[tuple[str, DataKeys]]:
    r, e = config.rollout, config.eval
    files = []
    if r.prompt_data:
        files.append((r.prompt_data, DataKeys(r.input_key, r.label_key, r.metadata_key,
                                              r.tool_key)))
    eval_keys = DataKeys(e.eval_input_key or r.input_key, e.eval_label_key, r.metadata_key,
                         r.tool_key)
    files += [(path, eval_keys) for _, path in eval_datasets(config)]
    return files


def load_tokenizer(directory: str):
    """The tokenizer alone: a dry run never reads model weights."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise DataError(f"--hf-checkpoint {directory}: cannot load the tokenizer "
                        f"({error})") from None


def check_prompts(rows: list[tuple[str, dict]], keys: DataKeys, encoder: PromptEncoder) -> int:
    """Render and tokenize each row as the run will; returns the longest prompt in tokens."""
    longest = 0
    for where, record in rows:
        tools = read_tools(record.get(keys.tool_key), where, keys.tool_key)
        try:
            ids = encoder.encode(record[keys.input_key], tools)
        except Exception as error:  # noqa: BLE001 - any template failure names the row
            raise DataError(f"{where}: cannot render the prompt ({error})") from None
        longest = max(longest, len(ids))
    return longest


def device_plan(config: Config) -> str:
    """What the run needs, and whether this machine has it."""
    c = config.cluster
    trainer = c.actor_num_nodes * c.actor_num_gpus_per_node
    engines = trainer if c.colocate else (c.rollout_num_gpus or 0)
    available = torch.cuda.device_count()
    if not cluster_flags_given(config):
        where = "the first GPU" if available else "the CPU (no GPU here)"
        return f"devices: no cluster flags: one process on {where}"
    need = trainer if c.colocate else trainer + engines
    layout = (f"{trainer} GPUs shared by trainer and engines (--colocate)" if c.colocate else
              f"{trainer} trainer GPUs + {engines} engine GPUs")
    line = f"devices: the run needs {need} GPUs on {c.actor_num_nodes} node(s): {layout}"
    if available == 0:
        return line + "; this machine has none: here the same layout runs as CPU processes"
    return line + f"; this machine has {available}"


def pipeline_plan(config: Config) -> str:
    """Which decoder layers each pipeline stage holds (config.json's layer count), or the
    refusal of a layout that cannot split them."""
    directory = config.ckpt.hf_checkpoint
    num_layers = read_hf_config(directory)["num_hidden_layers"]
    try:
        return describe_layout(num_layers, PipelineLayout.from_perf(config.perf))
    except ValueError as error:
        raise ConfigError(f"{error} ({directory}/config.json)") from None


def dry_run(config: Config) -> int:
    r = config.rollout
    encoder = PromptEncoder(load_tokenizer(config.ckpt.hf_checkpoint), r.apply_chat_template,
                            r.apply_chat_template_kwargs)
    for path, keys in data_files(config):
        rows = load_records(path, keys, limit=PEEK_ROWS)
        longest = check_prompts(rows, keys, encoder)
        print(f"data: {path}: first {len(rows)} rows OK (longest prompt {longest} tokens)")
    print(format_config(config))
    print(device_plan(config))
    if config.perf.pipeline_model_parallel_size > 1:
        print(pipeline_plan(config))
    placement = plan_placement(config, torch.cuda.device_count())
    places_engines = not (placement.in_process or config.rollout.rollout_external
                          or placement.num_engines == 0)
    if places_engines:
        backend = resolve_backend(engine_options(config, placement.colocate),
                                  torch.device(placement.device))
        check_engine_devices(placement, backend)  # what `auto` picks on this machine
    print("layout: " + placement.describe())
    if places_engines:
        print(placement.describe_engines())
    print(describe_mesh(config, placement.trainer_ranks))
    print("dry run: configuration is valid")
    return 0

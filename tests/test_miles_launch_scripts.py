"""Real Miles launch scripts pass `train.py --dry-run` with only their paths changed.

tests/miles_scripts/ holds the flag arrays of Miles' launch scripts (and of the
scripts/models/*.sh they source) and the arguments of their `python3 train.py`, in order;
bash expands them as the scripts do. Each model directory holds the real config.json of
its family (tests/miles_scripts/configs/) and the tiny tokenizer, and the data files hold
a few rows in the datasets' formats. On this machine (no GPU) the dry run describes each
GPU layout and checks it as the CPU processes that would run it here; its lines must tell
one story: the GPUs the script needs, the layout, which devices each engine takes and who
feeds it, the trainer's mesh, and "valid" only for what would start. A layout this build
cannot start is refused naming the flag, and never called valid.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from furlong import cli, dry_run

SCRIPTS = Path(__file__).with_name("miles_scripts")


def script_argv(script: str, root: Path) -> list[str]:
    """The arguments the script passes to train.py, as bash expands them."""
    printed = subprocess.run(
        ["bash", "-c", 'source "$SCRIPTS/$1" && printf "%s\\0" "${TRAIN_ARGS[@]}"', "argv",
         script], check=True, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "SCRIPTS": str(SCRIPTS), "ROOT": str(root),
             "MODELS_DIR": str(root), "DATA_DIR": str(root)})
    return printed.stdout.split("\0")[:-1]


def math_rows(count: int) -> list[dict]:
    """Rows in dapo-math-17k's format: the prompt as chat messages, a label."""
    return [{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "label": str(2 * i)}
            for i in range(count)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Model directories (real config.json, tiny tokenizer) and datasets, laid out as the
    scripts name them under $ROOT."""
    from furlong.tiny import build_tokenizer
    root = tmp_path_factory.mktemp("miles_root")
    tokenizer = build_tokenizer()
    for config in (SCRIPTS / "configs").glob("*.json"):
        model = root / config.stem
        tokenizer.save_pretrained(model)
        (model / "config.json").write_text(config.read_text())
    for path, rows in (("dapo-math-17k/dapo-math-17k.jsonl", math_rows(64)),
                       ("aime-2024/aime-2024.jsonl", math_rows(30))):
        (root / path).parent.mkdir(parents=True)
        (root / path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq
    (root / "gsm8k").mkdir()
    pq.write_table(pa.Table.from_pylist([{"messages": row["prompt"], "label": row["label"]}
                                         for row in math_rows(16)]),
                   root / "gsm8k/test.parquet")
    return root


def dry_run_of(script: str, root: Path, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(dry_run.torch.cuda, "device_count", lambda: 0)
    code = cli.main(script_argv(script, root) + ["--dry-run"])
    out, err = capsys.readouterr()
    return code, out, err


def plan(out: str) -> dict[str, list[str]]:
    """The dry run's plan lines by kind (devices, layout, engines, mesh, dry run)."""
    kinds = ("devices:", "layout:", "engines:", "mesh:", "dry run:")
    found: dict[str, list[str]] = {kind: [] for kind in kinds}
    for line in out.splitlines():
        for kind in kinds:
            if line.startswith(kind):
                found[kind].append(line)
    return found


def assert_one_story(out: str) -> dict[str, str]:
    """Each plan line once, "valid" last, and the lines agree with one another: the GPUs
    needed are the trainer's ranks (colocated), the layout runs on CPU processes here as
    the devices line says, the engines tile the devices, the mesh counts the ranks."""
    lines = plan(out)
    assert {kind: len(found) for kind, found in lines.items()} == {
        "devices:": 1, "layout:": 1, "engines:": 1, "mesh:": 1, "dry run:": 1}, lines
    devices, layout, engines, mesh = (lines[kind][0] for kind in
                                      ("devices:", "layout:", "engines:", "mesh:"))
    assert out.rstrip().endswith("dry run: configuration is valid")
    needed = int(re.search(r"needs (\d+) GPUs", devices).group(1))
    ranks, num_engines, per_engine = map(int, re.search(
        r"(\d+) trainer ranks and (\d+) engine\(s\) of (\d+) cpu device", layout).groups())
    assert "shared by trainer and engines (--colocate)" in devices
    assert "sharing the trainer's devices" in layout
    assert "this machine has none: here the same layout runs as CPU processes" in devices
    assert needed == ranks == num_engines * per_engine
    assert engines.startswith(f"engines: {num_engines} x tp {per_engine} on devices [")
    assert f"= {ranks} trainer rank(s)" in mesh
    return {"devices": devices, "layout": layout, "engines": engines, "mesh": mesh}


@pytest.mark.parametrize("script, nodes, layout, engines, mesh", [
    ("run-qwen3-4B.sh", 1, "8 trainer ranks and 4 engine(s) of 2",
     "4 x tp 2 on devices [0,1] [2,3] [4,5] [6,7]", "dp 4 x cp 1 x tp 2 x pp 1"),
    ("spec-launch-script.sh", 1, "8 trainer ranks and 4 engine(s) of 2",
     "4 x tp 2 on devices [0,1] [2,3] [4,5] [6,7]", "dp 4 x cp 1 x tp 2 x pp 1"),
    ("run-qwen3-14B-b300.sh", 1, "8 trainer ranks and 2 engine(s) of 4",
     "2 x tp 4 on devices [0,1,2,3] [4,5,6,7]", "dp 2 x cp 1 x tp 4 x pp 1"),
    ("run-qwen3-32B.sh", 1, "8 trainer ranks and 1 engine(s) of 8",
     "1 x tp 8 on devices [0,1,2,3,4,5,6,7]", "dp 1 x cp 1 x tp 8 x pp 1"),
    ("run-llama3.1-8B-Instruct.sh", 1, "8 trainer ranks and 4 engine(s) of 2",
     "4 x tp 2 on devices [0,1] [2,3] [4,5] [6,7]", "dp 4 x cp 1 x tp 2 x pp 1"),
    ("run-qwen3-30B-A3B.sh", 1, "8 trainer ranks and 1 engine(s) of 8",
     "1 x tp 8 on devices [0,1,2,3,4,5,6,7]",
     "dp 2 x cp 1 x tp 4 x pp 1 (ep 8, carved from dp x tp)"),
    ("fsdp_rl/qwen3-30b-a3b.sh", 1, "8 trainer ranks and 8 engine(s) of 1",
     "8 x tp 1 on devices [0] [1] [2] [3] [4] [5] [6] [7]", "dp 8 x cp 1 x tp 1 x pp 1"),
    ("fsdp_rl/deepseek-v3.sh", 8, "64 trainer ranks and 64 engine(s) of 1",
     "64 x tp 1 on devices [0] [1] [2] [3] [...] [62] [63]", "dp 64 x cp 1 x tp 1 x pp 1"),
])
def test_a_miles_script_passes_the_dry_run_with_its_device_plan(root, capsys, monkeypatch,
                                                                script, nodes, layout, engines,
                                                                mesh):
    code, out, err = dry_run_of(script, root, capsys, monkeypatch)
    assert code == 0, err
    story = assert_one_story(out)
    assert f"on {nodes} node(s)" in story["devices"]
    assert story["layout"] == f"layout: {layout} cpu device(s) each, sharing the trainer's " \
                              "devices (Ray)"
    assert story["engines"].startswith(f"engines: {engines}; each TP rank's weights from the "
                                       "trainer rank on its device")
    assert mesh in story["mesh"]
    # --colocate turns both offload flags on, as in Miles
    report = {line.split()[0]: line.split()[1:] for line in out.splitlines()
              if line.startswith("  --offload-")}
    assert report["--offload-train"] == ["True", "(derived)"]
    assert report["--offload-rollout"] == ["True", "(derived)"]


def test_expert_groups_across_tensor_parallel_ranks_need_sequence_parallel(root, capsys,
                                                                         monkeypatch):
    """Miles' Qwen3-30B-A3B script trains with tp 4 x ep 8 on 8 GPUs: its expert groups
    take tensor-parallel ranks, each running the MoE block on its sequence slice. Without
    its --sequence-parallel that layout cannot start: the dry run stops on the flag,
    before any plan line says valid."""
    monkeypatch.setattr(dry_run.torch.cuda, "device_count", lambda: 0)
    argv = [arg for arg in script_argv("run-qwen3-30B-A3B.sh", root)
            if arg != "--sequence-parallel"]
    code = cli.main([*argv, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "--expert-model-parallel-size 8 over 2 data-parallel ranks x " \
           "--tensor-model-parallel-size 4" in err and "add --sequence-parallel" in err
    assert "configuration is valid" not in out
    assert plan(out)["layout:"] == []

"""Miles' hook-side flags act with Miles' meaning: --custom-config-path (YAML or base64:,
keys that name flags override them) and --custom-tis-function-path (Miles' TIS hook
signature, called where Miles calls it: weighting the per-token policy loss)."""
from __future__ import annotations

import base64
import textwrap
from dataclasses import replace

import pytest
import torch

from furlong.config import ConfigError, load_config
from furlong.hooks import load_hooks
from furlong.rollout.context import HookArgs
from furlong.train.batch import TrainBatch, pack
from furlong.train.objective import LossInputs, make_reducer, policy_objective

from conftest import train_argv

CUSTOM = "rollout_batch_size: 2\nmy_threshold: 0.25\n"


def test_custom_config_yaml_overrides_the_flags_it_names(tiny, tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text(CUSTOM)
    config, warnings = load_config(train_argv(tiny, custom_config_path=path))
    assert config.rollout.rollout_batch_size == 2  # the flag said 4: the YAML wins, as in Miles
    assert any("--rollout-batch-size" in w and "custom-config-path" in w for w in warnings)


def test_custom_config_values_are_typed_and_count_as_given(tiny, tmp_path):
    """YAML reads 1e-6 as a string and a cluster flag must switch to Ray mode: the keys go
    through the flags' own parsing, as if given on the command line."""
    from furlong.cluster.placement import plan_placement
    path = tmp_path / "custom.yaml"
    path.write_text("lr: 1e-6\nactor_num_gpus_per_node: 2\nrollout_num_gpus: 1\n"
                    "rollout_shuffle: true\n")
    config, _ = load_config(train_argv(tiny, custom_config_path=path))
    assert config.optimizer.lr == 1e-6 and config.rollout.rollout_shuffle is True
    assert not plan_placement(config, 0).in_process
    path.write_text("rollout_batch_size: many\n")
    with pytest.raises(ConfigError, match="--custom-config-path .*custom.yaml: argument "
                                          "--rollout-batch-size: invalid int value: 'many'"):
        load_config(train_argv(tiny, custom_config_path=path))


def test_custom_config_base64_payload(tiny):
    payload = "base64:" + base64.b64encode(CUSTOM.encode()).decode()
    config, _ = load_config(train_argv(tiny, custom_config_path=payload))
    assert config.rollout.rollout_batch_size == 2


def test_hooks_see_custom_config_keys(tiny, tmp_path):
    path = tmp_path / "custom.yaml"
    path.write_text(CUSTOM)
    config, _ = load_config(train_argv(tiny, custom_config_path=path))
    assert HookArgs(config).my_threshold == 0.25


def test_bad_custom_config_names_the_file(tiny, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="--custom-config-path .*broken.yaml"):
        load_config(train_argv(tiny, custom_config_path=path))
    with pytest.raises(ConfigError, match="--custom-config-path .*missing.yaml"):
        load_config(train_argv(tiny, custom_config_path=tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(train_argv(tiny, custom_config_path="base64:" +
                               base64.b64encode(b"- 1\n").decode()))


TIS_HOOK = textwrap.dedent('''
    import torch

    def zero_weights(args, *, pg_loss, train_log_probs, rollout_log_probs, loss_masks,
                     **kwargs):
        """Miles' signature; weights every token 0 and reports how many tokens it saw."""
        ratio = torch.cat(train_log_probs) - torch.cat(rollout_log_probs)
        return pg_loss * 0.0, loss_masks, {"my_tis": torch.ones_like(ratio) * args.tis_clip}
''')


def micro_batch() -> tuple:
    torch.manual_seed(0)
    batch = TrainBatch(tokens=[torch.arange(6), torch.arange(5)], response_lengths=[3, 2],
                       loss_masks=[torch.ones(3), torch.ones(2)], rewards=torch.tensor([1., 0.]),
                       rollout_log_probs=[-torch.rand(3), -torch.rand(2)],
                       old_log_probs=[-torch.rand(3), -torch.rand(2)],
                       advantages=[torch.full((3,), 1.0), torch.full((2,), -1.0)])
    micro = pack(batch, [0, 1], "cpu")
    log_probs = (micro.token_fields["old_log_probs"] + 0.1).requires_grad_()
    return micro, log_probs


def objective(grpo):
    micro, log_probs = micro_batch()
    inputs = LossInputs(log_probs, torch.zeros(5), micro, make_reducer(micro, False, 2.0))
    loss, metrics = policy_objective(grpo, inputs)
    loss.backward()
    return metrics, log_probs.grad


def test_custom_tis_hook_weights_the_policy_loss(tiny, tmp_path, monkeypatch):
    (tmp_path / "my_tis.py").write_text(TIS_HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))
    config, _ = load_config(train_argv(tiny, use_tis=True,
                                       custom_tis_function_path="my_tis.zero_weights"))
    assert load_hooks(config).custom_tis is not None  # imported at startup
    builtin, builtin_grad = objective(replace(config.grpo, custom_tis_function_path=None))
    hooked, hooked_grad = objective(config.grpo)
    assert builtin["pg_loss"].abs() > 1e-3 and builtin_grad.abs().sum() > 0
    assert hooked["pg_loss"] == 0 and hooked_grad.abs().sum() == 0
    # The hook's metric, reduced like the loss: mean over samples of args.tis_clip.
    assert hooked["my_tis"].item() == pytest.approx(config.grpo.tis_clip)
    assert "tis" not in hooked and hooked["ois"] == pytest.approx(builtin["ois"])


def test_missing_tis_hook_is_a_startup_error(tiny):
    with pytest.raises(ConfigError, match="--custom-tis-function-path no_such_module.tis"):
        load_config(train_argv(tiny, use_tis=True, custom_tis_function_path="no_such_module.tis"))


def test_forwarded_sglang_flags_are_miles_args_sglang_attributes(tiny):
    """--sglang-X goes to the servers and, as in Miles, to hooks as args.sglang_X (typed:
    numbers, switches, lists); furlong's own --sglang-server-concurrency keeps its flag."""
    config, _ = load_config(train_argv(tiny) + [
        "--sglang-mem-fraction-static", "0.7", "--sglang-enable-deterministic-inference",
        "--sglang-cuda-graph-bs", "1", "2", "4", "--sglang-attention-backend", "fa3",
        "--sglang-dp-size", "2", "--sglang-server-concurrency", "64"])
    args = HookArgs(config)
    assert args.sglang_mem_fraction_static == 0.7
    assert args.sglang_enable_deterministic_inference is True
    assert args.sglang_cuda_graph_bs == [1, 2, 4]
    assert args.sglang_attention_backend == "fa3"
    assert args.sglang_dp_size == 2
    assert args.sglang_server_concurrency == 64
    with pytest.raises(AttributeError, match="sglang_tp_size"):
        args.sglang_tp_size

"""GRPO_ARGS' on-policy distillation flags (--use-opd, --opd-*) and the teacher-server hooks
against the rest of the flags; each refusal names the flag and the fix.

--opd-type megatron loads a teacher in the trainer (--opd-teacher-load); --opd-type sglang
takes each sample's teacher_log_probs, which Miles' pair of teacher-server hooks
(rollout/teacher.py, under Miles' and slime's paths) sets from the server at --rm-url or
the one --opd-teacher-urls / --opd-teacher-adapters route a sample to. Top-k distillation
is not built.
"""
from __future__ import annotations

from furlong.config.groups import Config
from furlong.config.parser import ConfigError, option_name
from furlong.hooks import hook_target

TEACHER_REWARD = "furlong.rollout.teacher.reward_func"
TEACHER_POST_PROCESS = "furlong.rollout.teacher.post_process_rewards"


def _check_teacher_hooks(config: Config) -> None:
    """The teacher-server pair of hooks (rollout/teacher.py, Miles' on-policy distillation
    paths) only together, with --use-opd --opd-type sglang, a teacher URL and no eval
    (whose reward would be the teacher's reply); no reward post-process under SFT."""
    r, g = config.rollout, config.grpo
    reward, post = r.custom_rm_path, r.custom_reward_post_process_path
    if post is not None and g.loss_type == "sft_loss":
        raise ConfigError(f"--custom-reward-post-process-path {post}: --loss-type sft_loss "
                          "has no rewards to post-process; leave the flag out")
    if reward is not None and hook_target(reward) == TEACHER_REWARD:
        if not r.rm_url and not g.opd_teacher_urls:
            raise ConfigError(f"--custom-rm-path {reward} scores each sample on the teacher "
                              "server: set --rm-url http://HOST:PORT/generate, or "
                              "--opd-teacher-urls NAME=URL ... for several teachers")
        if post is None or hook_target(post) != TEACHER_POST_PROCESS:
            raise ConfigError(f"--custom-rm-path {reward}: its reward is the teacher server's "
                              "reply, which --custom-reward-post-process-path "
                              f"{reward.removesuffix('reward_func')}post_process_rewards "
                              "turns into teacher_log_probs: set that")
        if config.eval.eval_prompt_data:
            raise ConfigError(f"--eval-prompt-data: eval would score answers with "
                              f"--custom-rm-path {reward}, whose reward is the teacher's "
                              "reply, not a score; leave out --eval-prompt-data")
    if post is not None and hook_target(post) == TEACHER_POST_PROCESS \
            and not (g.use_opd and g.opd_type == "sglang"):
        raise ConfigError(f"--custom-reward-post-process-path {post} gives each sample the "
                          "teacher's log-probs and the reward 0, which only --use-opd "
                          "--opd-type sglang trains on: add those flags")


def check_distillation(config: Config) -> None:
    """Raise ConfigError for on-policy distillation flags that cannot run as given."""
    g = config.grpo
    _check_teacher_hooks(config)
    if g.opd_kl_coef < 0:
        raise ConfigError(f"--opd-kl-coef {g.opd_kl_coef}: must be >= 0")
    if not g.use_opd:
        given = [option_name(name) for name in ("opd_type", "opd_kl_coef", "opd_teacher_load",
                                                "opd_log_prob_top_k", "opd_teacher_urls",
                                                "opd_teacher_adapters", "opd_teacher_key")
                 if config.given(f"grpo.{name}")]
        if given:
            raise ConfigError(f"{', '.join(given)} has no effect without --use-opd: add "
                              "--use-opd, or leave the flag out")
        return
    if g.opd_type is None:
        raise ConfigError("--use-opd needs --opd-type: megatron (a teacher model in the trainer, "
                          "--opd-teacher-load DIR) or sglang (each sample's teacher_log_probs, "
                          "set by a reward hook)")
    if g.opd_teacher_load and not g.needs_teacher:
        raise ConfigError(f"--opd-teacher-load {g.opd_teacher_load}: --opd-type {g.opd_type} "
                          "takes the teacher's log-probs from the samples; load a teacher "
                          "with --opd-type megatron, or leave the flag out")
    if g.needs_teacher and not g.opd_teacher_load:
        raise ConfigError("--opd-type megatron needs --opd-teacher-load DIR: the teacher's HF "
                          "directory (or a furlong checkpoint)")
    if g.opd_log_prob_top_k:
        raise ConfigError(f"--opd-log-prob-top-k {g.opd_log_prob_top_k}: furlong's on-policy "
                          "distillation uses the teacher's log-prob of the sampled token only; "
                          "top-k distillation is not built: set 0 or leave the flag out")
    if g.loss_type == "sft_loss":
        raise ConfigError("--use-opd changes the advantages, which --loss-type sft_loss does "
                          "not use: use --loss-type policy_loss")
    _check_teacher_routes(config)


def _check_teacher_routes(config: Config) -> None:
    """--opd-teacher-urls / --opd-teacher-adapters: NAME=VALUE maps of teacher servers for
    --opd-type sglang; a name with no URL of its own is scored at --rm-url."""
    g = config.grpo
    routed = [option_name(name) for name in ("opd_teacher_urls", "opd_teacher_adapters",
                                             "opd_teacher_key") if config.given(f"grpo.{name}")]
    if routed and g.opd_type != "sglang":
        raise ConfigError(f"{', '.join(routed)} routes samples to teacher servers, which "
                          f"--opd-type {g.opd_type} does not query: use --opd-type sglang, or "
                          "leave the flags out")
    urls = teacher_map(g.opd_teacher_urls, "--opd-teacher-urls")
    adapters = teacher_map(g.opd_teacher_adapters, "--opd-teacher-adapters")
    without_url = sorted(set(adapters) - set(urls))
    if without_url and not config.rollout.rm_url:
        raise ConfigError(f"--opd-teacher-adapters: teachers {without_url} have no URL in "
                          "--opd-teacher-urls and no --rm-url is set: give the teacher "
                          "server's /generate with --rm-url")


def teacher_map(entries: tuple[str, ...] | None, flag: str) -> dict[str, str]:
    """{NAME: VALUE} of a teacher routing flag's NAME=VALUE entries (split at the first
    '='); a ConfigError naming the flag for a malformed entry or a repeated name."""
    names: dict[str, str] = {}
    for entry in entries or ():
        name, separator, value = (part.strip() for part in entry.partition("="))
        if not (separator and name and value):
            raise ConfigError(f"{flag} {entry!r}: give NAME=VALUE, e.g. math=http://HOST:PORT"
                              "/generate")
        if name in names:
            raise ConfigError(f"{flag}: teacher {name!r} is named twice")
        names[name] = value
    return names

"""The --rm-type vocabulary: which names exist, which compare with a label, and the
boxed_ prefix rule. The scoring functions behind the names live in rollout/rewards/."""
from __future__ import annotations

# Rewards that score a response against the sample's label.
LABELLED_REWARDS = ("math", "deepscaler", "dapo", "f1", "gpqa")
REWARD_TYPES = (*LABELLED_REWARDS, "remote_rm", "random")
# These find their own answer in the response; a boxed_ prefix would extract it twice
# and score every response as wrong.
SELF_EXTRACTING = ("math", "deepscaler", "dapo")


def split_rm_type(rm_type: str) -> tuple[bool, str]:
    """(has the boxed_ prefix, base type) of an --rm-type value; ValueError if unknown."""
    boxed, base = rm_type.startswith("boxed_"), rm_type.removeprefix("boxed_")
    if base not in REWARD_TYPES:
        raise ValueError(f"--rm-type {rm_type}: unknown; choose one of "
                         f"{', '.join(REWARD_TYPES)} (optionally prefixed boxed_)")
    if boxed and base in SELF_EXTRACTING:
        raise ValueError(f"--rm-type {rm_type}: {base} already finds the answer in the "
                         f"response itself; use --rm-type {base}")
    return boxed, base

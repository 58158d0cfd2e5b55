"""The resolved configuration as text, grouped as in --help, each value with its source
(flags that have no effect here appear only when given)."""
from __future__ import annotations

from furlong.config.flag import has_no_effect
from furlong.config.groups import GROUPS, Config, flag_fields
from furlong.config.parser import option_name


def format_config(config: Config) -> str:
    lines = []
    for title, attr, cls in GROUPS:
        lines.append(title)
        group = getattr(config, attr)
        for f in flag_fields(cls):
            source = config.sources.get(f"{attr}.{f.name}", "default")
            if source == "default" and has_no_effect(f):
                continue  # accepted for Miles' scripts, warned about when given
            lines.append(f"  {option_name(f.name):<42} {_show(getattr(group, f.name)):<28} "
                         f"({source})")
        if attr == "sglang":
            for name, values in group.passthrough:
                shown = " ".join(values) if values else "(switch)"
                lines.append(f"  {'--sglang-' + name:<42} {shown:<28} (flag, forwarded)")
    return "\n".join(lines)


def _show(value) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return "-" if value is None else str(value)

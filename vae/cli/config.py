"""`vae config show`: the resolved configuration (defaults, file, overrides) as YAML, with its hash."""

from __future__ import annotations

import yaml

from vae.core.config import config_hash, config_to_dict, load_config


def cmd_config_show(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(f"# resolved config (hash {config_hash(cfg)})")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def add_commands(sub) -> None:
    config = sub.add_parser("config", help="the configuration").add_subparsers(dest="config_command",
                                                                                 required=True)
    p = config.add_parser("show", help="print the resolved configuration (defaults, file, overrides) as YAML")
    p.add_argument("--config", help="YAML file with the differences from the defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.set_defaults(func=cmd_config_show)

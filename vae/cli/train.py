"""`vae train`: train or resume a run, in this process or as `accelerate launch` ranks on one or more machines."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vae_runtime.atomic import atomic_write_json
from vae_runtime.errors import BadInput
from vae_runtime.limits import read_file
from common import folder_lock
from vae.cli.args import WAIT_HELP, positive, wait_seconds
from vae.core.config import config_to_dict, load_config
from vae.core.distributed import run_launched
from vae.core.run import latest_checkpoint


def cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.accelerate_config and not Path(args.accelerate_config).is_file():
        raise BadInput(f"--accelerate-config {args.accelerate_config}: file not found")
    _check_machines(args)
    if args.num_processes == 1 and args.num_machines == 1 and not args.accelerate_config:
        from vae.training.train import Preempted, train  # lazy: torch and Accelerate (the CLI stays torch-free)

        try:
            run_dir = train(cfg, wait_s=args.wait)
        except Preempted as stopped:
            print(f"vae train: {stopped}", file=sys.stderr)
            return Preempted.exit_code
    else:
        # this process holds the run folder's lock for its ranks (and passes it on to the launcher)
        with folder_lock.hold(cfg.run_dir, "run folder", args.wait) as lock:
            code = _train_launched(args, cfg, lock)
        if code != 0:
            return code
        run_dir = Path(cfg.run_dir)
    print(f"trained {run_dir}")
    return 0


def _train_launched(args, cfg, lock) -> int:
    """`accelerate launch` of the training ranks, under the run folder's `lock`; 0 when they all succeeded."""
    run_dir = Path(cfg.run_dir)
    config_file = atomic_write_json(run_dir / "launch_config.json", config_to_dict(cfg))
    env, fds = lock.for_children()
    code = run_launched("vae.training.train", [str(config_file)], args.num_processes,
                        log=run_dir / "launch.log", env=env, pass_fds=fds, num_machines=args.num_machines,
                        machine_rank=args.machine_rank, main_process_ip=args.main_process_ip,
                        main_process_port=args.main_process_port, accelerate_config=args.accelerate_config)
    if code == 143:
        return _preempted_ranks(run_dir)
    if code != 0:  # the failing rank has said why in one line above; bad input stays exit 2
        log = run_dir / "launch.log"
        bad_input = log.is_file() and any(line.startswith(b"vae: error:") for line in log.read_bytes().splitlines())
        return 2 if bad_input else 1
    return 0


def _check_machines(args) -> None:
    """The machine rank and the main machine's address, before a launch that would wait for them forever."""
    if args.machine_rank < 0 or (not args.accelerate_config and args.machine_rank >= args.num_machines):
        raise BadInput(f"--machine-rank {args.machine_rank}: expected an integer in [0, {args.num_machines - 1}] "
                       f"(one per machine of --num-machines {args.num_machines})")
    if args.num_machines > 1 and not args.main_process_ip and not args.accelerate_config:
        raise BadInput(f"--main-process-ip: needed with --num-machines {args.num_machines} (the address of the "
                       "machine with --machine-rank 0, which every machine connects to)")


def _preempted_ranks(run_dir: Path) -> int:
    """After a SIGTERM passed to the ranks: 143 when every rank recorded the step of the last checkpoint (they
    stopped together and resume from it), else 1."""
    latest = latest_checkpoint(run_dir)
    records = [json.loads(read_file(p, "json")) for p in sorted((run_dir / "ranks").glob("rank-*.json"))]
    steps = {r["step"] for r in records}
    if latest is not None and records and len(records) == records[0]["world_size"] and \
            steps == {int(latest.stem.split("-")[1])}:
        print(f"vae train: stopped by SIGTERM at step {steps.pop()}: every rank stopped there with a checkpoint; run "
              "the same command again to resume", file=sys.stderr)
        return 143
    print(f"vae train: stopped by SIGTERM before every rank checkpointed; the last complete checkpoint "
          f"({latest.name if latest else 'none'}) is kept", file=sys.stderr)
    return 1


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train (or resume) a run")
    p.add_argument("--config", help="YAML file with the differences from the defaults")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
    p.add_argument("--num-processes", type=positive, default=1, help="processes per machine")
    p.add_argument("--num-machines", type=positive, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--main-process-ip", default=None)
    p.add_argument("--main-process-port", type=int, default=None, help="default: a free port (one machine), 29500")
    p.add_argument("--accelerate-config", default=None,
                   help="an accelerate config file (deploy/accelerate/*.yaml) setting processes and machines")
    p.add_argument("--wait", type=wait_seconds, default=0.0, metavar="SECONDS", help=WAIT_HELP.format("run folder"))
    p.set_defaults(func=cmd_train)

"""``grpo serve --cron "..."``: scheduled retraining against a Prefect server."""

from __future__ import annotations

import argparse
import os
import sys

from flows.commands import add_params_arguments, prepare, quiet_loggers

DESCRIPTION = """\
Serve the retrain flow as a Prefect deployment on a cron schedule: this process registers the
deployment with the Prefect server at PREFECT_API_URL and runs every scheduled (or manually
triggered) run until you stop it (Ctrl-C; the deployment is then paused). Each run re-reads
the params file, so edit params.yaml between runs to change what the next one does.

Start a server first (once, in another terminal):
  prefect server start --host 127.0.0.1 --port 4200
  export PREFECT_API_URL=http://127.0.0.1:4200/api
The UI at http://127.0.0.1:4200 shows the schedule and every run. To run on workers instead of
this process, use the prefect.yaml deployment (docs/pipeline.md).
"""

EPILOG = """\
examples:
  grpo serve --cron "0 3 * * 1"                       # Mondays 03:00 UTC
  grpo serve --cron "0 */6 * * *" --set data.source=globalopinionqa
  grpo serve --cron "30 2 * * *" --timezone Europe/Paris --name nightly
  prefect deployment run retrain/grpo-retrain         # trigger one run now (another terminal)
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="retrain on a cron schedule (Prefect deployment served by this process)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * 1"')
    parser.add_argument("--timezone", default="UTC", help="the schedule's time zone (default: UTC)")
    parser.add_argument(
        "--name", default="grpo-retrain", help="deployment name (default: %(default)s)"
    )
    add_params_arguments(parser, "")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from flows.params import load_configs, params_path
    from grpo.config import ConfigError

    root = prepare()
    os.environ["PREFECT_LOGGING_LEVEL"] = os.environ.get("GRPO_SERVE_LOG_LEVEL", "INFO")
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "grpo serve: error: PREFECT_API_URL is not set; start a server "
            "(prefect server start) and export PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2
    params_file = str(params_path(args.params, root))
    try:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=args.cron, timezone=args.timezone)
        except ValueError:  # pydantic's message is long; say it in one line
            raise ValueError(
                f"--cron {args.cron!r} / --timezone {args.timezone!r}: not a valid schedule"
            ) from None
        load_configs(params_file, args.overrides)  # fail now, not at 3 a.m.
    except (ConfigError, ValueError) as exc:
        print(f"grpo serve: error: {exc}", file=sys.stderr)
        return 2
    quiet_loggers()
    from flows.serve import serve

    try:
        serve(
            args.cron,
            params_file=params_file,
            overrides=args.overrides,
            root=str(root),
            name=args.name,
            timezone=args.timezone,
        )
    except KeyboardInterrupt:
        return 0
    return 0

"""Wall time of ``grpo run`` on the embedded defaults, split by stage, and the time spent outside
training (process start and imports, Prefect's local server, tracking, validation, DVC).

The run happens in a throw-away copy of the repository (tracked and untracked-but-not-ignored
files, committed into a fresh git repository so DVC and the git revision work there) with its own
``PREFECT_HOME`` and MLflow store, so the checkout's ``mlruns/`` and ``.prefect/`` are untouched.

Stage times come from Prefect's own task-run records (start and end of every task of the flow
run, read from the run's SQLite database after it finished); the outside-training time is the
wall time minus the time of the training task(s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks._common import machine_info
from grpo.io import write_json

REPO = Path(__file__).resolve().parents[1]
TARGET_OVERHEAD_S = 20.0
KINDS = {
    "cold": "first run in a fresh checkout: Prefect and MLflow build their databases",
    "warm": "second run in the same checkout, another training seed",
    "server": "third run, against a running `prefect server` (PREFECT_API_URL)",
}

EPILOG = """examples:
  python -m benchmarks.pipeline                     # a cold and a warm `grpo run` (~5-10 min)
  python -m benchmarks.pipeline --json outputs/bench/pipeline.json
  python -m benchmarks.pipeline --server   # + a run against a running Prefect server
  python -m benchmarks.pipeline --cold-only --set train.max_steps=20 --set train.epochs=0
  python -m benchmarks.pipeline --keep /tmp/pipeline-copy   # keep the copy to look at it
"""


def copy_repo(src: Path, dst: Path) -> None:
    """Copy the files git would see (tracked + untracked, not ignored) and commit them in ``dst``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=src,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        s = src / rel
        if not s.is_file():  # deleted in the work tree, or a submodule
            continue
        d = dst / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(s, d)
    env = _git_env()
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "--all"],  # a fresh repository in a temp folder, not the checkout
        ["git", "commit", "-q", "-m", "benchmark snapshot"],
    ):
        subprocess.run(cmd, cwd=dst, check=True, env=env, capture_output=True)


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@localhost",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@localhost",
    )
    return env


def run_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in list(env):
        if key.startswith(("MLFLOW_", "PREFECT_API")):
            env.pop(key)
    env.update(
        PREFECT_HOME=str(copy / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        MLFLOW_TRACKING_URI=f"sqlite:///{copy}/mlruns/mlflow.db",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
        DVC_NO_ANALYTICS="1",
        GX_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _ts(value: Any) -> float | None:
    """A Prefect timestamp (ISO text in SQLite) → POSIX seconds."""
    if value is None:
        return None
    text = str(value).replace("Z", "+00:00")
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:  # Prefect stores UTC
        from datetime import timezone

        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def prefect_timings(prefect_home: Path, since: float = 0.0) -> dict[str, Any]:
    """Flow runs started after ``since`` (POSIX s) and their task runs (name, start, end,
    seconds), from the run's Prefect database."""
    db = prefect_home / "prefect.db"
    if not db.exists():
        return {"error": f"{db}: no Prefect database (did the flow run?)"}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        flows = con.execute(
            "SELECT id, name, start_time, end_time, state_type FROM flow_run "
            "WHERE start_time IS NOT NULL ORDER BY start_time"
        ).fetchall()
        tasks = con.execute(
            "SELECT flow_run_id, name, task_key, start_time, end_time, state_type FROM task_run "
            "WHERE start_time IS NOT NULL ORDER BY start_time"
        ).fetchall()
    finally:
        con.close()
    keep = {fid for fid, _, s, _, _ in flows if (_ts(s) or 0.0) >= since}
    flow_runs = [
        {"name": n, "start": _ts(s), "end": _ts(e), "state": st}
        for fid, n, s, e, st in flows
        if fid in keep
    ]
    task_runs = []
    for fid, name, key, s, e, st in tasks:
        if fid not in keep:
            continue
        start, end = _ts(s), _ts(e)
        task_runs.append(
            {
                "name": name,
                "task": (key or name).split(".")[-1].split("-")[0] if key else name,
                "start": start,
                "end": end,
                "seconds": (end - start) if start and end else None,
                "state": st,
            }
        )
    return {"flow_runs": flow_runs, "task_runs": task_runs}


def stage_name(task_run_name: str) -> str:
    """Prefect names task runs ``<task>-<3 hex>``; keep the task's name."""
    head, _, tail = task_run_name.rpartition("-")
    return (
        head
        if head and len(tail) == 3 and all(c in "0123456789abcdef" for c in tail)
        else task_run_name
    )


def optimizer_step_seconds(copy: Path) -> tuple[float, int] | None:
    """Σ ``train/step_time_s`` and the number of steps from the run's training history CSV."""
    import csv

    files = sorted(copy.glob("outputs/runs/*/train/history.csv"), key=lambda f: f.stat().st_mtime)
    if not files:
        return None
    total, steps = 0.0, 0
    with files[-1].open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            value = row.get("train/step_time_s")
            if value:
                total += float(value)
                steps += 1
    return total, steps


def import_seconds(copy: Path, env: dict[str, str]) -> float:
    """Wall time of a bare interpreter importing what ``grpo run`` imports before the flow."""
    code = "import flows.cli, flows.commands.run, flows.retrain, tasks.tracking, tasks.train"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def is_training(task_name: str, training_names: tuple[str, ...]) -> bool:
    name = task_name.lower()
    return any(t in name for t in training_names)


def analyse(
    wall_s: float,
    launch: float,
    exit_t: float,
    timings: dict[str, Any],
    training_names: tuple[str, ...],
) -> dict[str, Any]:
    """Per-stage seconds and the outside-training share of one run."""
    stages: list[dict[str, Any]] = []
    training_s = 0.0
    for t in timings.get("task_runs", []):
        if t["seconds"] is None:
            continue
        train = is_training(t["name"], training_names)
        stages.append(
            {
                "stage": stage_name(t["name"]),
                "seconds": round(t["seconds"], 3),
                "training": train,
                "state": t["state"],
            }
        )
        if train:
            training_s += t["seconds"]
    flows = timings.get("flow_runs", [])
    out: dict[str, Any] = {"wall_s": wall_s, "stages": stages}
    if flows and flows[0]["start"] and flows[-1]["end"]:
        first, last = flows[0]["start"], flows[-1]["end"]
        tasks_s = sum(s["seconds"] for s in stages)
        out["before_flow_s"] = first - launch  # interpreter, imports, Prefect's local server
        out["flow_s"] = last - first
        out["after_flow_s"] = exit_t - last  # summary, shutting the server down
        out["flow_outside_tasks_s"] = out["flow_s"] - tasks_s  # orchestration between tasks
    evaluate_s = sum(s["seconds"] for s in stages if s["stage"] == "evaluate")
    out["training_s"] = training_s
    out["evaluate_s"] = evaluate_s
    out["outside_training_s"] = wall_s - training_s
    out["outside_training_share"] = (wall_s - training_s) / wall_s if wall_s else float("nan")
    # orchestration, tracking, validation, DVC: neither training nor the model's evaluation
    out["overhead_s"] = wall_s - training_s - evaluate_s
    out["target_overhead_le_20s"] = out["overhead_s"] <= TARGET_OVERHEAD_S
    return out


def invoke(
    copy: Path,
    overrides: list[str],
    timeout: float,
    training_names: tuple[str, ...],
    api_url: str | None = None,
) -> dict[str, Any]:
    """One ``grpo run`` in ``copy``, timed and split by stage (the newest flow run's tasks)."""
    summary_path = copy.parent / f"summary-{time.monotonic_ns()}.json"
    cmd = [sys.executable, "-m", "flows.cli", "run", "--json", str(summary_path)]
    for o in overrides:
        cmd += ["--set", o]
    env = run_env(copy)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    launch = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    wall_s = time.perf_counter() - t0
    exit_t = time.time()
    if proc.returncode != 0:
        raise RuntimeError(
            f"`grpo run` failed (exit {proc.returncode}) in {copy}:\n"
            f"{(proc.stderr or proc.stdout)[-4000:]}"
        )
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    written = summary_path.stat().st_mtime if summary_path.exists() else None
    timings = prefect_timings(copy / ".prefect", since=launch)
    result = analyse(wall_s, launch, exit_t, timings, training_names)
    if written and "after_flow_s" in result:
        # after the summary is written: interpreter shutdown (Prefect's server and log/event
        # workers, MLflow) until the process has exited
        result["shutdown_s"] = exit_t - written
    steps = optimizer_step_seconds(copy)
    if steps:
        result["optimizer_steps_s"], result["optimizer_steps"] = steps
        # inside the train task but not optimizer steps: tokenizer, model, reference
        # log-probs, validation passes, per-step metric logging, checkpoints, saving
        result["train_task_besides_steps_s"] = result["training_s"] - steps[0]
    result["imports_s"] = import_seconds(copy, run_env(copy))
    if "before_flow_s" in result:
        # with a running server this is the client's connection and flow-run creation
        result["prefect_start_s"] = result["before_flow_s"] - result["imports_s"]
    result["prefect_api"] = api_url or "local server started by the process"
    result["command"] = " ".join(["grpo", "run", *[f"--set {o}" for o in overrides]])
    result["summary_keys"] = sorted(summary)
    return result


class PrefectServer:
    """``prefect server start`` on a free loopback port for the runs (stopped on exit)."""

    def __init__(self, copy: Path, timeout: float = 180.0) -> None:
        import socket
        import urllib.request

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = run_env(copy)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(self.port)],
            cwd=copy, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"prefect server did not come up on {self.url}")
            time.sleep(0.5)
        self.start_s = time.perf_counter() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_once(
    overrides: list[str],
    keep: Path | None,
    timeout: float,
    training_names: tuple[str, ...],
    warm: bool = True,
    server: bool = False,
) -> dict[str, dict[str, Any]]:
    """A fresh copy; ``cold``: the first ``grpo run`` there (Prefect and MLflow build their
    databases); ``warm``: a second one with another training seed (so the train and evaluate
    caches miss and it trains again), as a weekly retrain in an existing checkout would;
    ``server``: a third one against a running ``prefect server`` (no local server per process)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    copy = keep or tmp / "repo"
    if copy.exists():
        shutil.rmtree(copy)
    copy.mkdir(parents=True)
    try:
        copy_repo(REPO, copy)
        out = {"cold": invoke(copy, overrides, timeout, training_names)}
        if warm:
            out["warm"] = invoke(copy, [*overrides, "train.seed=1"], timeout, training_names)
        if server:
            srv = PrefectServer(copy)
            try:
                out["server"] = invoke(
                    copy, [*overrides, "train.seed=2"], timeout, training_names, api_url=srv.url
                )
                out["server"]["server_start_s"] = srv.start_s
            finally:
                srv.stop()
        return out
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def format_table(result: dict[str, Any]) -> str:
    lines = ["| stage | seconds | training? |", "|---|---|---|"]
    if "prefect_start_s" in result:
        lines.append(f"| start-up: interpreter and imports | {result['imports_s']:.1f} | no |")
        what = (
            "Prefect's local server"
            if result.get("prefect_api", "").startswith("local")
            else "Prefect client, flow run created on the running server"
        )
        lines.append(f"| start-up: {what} | {result['prefect_start_s']:.1f} | no |")
    for s in result["stages"]:
        lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {'yes' if s['training'] else 'no'} |")
    if "flow_outside_tasks_s" in result:
        lines.append(
            f"| between tasks (orchestration) | {result['flow_outside_tasks_s']:.1f} | no |"
        )
        if "shutdown_s" in result:
            lines.append(
                f"| after the flow: summary | {result['after_flow_s'] - result['shutdown_s']:.1f}"
                " | no |"
            )
            lines.append(
                f"| after the flow: process exit (Prefect, MLflow shutdown) "
                f"| {result['shutdown_s']:.1f} | no |"
            )
        else:
            lines.append(f"| after the flow (exit) | {result['after_flow_s']:.1f} | no |")
    lines.append(f"| **wall time** | **{result['wall_s']:.1f}** | |")
    if "optimizer_steps_s" in result:
        lines.append("")
        lines.append(
            f"inside the train task: {result['optimizer_steps']} optimizer steps "
            f"{result['optimizer_steps_s']:.1f} s; the rest (tokenizer, model, reference log-probs, "
            f"validation, per-step metric logging, checkpoints) "
            f"{result['train_task_besides_steps_s']:.1f} s"
        )
    lines.append("")
    lines.append(
        f"outside training: {result['outside_training_s']:.1f} s "
        f"({100 * result['outside_training_share']:.0f}% of the wall time), of which evaluation "
        f"{result['evaluate_s']:.1f} s; orchestration + tracking + validation + DVC: "
        f"{result['overhead_s']:.1f} s, target ≤ {TARGET_OVERHEAD_S:.0f} s: "
        f"{'met' if result['target_overhead_le_20s'] else 'MISSED'}"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--json", type=Path, help="write the result as JSON here")
    p.add_argument("--repeats", type=int, default=1, help="runs (the median is reported)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--training-tasks", default="train", help="task-name substrings that train")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.add_argument("--keep", type=Path, help="run in this folder and keep it")
    p.add_argument("--cold-only", action="store_true", help="skip the second (warm) run")
    p.add_argument(
        "--server", action="store_true", help="also run against a `prefect server` it starts"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    training_names = tuple(t.strip().lower() for t in args.training_tasks.split(",") if t.strip())
    runs: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": [], "server": []}
    for i in range(args.repeats):
        res = run_once(
            args.overrides, args.keep, args.timeout, training_names, not args.cold_only,
            args.server,
        )  # fmt: skip
        for kind, r in res.items():
            print(
                f"[{i + 1}/{args.repeats}] {kind}: wall {r['wall_s']:.1f} s, outside training "
                f"{r['outside_training_s']:.1f} s, overhead {r['overhead_s']:.1f} s",
                file=sys.stderr,
            )
            runs[kind].append(r)
    out: dict[str, Any] = {"machine": machine_info(), "target_overhead_s": TARGET_OVERHEAD_S}
    for kind, rs in runs.items():
        if not rs:
            continue
        rs.sort(key=lambda r: r["overhead_s"])
        mid = rs[len(rs) // 2]
        out[kind] = {"median_run": mid, "runs": rs}
        for key in ("wall_s", "training_s", "outside_training_s", "overhead_s", "evaluate_s"):
            out[f"{kind}_{key}"] = mid[key]
        print(f"\n{kind} run ({KINDS[kind]}):")
        print(format_table(mid))
    if args.json:
        write_json(args.json, out, sort_keys=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

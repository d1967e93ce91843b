"""The `epochd` command line.

The CLI never talks to the daemon over a socket: it reads event logs and writes files into the
spool, so every command but `serve` works while the daemon is down. Library errors become
`ClickException`s here, at the edge, with the exit codes below.
"""
import itertools
import logging
import os
import sys
import time
from contextlib import contextmanager
from enum import IntEnum
from pathlib import Path

import click
import orjson

from . import __version__, control, display, scheduler
from .errors import BadJobFile, DataError, EpochdError, JobNotFound, LogCorrupt, SpoolLocked
from .eventlog import LogFollower
from .fsutil import rename_noreplace
from .replay import RUNNABLE, TERMINAL, JobState, Status, apply
from .spool import (VALID_ID, Settings, Spool, daemon_serving, is_candidate, last_daemon_start,
                    live_worker, sanitise)

BUNDLED_SPOOL = Path(__file__).resolve().parent.parent / "spool"
POLL_SECONDS = 0.2
SLOW_PICKUP_SECONDS = 3  # submit --follow says it still waits after this; a daemon takes ~3 ms


class Exit(IntEnum):
    OK = 0
    ERROR = 1          # anything unexpected
    USAGE = 2          # bad arguments or a bad job file (click uses 2 for usage errors too)
    NOT_FOUND = 3      # no such job
    JOB_FAILED = 4     # `tail -f` / `submit --follow`: the job ended failed or cancelled
    REFUSED = 5        # the request makes no sense in the job's state
    LOCKED = 75        # another daemon serves the spool


class CliError(click.ClickException):
    def __init__(self, message: str, code: Exit = Exit.ERROR):
        super().__init__(message)
        self.exit_code = int(code)


def spool_option(f):
    return click.option(
        "--spool", type=click.Path(file_okay=False, path_type=Path), envvar="EPOCHD_SPOOL",
        default=BUNDLED_SPOOL, show_default="$EPOCHD_SPOOL, else the bundled spool/",
        help="The spool folder.")(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def require_spool(spool: Spool) -> None:
    """A --spool that names no spool is most likely a typo: say so, not "no jobs"."""
    if not spool.jobs.is_dir():
        raise CliError(f"{spool.jobs} does not exist, so {spool.root} is not a spool. Expected: a spool "
                       f"folder; check --spool (or $EPOCHD_SPOOL), or start the daemon once with "
                       f'"epochd serve --spool {spool.root}" to create it.', Exit.NOT_FOUND)


def not_accepted_yet(spool: Spool, job_id: str) -> bool:
    """The job's file waits in incoming/ for the daemon to take it."""
    return (bool(VALID_ID.match(job_id)) and not spool.events_path(job_id).exists()
            and spool.in_incoming(job_id))


def load_state(spool: Spool, job_id: str) -> JobState:
    require_spool(spool)
    if not VALID_ID.match(job_id) or not spool.events_path(job_id).exists():
        if not_accepted_yet(spool, job_id):
            why = unserved(spool) or "a running daemon takes it within seconds; try again then"
            raise CliError(f"job {job_id} is not accepted yet: incoming/{job_id}.json waits for "
                           f"the daemon. {why[0].upper()}{why[1:]}.", Exit.NOT_FOUND)
        raise CliError(str(JobNotFound(job_id, spool.root)), Exit.NOT_FOUND)
    try:
        return spool.state(job_id)
    except LogCorrupt as e:
        raise CliError(str(e)) from None


def echo_json(value) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="epochd")
def cli():
    """epochd trains PyTorch and TensorFlow models epoch by epoch from job files dropped into a spool.

    Every fact about a job is appended to jobs/<id>/events.jsonl; pause, resume and cancel are
    files dropped into control/. Run `epochd serve` (systemd does), then `epochd submit`.
    """


# ------------------------------------------------------------------ serve

def parse_gpus(value: str | None) -> list[int] | None:
    """--gpus "0,2" -> [0, 2], checked against the GPUs the driver reports."""
    if value is None:
        return None
    from .sysinfo import gpu_count
    if value.strip().lower() == "none":
        return []
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise click.BadParameter(f'got "{value}"; expected distinct GPU indices such as "0,1", '
                                 'or "none"', param_hint="--gpus")
    have = gpu_count()
    wrong = [int(p) for p in parts if int(p) >= have]
    if wrong:
        raise click.BadParameter(f"GPU(s) {wrong} do not exist: the driver reports {have} "
                                 f"(indices 0..{have - 1}). Run nvidia-smi -L to list them",
                                 param_hint="--gpus")
    return sorted(int(p) for p in parts)


@cli.command()
@spool_option
@click.option("--max-jobs", type=click.IntRange(1, 1024), default=None,
              help="Jobs trained at once. Default: one per GPU, or 1 without GPUs.")
@click.option("--gpus", default=None, metavar="LIST",
              help='GPUs to give jobs, as nvidia-smi numbers them: "0,1", or "none". '
                   "Default: every GPU the driver reports.")
@click.option("--allow-root", "allow_roots", multiple=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="A folder job files may read data from and write outputs to (repeatable). "
                   "Without any, jobs may use any path this user can.")
@click.option("--base-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where relative paths in job files start. Default: the spool's parent folder.")
@click.option("--max-retries", type=click.IntRange(0, 100), default=3, show_default=True,
              help="Worker crashes in a row before a job is failed.")
@click.option("--stop-timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Seconds workers get to checkpoint on shutdown before they are killed.")
@click.option("--rescan-seconds", type=click.FloatRange(0.1, 3600), default=2.0, show_default=True,
              help="Full rescan of incoming/ and control/ besides inotify.")
def serve(spool, max_jobs, gpus, allow_roots, base_dir, max_retries, stop_timeout, rescan_seconds):
    """Run the daemon in the foreground (systemd runs exactly this).

    \b
    Example:
      epochd serve --spool /var/lib/epochd/spool --allow-root /srv/data --max-jobs 2
    """
    from .supervisor import Daemon, Options
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Spool(spool)
    usable_spool(root)
    settings = serve_settings(root, base_dir, allow_roots)
    options = Options(max_jobs=max_jobs, gpus=parse_gpus(gpus), max_retries=max_retries,
                      stop_timeout=stop_timeout, rescan_seconds=rescan_seconds, settings=settings)
    try:
        sys.exit(Daemon(root, options).serve())
    except SpoolLocked as e:
        raise CliError(str(e), Exit.LOCKED) from None


# ------------------------------------------------------------------ submit

@cli.command()
@spool_option
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--name", help="Job id to ask for. Default: the file's name without .json (for "
                             "job.json, its folder's name; for standard input or a pipe, the job's name).")
@click.option("--follow", "-f", is_flag=True, help="Then follow the job, as `epochd tail -f`.")
@click.option("--no-path-check", is_flag=True,
              help="Submit even if a data file is not where the daemon will look for it now, "
                   "or its header lacks the job's columns (it will be right by the time the job "
                   "runs).")
def submit(spool, job_file, name, follow, no_path_check):
    """Check a job file and drop it into incoming/ the safe way (write, then rename).

    Relative paths in the file are resolved by the daemon against its base folder (the spool's
    parent unless `serve --base-dir` says otherwise), not against your current folder. Before
    dropping the file, submit resolves its paths as the daemon that last started on this spool
    does (its base folder and --allow-root folders, from daemon.jsonl) and refuses a file the
    daemon would reject, whose data files are not there, or whose headers show that the job
    would fail on them (a missing column, the wrong delimiter or encoding).

    JOB_FILE "-" reads the job from standard input; its id then comes from its "name".

    \b
    Examples:
      epochd submit examples/wine.json --follow
      epochd submit - < job.json
    """
    piped = str(job_file) == "-" or not job_file.is_file()
    no_tty_stdin(str(job_file), "a job file")
    with click.open_file(str(job_file), "rb") as f:
        data = f.read()
    if str(job_file) == "-":
        job_file = "standard input"
    from . import spec
    try:
        job = spec.validate(spec.parse_job_bytes(data))
    except BadJobFile as e:
        raise CliError(f"{job_file} is not a valid job file; nothing was submitted:\n  - "
                       + "\n  - ".join(e.errors), Exit.USAGE) from None
    root = Spool(spool)
    if not root.incoming.is_dir():
        raise CliError(f"{root.incoming} does not exist. Expected: a spool folder; start the daemon "
                       f'once with "epochd serve --spool {root.root}" to create it.', Exit.USAGE)
    problems = path_problems(root, job, check_data=not no_path_check)
    if problems:
        raise CliError(f"{job_file} would not run on this spool; nothing was submitted:\n  - "
                       + "\n  - ".join(problems), Exit.USAGE)
    earlier = error_reports(root)  # a rejection of this drop will be a report not among these
    job_id = drop_job(root, data, name or (sanitise(job.name or "job") if piped else default_stem(job_file)))
    click.echo(f"submitted {job_file} as incoming/{job_id}.json; job id {job_id} (once accepted)")
    for note in spec.ignored_settings(job):
        click.echo(f"note: {note}", err=True)
    note_shared_output(root, job)
    warn_if_unserved(root)
    if follow:
        sys.exit(follow_job(root, job_id, earlier_reports=earlier))


def default_stem(job_file: Path) -> str:
    """The id to ask for: the file's name without .json; for a file named job.json, its folder's
    name, as in experiments/lr-sweep/job.json, or a spool's jobs/<id>/job.json submitted again."""
    if job_file.name == "job.json":
        folder = job_file.absolute().parent.name
        return folder or "job"
    return job_file.stem


def usable_spool(spool: Spool) -> None:
    """Create the spool's folders, or say plainly why they cannot be: a --spool under a folder
    that does not exist, or that the service's user may not write (its first start under a new
    user or path), used to end in a traceback."""
    import getpass
    try:
        spool.ensure()
        for folder in (spool.root, spool.incoming, spool.control, spool.jobs, spool.rejected):
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied", str(folder))
    except OSError as e:
        raise CliError(f"cannot serve {spool.root}: {e.filename or spool.root}: {e.strerror or e}. "
                       f"Expected: a spool folder the user {getpass.getuser()} can create and write; "
                       "create it (mkdir -p, then chown to that user), or pass another --spool.") from None


def daemon_settings(spool: Spool) -> Settings:
    """The base folder and --allow-root folders of the daemon that last started on `spool` (its
    `started` line in daemon.jsonl); `serve`'s defaults when none has."""
    entry = last_daemon_start(spool)
    if entry and "base_dir" in entry:
        return Settings(base_dir=Path(entry["base_dir"]),
                        allow_roots=tuple(Path(r) for r in entry.get("allow_roots") or ()))
    return serve_settings(spool, None, ())


def serve_settings(spool: Spool, base_dir: Path | None, allow_roots) -> Settings:
    """`serve`'s settings from its options: relative paths start at the spool's parent unless
    --base-dir says otherwise."""
    return Settings(base_dir=Path(os.path.abspath(base_dir or spool.root.parent)),
                    allow_roots=tuple(Path(os.path.abspath(r)) for r in allow_roots))


def path_problems(spool: Spool, job, check_data: bool = True) -> list[str]:
    """What the daemon would say of the job's paths: outside its --allow-root folders, inside the
    spool, and (`check_data`) a data file that is not where it will look."""
    from . import spec
    settings = daemon_settings(spool)
    try:
        resolved = spec.normalise(job, job_id="submitted", base_dir=settings.base_dir,
                                  spool_root=spool.root, allow_roots=list(settings.allow_roots))
    except BadJobFile as e:
        return e.errors
    problems = []
    for key in ("train_data_path", "val_data_path"):
        given = getattr(job, key)
        if not check_data or given is None or os.path.exists(resolved[key]):
            continue
        problem = (f'"{key}" names no file where the daemon will look. Received: "{given}", which '
                   f"resolves to {resolved[key]}")
        if not os.path.isabs(os.path.expanduser(given)):
            problem += f" (relative paths start at the daemon's base folder, {settings.base_dir})"
        problem += ". Expected: an existing CSV or Parquet file."
        here = Path(os.path.abspath(os.path.expanduser(given)))
        if here.exists() and str(here) != resolved[key]:
            problem += f' It is at {here} from this folder: write "{here}" in the job file.'
        problems.append(problem + " (--no-path-check submits it anyway.)")
    if check_data and not problems:
        problems += header_problems(resolved)
    return problems


def note_shared_output(root: Spool, job) -> None:
    """On stderr: the unfinished jobs that write the output folder this job names, which it
    will wait for and then overwrite."""
    from . import spec
    if job.output_path is None:
        return
    settings = daemon_settings(root)
    try:
        output = spec.normalise(job, job_id="submitted", base_dir=settings.base_dir,
                                spool_root=root.root, allow_roots=list(settings.allow_roots))["output_path"]
    except BadJobFile:
        return
    holders = [f"{jid} ({other.status})" for jid, other in jobs_writing(root, output)
               if other.status not in TERMINAL]
    if holders:
        who = (f"job {holders[0]} writes" if len(holders) == 1
               else f"jobs {', '.join(holders)} write")
        click.echo(f"note: {who} the same output_path {output}: this job waits until "
                   f"{'it has' if len(holders) == 1 else 'they have'} ended, then writes its model "
                   "there in place of theirs. To keep both, give it another output_path (or none: "
                   "jobs/<id>/model/).", err=True)


def header_problems(resolved: dict) -> list[str]:
    """What the data files' headers show wrong with the job (a column it names that is not
    there, another encoding...): the error the job would fail with once the daemon read them.
    A file this user may not read (the daemon's may) is left to the daemon."""
    from engines.stream import header_features
    files = [resolved[key] for key in ("train_data_path", "val_data_path") if resolved[key]]
    if not all(os.access(f, os.R_OK) for f in files):
        return []
    try:
        header_features(resolved)
    except DataError as e:
        return [f"{e} (--no-path-check submits it anyway.)"]
    except OSError:
        pass
    return []


def drop_job(spool: Spool, data: bytes, stem: str) -> str:
    """Write to a dot-file, then rename it in (never over another file) under a name no job and
    no other drop uses, so the daemon's job id is the name we print."""
    base = stem if VALID_ID.match(stem) else sanitise(stem)
    tmp = spool.incoming / f".{base}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    try:
        for n in itertools.count(1):
            job_id = base if n == 1 else f"{base[:60]}-{n}"
            if (spool.jobs / job_id).exists():
                continue
            try:  # fails rather than overwrite
                rename_noreplace(tmp, spool.incoming / f"{job_id}.json")
                return job_id
            except FileExistsError:
                continue
    finally:
        tmp.unlink(missing_ok=True)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ status, history, tail

@cli.command()
@spool_option
@click.argument("job_id", required=False)
@json_option
def status(spool, job_id, as_json):
    """Show every job, or one job in detail.

    \b
    Examples:
      epochd status            (all jobs)
      epochd status wine --json
    """
    root = Spool(spool)
    if job_id:
        state = load_state(root, job_id)
        if as_json:
            worker = worker_of(root, state)
            holder = output_holder(root, state) if state.status in RUNNABLE and not worker else None
            return echo_json({**display.summary(state), "worker": worker,
                              "waits_for": None if holder is None else holder.job_id})
        return print_one(root, state)
    require_spool(root)
    states = []
    for jid in root.job_ids():
        try:
            states.append(root.state(jid))
        except LogCorrupt as e:
            states.append(JobState(job_id=jid, last_error={"error": "LogCorrupt", "message": str(e)}))
    if as_json:
        return echo_json([display.summary(s) for s in states])
    if not states:
        click.echo(f"no jobs in {root.root}")
    else:
        width = max(24, *(len(s.job_id or "") for s in states))  # ids run to 64 characters
        click.echo(f"{'JOB':<{width}} {'STATUS':<12} {'EPOCH':>9} {'LAST LOSS':>10} {'BEST':>18}  UPDATED")
        for s in states:
            click.echo(status_row(s, width))
    entries = [e for e in os.scandir(root.incoming) if e.is_file(follow_symlinks=False)]
    waiting = sorted(e.name for e in entries if is_candidate(e.name))
    if waiting:
        click.echo(f"not accepted yet, in incoming/: {some(waiting)}")
    # what the daemon never takes, as DESIGN says, and a user may not know: job.JSON, job.txt
    # (dotfiles and *.tmp are someone's writing in progress: not worth a word)
    ignored = sorted(e.name for e in entries if not is_candidate(e.name)
                     and not e.name.startswith(".") and not e.name.endswith(".tmp"))
    if ignored:
        click.echo(f"never taken, not named *.json, in incoming/: {some(ignored)} (a job file "
                   "must end in .json: rename it, or use epochd submit FILE)")
    if waiting or any(s.status in RUNNABLE | {Status.RUNNING} for s in states):
        warn_if_unserved(root)


def some(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def status_row(s: JobState, width: int = 24) -> str:
    epochs = (s.spec or {}).get("epochs", "?")
    last = s.history[-1] if s.history else {}
    loss = last.get("val_loss", last.get("train_loss"))
    best = (f"{s.best_saved['value']:.4f} (e{s.best_saved['epoch']})" if s.best_saved else "-")
    shown = s.status or "corrupt"
    return (f"{(s.job_id or '?'):<{width}} {shown:<12} {s.epochs_done:>4}/{epochs:<4} "
            f"{display.number(loss):>10} {best:>18}  {s.updated_at or '-'}")


def output_holder(root: Spool, s: JobState) -> JobState | None:
    """The job that keeps `s` from starting because it writes the same output folder (as the
    daemon's scheduler decides it), or None."""
    output = (s.spec or {}).get("output_path")
    if not output:
        return None
    others = {jid: other for jid, other in jobs_writing(root, output) if jid != s.job_id}
    running = {jid for jid, o in others.items() if worker_of(root, o)}
    holder = scheduler.output_holder(scheduler.entry(s), [scheduler.entry(o) for o in others.values()],
                                     running)
    return None if holder is None else others[holder.job_id]


def jobs_writing(root: Spool, output: str):
    """(job id, state) of each job whose output_path is `output` (the same folder, symlinks
    resolved). Only those are folded: the others' first record (job_accepted, with the spec)
    says enough."""
    output = scheduler.same_folder(output)
    for jid in root.job_ids():
        try:
            with open(root.events_path(jid), "rb") as f:
                accepted = orjson.loads(f.readline())
        except (OSError, orjson.JSONDecodeError):
            continue
        theirs = (accepted.get("spec") or {}).get("output_path")
        if theirs is None or scheduler.same_folder(theirs) != output:
            continue
        try:
            yield jid, root.state(jid)
        except (LogCorrupt, OSError):
            continue


def queued_hint(root: Spool, s: JobState) -> str:
    holder = output_holder(root, s)
    if holder is not None:
        until = (f'; it is paused: "epochd resume {holder.job_id}" or "epochd cancel '
                 f'{holder.job_id}" lets it end' if holder.status == Status.PAUSED else "")
        return (f"queued: waits for job {holder.job_id} ({holder.status}), which writes the same "
                f"output_path {s.spec['output_path']}: it starts once that job has ended, and its "
                f"outputs then replace that job's there{until}")
    started = last_daemon_start(root) or {}
    slots = f" (at most {started['max_jobs']} at once)" if started.get("max_jobs") else ""
    then = "continues" if s.status == Status.INTERRUPTED else "starts"
    hint = (f"queued: the daemon{slots} {then} it when a slot is free, higher priority first, "
            "then in order of arrival")
    if s.status == Status.INTERRUPTED and s.crashes and s.last_crash_at:
        after = scheduler.retry_delay_seconds(s.crashes)
        limit = (f"; one past {started['max_retries']} fails it" if "max_retries" in started else "")
        hint += (f", {after:.0f} s after its last crash at {s.last_crash_at} ({s.crashes} in a "
                 f"row{limit}; worker.log in its folder says why)")
    return hint


def worker_of(root: Spool, s: JobState) -> dict | None:
    """{"pid", "since"} of the job's worker while the daemon has one running for it."""
    if s.status not in RUNNABLE | {Status.RUNNING}:
        return None
    entry = live_worker(root, s.job_id)
    return {"pid": entry["pid"], "since": entry["ts"]} if entry else None


def starting_hint(s: JobState, worker: dict) -> str:
    """A queued or interrupted job whose worker runs but has not started its run: it loads,
    or, on several machines, waits for the others (which can take up to rdzv_timeout)."""
    dist = (s.spec or {}).get("distributed") or {}
    started = f"starting: its worker (pid {worker['pid']}) runs since {worker['since']}"
    if dist.get("nnodes", 1) > 1 or dist.get("workers"):
        where = (f"at the rendezvous {dist['rdzv_endpoint']}" if dist.get("rdzv_endpoint")
                 else f"({', '.join(dist.get('workers') or [])})")
        return (f"{started} and waits for the other machines {where}, as node "
                f"{dist.get('node_rank', 0)} of {dist.get('nnodes') or len(dist.get('workers') or [])}: "
                f"start the job on each of them. Without them for rdzv_timeout "
                f"({dist.get('rdzv_timeout', 900):g} s) it ends and the daemon starts it again; "
                f"worker.log in the job's folder says more")
    return f"{started}: the first step comes once it has read the data"


def print_one(root: Spool, s: JobState) -> None:
    spec = s.spec or {}
    why = f" ({s.stop_reason})" if s.status == Status.COMPLETED and s.stop_reason else ""
    click.echo(f"job {s.job_id}: {s.status}{why}  ({spec.get('name')})")
    # a completed job's position is past its last epoch: where it would go on, not where it is;
    # a job that never started a run has none yet
    where = "" if s.status == Status.COMPLETED or not s.steps_per_epoch else (
        f"  position: epoch {s.position[0]} step {s.position[1]}/{s.steps_per_epoch}")
    click.echo(f"  epochs: {s.epochs_done}/{spec.get('epochs')}{where}  attempts: {s.attempts}")
    progress = display.current_progress(s)
    if progress:
        click.echo(f"  now: {display.progress_line(progress, spec.get('epochs'))} "
                   f"(as of {s.updated_at})")
    if s.history:
        click.echo(f"  last: {display.metrics(s.history[-1])}")
    if s.best_saved:
        b = s.best_saved
        click.echo(f"  best: {b['monitor']} {b['value']:.4f} at epoch {b['epoch']} ({b['path']})")
    if s.last_checkpoint:
        click.echo(f"  checkpoint: {s.last_checkpoint['path']}")
    for note in (s.run or {}).get("notes") or ():
        click.echo(f"  note: {note}")
    if s.last_error:  # a job resumed after a failure keeps it on record: say it is past
        label = "error" if s.status in (Status.FAILED, None) else "earlier error (resumed since)"
        click.echo(f"  {label}: {s.last_error['error']}: {s.last_error['message']}")
        if s.last_error.get("traceback"):  # an unexpected error, not a known one like bad data
            click.echo(f'  traceback: "epochd status {s.job_id} --json" prints it (last_error); the '
                       "worker's own output is in worker.log in the job's folder")
    if s.outputs:
        click.echo(f"  outputs: {', '.join(f'{k}={v}' for k, v in s.outputs.items())}")
    hint = {Status.PAUSED: f'resume it with "epochd resume {s.job_id}"',
            Status.RUNNING: f'follow it with "epochd tail -f {s.job_id}"'}.get(s.status)
    if s.status in RUNNABLE:
        hint = unserved(root)
        if hint is None:
            worker = worker_of(root, s)
            hint = starting_hint(s, worker) if worker else queued_hint(root, s)
    if control.retryable_failure(s):
        hint = f'fix the cause, then "epochd resume {s.job_id}" continues from the last checkpoint'
    if hint:
        click.echo(f"  {hint}")


def no_epoch(state: JobState, job_id: str) -> str:
    """What to say of a job without a finished epoch: it may still get one, or it never will."""
    if state.status in TERMINAL:
        return (f"job {job_id} {state.status} before an epoch finished: "
                f'"epochd status {job_id}" says why')
    return f'no epoch has finished yet: "epochd tail -f {job_id}" follows the job'


@cli.command()
@spool_option
@click.argument("job_id")
@json_option
def history(spool, job_id, as_json):
    """Per-epoch metrics of a job (the seed's training_history shape with --json).

    \b
    Example:
      epochd history wine --json > history.json
    """
    state = load_state(Spool(spool), job_id)
    if as_json:
        return echo_json(state.training_history())
    # classification shows accuracy; regression, whose accuracy is null, its mae
    metric = "MAE" if any(h.get("train_mae") is not None for h in state.history) else "ACC"
    click.echo(f"{'EPOCH':>5} {'TRAIN_LOSS':>10} {'TRAIN_' + metric:>9} {'VAL_LOSS':>9} {'VAL_' + metric:>8} "
               f"{'LR':>9} {'SECONDS':>8}")
    if not state.history:
        return click.echo(f"({no_epoch(state, job_id)})")
    key = "mae" if metric == "MAE" else "accuracy"
    for h in state.history:
        acc, vacc = h.get(f"train_{key}"), h.get(f"val_{key}")
        click.echo(f"{h['epoch']:>5} {display.number(h['train_loss']):>10} {display.number(acc):>9} "
                   f"{display.number(h.get('val_loss')):>9} {display.number(vacc):>8} "
                   f"{h['learning_rate']:>9.3g} {h['time_per_epoch']:>8.2f}")


@cli.command()
@spool_option
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep following until the job ends.")
@click.option("--raw", is_flag=True, help="Print the event lines as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="Show checkpoint events too.")
@click.option("--lines", "-n", "last", type=click.IntRange(min=0), metavar="N",
              help="Of what the log already holds, print only the last N lines. Default: all of it.")
def tail(spool, job_id, follow, raw, verbose, last):
    """Print a job's events; with -f, follow them with a live progress line.

    With --follow it exits 0 when the job completes, 4 when it fails or is cancelled, 3 when
    its folder is removed.

    \b
    Examples:
      epochd tail -f wine
      epochd tail -n 5 -f wine   (the last five lines, then follow)
    """
    root = Spool(spool)
    state = load_state(root, job_id)
    if follow and state.status not in TERMINAL:
        warn_if_unserved(root)
    sys.exit(follow_job(root, job_id, follow=follow, raw=raw, verbose=verbose, last=last))


QUIET_TYPES = ("checkpoint_saved", "checkpoint_removed")


def follow_job(spool: Spool, job_id: str, follow: bool = True, raw: bool = False,
               earlier_reports: set[str] | None = None, verbose: bool = False,
               last: int | None = None) -> int:
    """Print the job's events (and follow them); with `earlier_reports` (the error reports in
    rejected/ before the job file was dropped), first wait for the daemon to take the file."""
    path = spool.events_path(job_id)
    if earlier_reports is not None and not wait_accepted(spool, job_id, earlier_reports):
        return Exit.USAGE
    # the events as they are; or lines for people, where only the latest progress shows
    follower = LogFollower(path, latest_progress_only=not raw)
    state, live = JobState(), sys.stdout.isatty() and not raw
    while True:
        records = follower.poll()
        for r in records:
            apply(state, r)  # the fold, as it goes: a failed job may yet be resumed and go on
        epochs = (state.spec or {}).get("epochs")
        texts, lines = [], 0  # (text, ends its line); how many end theirs
        for r in reversed(records):  # from the end: with --lines, only those lines are made
            text = render(r, epochs, raw, live, verbose)
            if text is None:
                continue
            if text[1]:  # whole lines; a live progress line (the last one read) ends none
                if last is not None and lines >= last:
                    break
                own = text[0].split("\n")  # an event's line may have notes below it
                if last is not None and lines + len(own) > last:
                    text = ("\n".join(own[len(own) - (last - lines):]), True)
                lines += len(own)
            texts.append(text)
        texts.reverse()
        last = None  # --lines is about what the log held at the start
        if texts:  # one write: a long log's story is tens of thousands of lines
            click.echo("".join(text + "\n" * ends for text, ends in texts), nl=False)
        if state.status in TERMINAL:
            return Exit.OK if state.status == Status.COMPLETED else Exit.JOB_FAILED
        if not follow:
            return Exit.OK
        if not records and state.status is not None and not path.exists():
            click.echo(("\n" if live else "") + f"job {job_id}: its log was removed (with its folder, "
                       f"{spool.job_dir(job_id)}); nothing more to follow.", err=True)
            return Exit.NOT_FOUND
        time.sleep(POLL_SECONDS)  # polling a file: the CLI has no socket to the daemon


def render(r: dict, epochs: int | None, raw: bool, live: bool, verbose: bool) -> tuple[str, bool] | None:
    """What `tail` prints for a record, and whether that ends the line (a live progress line is
    drawn over by the next); None for nothing."""
    if raw:
        return orjson.dumps(r).decode(), True
    if r["type"] == "progress":
        return ("\r" + display.progress_line(r, epochs) + "\033[K", False) if live else None
    if verbose or r["type"] not in QUIET_TYPES:
        line = display.event_line(r, epochs)
        if line:
            return ("\r\033[K" if live else "") + f"{r['ts'][11:19]} {line}", True
    return None


def error_reports(spool: Spool) -> set[str]:
    try:
        return {name for name in os.listdir(spool.rejected) if name.endswith(".error.json")}
    except FileNotFoundError:
        return set()


def rejection_of(spool: Spool, file_name: str, earlier: set[str]) -> dict | None:
    """The report of a rejection of incoming/<file_name> that is not among `earlier`: an older
    file of that name may have been rejected before (its report keeps the name, this one's gets
    another, <stem>-2.error.json)."""
    for name in sorted(error_reports(spool) - earlier):
        try:
            report = orjson.loads((spool.rejected / name).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue  # (written whole by the daemon; unreadable: not ours to judge)
        if report.get("file") == file_name and report.get("kind") == "job file":
            return report
    return None


def wait_accepted(spool: Spool, job_id: str, earlier: set[str]) -> bool:
    """After a submit: until the daemon accepts the file or rejects it (then show why)."""
    said_at = time.monotonic() + SLOW_PICKUP_SECONDS  # a serving daemon takes a file in milliseconds
    while not spool.events_path(job_id).exists():
        report = rejection_of(spool, f"{job_id}.json", earlier) \
            if not spool.in_incoming(job_id) else None
        if report is not None:
            click.echo(f"rejected: {'; '.join(report['errors'])}", err=True)
            return False
        if said_at is not None and time.monotonic() > said_at:
            why = unserved(spool)  # said at submit too; again here, once the wait is noticeable
            click.echo(f"still waiting for a daemon to take incoming/{job_id}.json"
                       + (f"; {why}" if why else ""), err=True)
            said_at = None
        time.sleep(POLL_SECONDS)
    return True


# ------------------------------------------------------------------ control

def request(spool: Path, job_id: str, action: str, reason: str | None) -> None:
    root = Spool(spool)
    require_spool(root)
    if not_accepted_yet(root, job_id):
        # the daemon holds a request for a job it has yet to take until it takes it
        control.drop(root, job_id, action, reason)
        click.echo(f"{action} requested for {job_id}, which waits in incoming/ to be accepted: "
                   f"it is carried out as soon as the daemon takes the job; follow with "
                   f"\"epochd tail -f {job_id}\"")
        warn_if_unserved(root)
        return
    state = load_state(root, job_id)
    decision = control.decide(state.status, action, control.retryable_failure(state))
    if decision.kind == "reject":
        raise CliError(refusal(root, job_id, state, action), Exit.REFUSED)
    if action == "resume" and state.status in (Status.PAUSED, Status.FAILED):
        from .datafiles import check
        problem = check(state)  # what its worker would fail on, said before it is queued
        if problem:
            raise CliError(f"job {job_id} was not resumed: {problem}", Exit.REFUSED)
    control.drop(root, job_id, action, reason)
    note = f" ({decision.why})" if decision.kind == "repeat" else ""
    click.echo(f"{action} requested for {job_id}{note}; follow with \"epochd tail -f {job_id}\"")
    warn_if_unserved(root)


def unserved(root: Spool) -> str | None:
    """What to say when no daemon serves the spool: files dropped there wait for one."""
    if daemon_serving(root) is not False:
        return None
    return (f'no daemon is serving {root.root}: nothing happens until one does ("epochd serve '
            f'--spool {root.root}", or "systemctl start epochd")')


def warn_if_unserved(root: Spool) -> None:
    why = unserved(root)
    if why:
        click.echo(f"note: {why}", err=True)


def control_command(action: str, doc: str):
    @cli.command(name=action, help=doc)
    @spool_option
    @click.argument("job_id")
    @click.option("--reason", help="Words kept in the job's log with the request.")
    def command(spool, job_id, reason):
        request(spool, job_id, action, reason)
    return command


control_command("pause", "Pause a job: it checkpoints within about a second and frees its "
                         "device.\n\n\b\nExample:\n  epochd pause wine --reason 'need the GPU'")
control_command("resume", "Queue a paused job again, or one that failed for a cause outside it "
                          "(a full disk, an I/O error, memory) once that is fixed; it continues "
                          "from the exact step it stopped at, or its last checkpoint."
                          "\n\n\b\nExample:\n  epochd resume wine")
control_command("cancel", "Cancel a running, queued or paused job.\n\n\b\nExample:\n  epochd cancel wine")


# ------------------------------------------------------------------ plot, predict

@cli.command()
@spool_option
@click.argument("job_id")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Picture to write: PNG, or SVG or PDF when its name ends so. "
                   "Default: ./<job-id>-learning-curves.png")
def plot(spool, job_id, output):
    """Draw a job's learning curves (loss, accuracy or mae, learning rate) to a PNG (or SVG, PDF).

    \b
    Examples:
      epochd plot wine -o wine.png
      epochd plot wine -o wine.svg
    """
    from .plot import FORMATS, plot_history
    output = output or Path(f"{job_id}-learning-curves.png")
    fmt = FORMATS.get(output.suffix.lower(), "png" if not output.suffix else None)
    if fmt is None:
        raise CliError(f'cannot draw "{output}": its name ends {output.suffix}. Expected: a name '
                       f"ending {', '.join(FORMATS)} (the picture's format follows it).", Exit.USAGE)
    writable_place(output)
    state = load_state(Spool(spool), job_id)
    if not state.history:
        raise CliError(f"{no_epoch(state, job_id)}; nothing to plot.", Exit.REFUSED)
    with written(output):
        plot_history(state.training_history(), output, (state.spec or {}).get("name", job_id),
                     state.best_saved, fmt)
    click.echo(f"wrote {output}")


@cli.command()
@spool_option
@click.argument("model")
@click.argument("data", required=False, type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--data", "data_option", type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              help="CSV or Parquet file with the feature columns (or give it after MODEL).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV to write. Default: standard output.")
@click.option("--best", is_flag=True, help="Use the best weights instead of the final ones; "
              "also works while the job runs, and after it was paused, cancelled or failed.")
@click.option("--delimiter", callback=lambda _c, _p, v: one_char(v),
              help='The CSV\'s field separator: one character, or "tab". Default: the job\'s '
                   "data.delimiter (as for --encoding and --decimal: DATA is read as the job read "
                   "its own).")
@click.option("--encoding", callback=lambda _c, _p, v: text_encoding(v),
              help='The CSV\'s text encoding, e.g. "cp1252" (Excel on Windows) or "latin-1".')
@click.option("--decimal", type=click.Choice([".", ","]), help="The numbers' decimal mark.")
@click.option("--keep", "-k", multiple=True, metavar="COLUMN",
              help="Copy this column of DATA into the output, before the predictions (an id to "
                   "join them on); repeatable.")
def predict(spool, model, data, data_option, output, best, delimiter, encoding, decimal, keep):
    """Apply a trained model to a table. MODEL is a job id or a folder with model.json; DATA
    a CSV or Parquet file with the feature columns, or "-" for standard input (a pipe works too).

    The model is rebuilt from model.json, preprocess.json and the weights file alone.

    \b
    Examples:
      epochd predict wine examples/data/wine.csv -o predictions.csv
      epochd predict wine - < new.csv > predictions.csv
      epochd predict wine new.csv --keep id -o predictions.csv
    """
    from .predict import predict_table
    if data and data_option:
        raise click.UsageError(f"got the data twice: {data} and --data {data_option}. Give one.")
    data_path = data or data_option
    if data_path is None:
        raise click.UsageError("no data to predict on. Expected: a CSV or Parquet file with the "
                               f"feature columns, e.g. epochd predict {model} new.csv")
    if output is not None:
        writable_place(output)
    folder = Path(model) if Path(model).is_dir() else model_folder(Spool(spool), model, best)
    given = {"delimiter": delimiter, "encoding": encoding, "decimal": decimal}
    with streamed_to_file(data_path) as (path, shown):
        try:
            table, notes = predict_table(folder, path, best=best, keep=keep,
                                         read={k: v for k, v in given.items() if v is not None})
        except EpochdError as e:
            raise CliError(str(e).replace(path, shown)) from None
        notes = [note.replace(path, shown) for note in notes]
    for note in notes:  # on stderr, so that the predictions on stdout stay a clean CSV
        click.echo(f"note: {note}", err=True)
    if output is None:
        click.echo(table.to_csv(index=False), nl=False)
    else:
        with written(output):
            table.to_csv(output, index=False)
        click.echo(f"wrote {len(table)} predictions to {output}")


@contextmanager
def written(output: Path):
    """The block writes `output` (-o): an OSError from it is the user's to fix, said as such."""
    try:
        yield
    except OSError as e:
        raise CliError(f'cannot write "{output}": {e.strerror or e}. Expected: a file this user '
                       "may write; choose another with -o.") from None


def writable_place(output: Path) -> None:
    """Refuse at once a file to write (-o) in a folder that does not exist: before the work."""
    if not output.absolute().parent.is_dir():
        raise CliError(f'cannot write "{output}": the folder {output.absolute().parent} does not '
                       "exist. Expected: a file in an existing folder; create the folder first.",
                       Exit.USAGE)


@contextmanager
def streamed_to_file(data_path: str):
    """(a file to read, the name to show for it): standard input ("-") or a pipe, as from
    `<(zcat new.csv.gz)`, is copied into a temporary file first, since the table is read more
    than once (its first bytes, to tell its format, then the whole). The copy keeps the name's
    suffix, which says how it is read (.parquet, .tsv, .gz)."""
    if data_path != "-" and Path(data_path).is_file():
        yield data_path, data_path
        return
    no_tty_stdin(data_path, "a table")
    import shutil
    import tempfile
    suffixes = "" if data_path == "-" else "".join(Path(data_path).suffixes)
    with tempfile.TemporaryDirectory(prefix="epochd-predict-") as tmp:
        copy = Path(tmp) / "data"
        with click.open_file(data_path, "rb") as source, open(copy, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
        if not suffixes:  # nothing names the format: its first bytes do
            with open(copy, "rb") as f:
                head = f.read(6)
            suffixes = next((s for magic, s in STREAM_MAGIC if head.startswith(magic)), ".csv")
        yield str(copy.rename(copy.with_name(f"data{suffixes}"))), \
            "standard input" if data_path == "-" else data_path


def no_tty_stdin(given: str, what: str) -> None:
    """"-" with nothing piped in would wait for typing, silently: said instead."""
    if given == "-" and sys.stdin.isatty():
        raise CliError(f'"-" reads {what} from standard input, but it is a terminal. Expected: '
                       f"{what} piped or redirected in (... | epochd ... -, or < FILE), or a file name.",
                       Exit.USAGE)


# a piped table with no name to tell its format: the bytes it begins with say
STREAM_MAGIC = ((b"PAR1", ".parquet"), (b"\x1f\x8b", ".csv.gz"), (b"BZh", ".csv.bz2"),
                (b"\xfd7zXZ", ".csv.xz"), (b"PK\x03\x04", ".zip"))


def refusal(spool: Spool, job_id: str, state: JobState, action: str) -> str:
    """Why a request makes no sense in the job's state, and, for a job that has ended, how to
    train it again: its file, kept byte for byte, submitted anew (under a new id)."""
    text = f"job {job_id} is {state.status}; nothing to {action}."
    if action != "resume" or state.status not in TERMINAL:
        return text
    if state.status == Status.FAILED:
        error = state.last_error or {}
        text = (f"job {job_id} failed ({error.get('error')}; \"epochd status {job_id}\" says why), "
                "for a cause that resuming cannot change; nothing to resume.")
        again = "Once the cause is fixed, train it again"
    else:
        again = "To train it again"
    return (f"{text} {again} from the start: epochd submit {spool.job_dir(job_id) / 'job.json'} "
            f"(its file as accepted; it gets a new id).")


def one_char(value: str | None) -> str | None:
    """A separator as given on a command line: one character, or a tab as "tab" or "\\t"."""
    if value is None:
        return None
    value = {"tab": "\t", "\\t": "\t"}.get(value.lower(), value)
    if len(value) != 1:
        raise click.BadParameter(f'expected one character, e.g. ";" or "tab". Received: {value!r}.')
    return value


def text_encoding(value: str | None) -> str | None:
    from .spec import text_encoding as known
    if value is None:
        return None
    try:
        return known(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def model_folder(spool: Spool, job_id: str, best: bool = False) -> Path:
    state = load_state(spool, job_id)
    if best and state.best_saved is not None:  # the best model so far, whatever the status
        return (spool.job_dir(job_id) / state.best_saved["path"]).parent
    if state.status != Status.COMPLETED:
        best_epoch = None if state.best_saved is None else state.best_saved["epoch"]
        if state.status in TERMINAL:
            what = ("it ended before any model was saved" if best_epoch is None else
                    f"it ended without a final model; --best uses its best (epoch {best_epoch})")
        elif best:
            what = ("its first best model is saved when its first epoch ends: wait for that "
                    f'("epochd tail -f {job_id}")')
        else:
            so_far = "" if best_epoch is None else f"; --best uses its best so far (epoch {best_epoch})"
            what = ("it has no final model yet: wait for it to complete "
                    f'("epochd tail -f {job_id}"){so_far}')
        raise CliError(f"job {job_id} is {state.status}; {what}.", Exit.REFUSED)
    return (spool.job_dir(job_id) / state.outputs["model_json"]).parent


def main() -> None:
    try:
        cli(prog_name="epochd")
    except PermissionError as e:  # a user outside the spool's group, or not logged in again since
        click.echo(f"Error: {permission_hint(e)}", err=True)
        sys.exit(Exit.ERROR)


def permission_hint(e: PermissionError) -> str:
    """What a refused read or write means for a spool shared through its group (README: "Running
    as a service"), and what to do: join the group, or run as the service's user."""
    import getpass
    import grp
    import pwd
    path = Path(e.filename or ".")
    user = getpass.getuser()
    text = f"permission denied: {path}. Expected: access to it for the user {user}"
    group = owner = place = None
    for place in (path, *path.parents):  # the deepest this user may look at
        try:
            info = os.stat(place)
        except OSError:
            continue
        try:
            group, owner = grp.getgrgid(info.st_gid).gr_name, pwd.getpwuid(info.st_uid).pw_name
        except KeyError:  # ids with no name here (a volume from another machine)
            pass
        break
    if group is None:
        return text + "."
    return (f"{text}; {place} belongs to the group {group}: join it (sudo usermod -aG {group} "
            f"{user}, then log in again; `id` lists your groups), or run the command as {owner} "
            f"(sudo -u {owner} epochd ...).")


if __name__ == "__main__":
    main()

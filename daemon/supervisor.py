"""The daemon: watch the spool, accept and reject, schedule, supervise workers.

`Daemon.serve()` is the `work()` loop: install handlers, recover, then `while` over a short
list of named steps (`tick`), teardown in `finally`. Signal handlers only count signals; the
loop acts on them. Each job runs in a fresh worker process (spawned with exec, not forked:
CUDA does not survive fork); a worker that dies without a final event gets `interrupted` on
its behalf and is retried with back-off up to `max_retries`, then `failed`.

The daemon writes a job's log only while it holds the job's lock, i.e. while no worker runs it.
It never imports torch or tensorflow.
"""
import importlib
import logging
import os
import select
import signal
import stat
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from . import __version__, control, faults, foldcache, scheduler
from .errors import BadJobFile, LogCorrupt, memory_limit_message
from .eventlog import EventLog
from .events import Failed, Interrupted
from .fsutil import adopted_zombies, session_processes
from .notify import Notifier
from .replay import RUNNABLE, TERMINAL, JobState, Status, fold
from .spool import (QUIET_SECONDS, Settings, Spool, accept, daemon_log, is_candidate, job_lock,
                    lock_spool, recover_acceptances, reject, shown_name)
from .sysinfo import gpu_count

log = logging.getLogger("epochd.daemon")

EXIT_LOCKED = 75
MEMORY_BACKSTOP = 1.25  # the daemon kills a worker past this multiple of limits.memory_mb
LINGER_SECONDS = 10.0   # how long the processes a worker leaves behind may finish before a kill
PYTHON = os.path.realpath(sys.executable)  # what workers and their ranks run


@dataclass
class Child:
    popen: subprocess.Popen
    log_file: IO
    gpus: tuple[int, ...]            # what CUDA_VISIBLE_DEVICES names, in nvidia-smi's numbers
    term_sent: bool = False
    memory_mb: float | None = None   # the job's limits.memory_mb
    killed_for: str | None = None    # why the daemon killed it, for the job's `failed` event

    def kill(self) -> None:
        """SIGKILL to the worker and every process of its session (its DDP ranks): the worker
        alone dying would leave rank 0 writing the job's log beside the daemon."""
        kill_session(self.popen.pid)
        self.popen.kill()


def kill_session(sid: int) -> None:
    """SIGKILL to each live process of worker session `sid`: those running epochd's Python."""
    for pid in session_processes(sid, PYTHON):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Options:
    max_jobs: int | None = None       # None: one per GPU, or 1 without GPUs
    gpus: list[int] | None = None     # the GPUs jobs may have; None: every one NVML reports
    max_retries: int = 3              # worker crashes in a row before the job is failed
    stop_timeout: float = 60.0        # seconds to let workers checkpoint on shutdown
    rescan_seconds: float = 2.0       # full rescan even when inotify says nothing
    settings: Settings = field(default_factory=lambda: Settings(Path.cwd()))


class Waker:
    """A self-pipe: signals (via set_wakeup_fd), watchdog's thread and SIGCHLD wake the loop."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        try:
            os.write(self.w, b"\0")
        except BlockingIOError:
            pass  # the pipe is full: the loop is awake anyway

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)

    def wait(self, timeout: float) -> None:
        ready, _, _ = select.select([self.r], [], [], max(0.0, timeout))
        if ready:
            try:
                while os.read(self.r, 4096):
                    pass
            except BlockingIOError:
                pass


MOVE_PAIRING_SECONDS = 0.02


def pair_moves_within(seconds: float) -> list[type]:
    """How long watchdog's inotify observer waits for the other half of a rename; the classes
    whose setting was changed.

    watchdog pairs a rename's two inotify events (out of one name, into another) into one move
    event. A rename out of a watched folder to one it does not watch has no second half, so it
    is held for the class attribute `delay`, 0.5 s, and every event of that folder queues
    behind it. Each job the daemon takes is such a rename (incoming/ to jobs/<id>/), so a file
    arriving within 0.5 s after the daemon took another waited out the rest. The kernel queues
    both halves of a rename together, so they are paired at once whatever the delay; a short
    one costs nothing but the pairing of a rename split across two reads, which then arrives as
    a move out (ignored) and a move in (taken, as any other). The attribute's home moved in
    watchdog 7 (InotifyBuffer before); both are set where they exist."""
    changed = []
    for module, name in (("watchdog.observers.inotify_move_event_grouper", "InotifyMoveEventGrouper"),
                         ("watchdog.observers.inotify_buffer", "InotifyBuffer")):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(getattr(cls, "delay", None), (int, float)):
            cls.delay = seconds
            changed.append(cls)
    return changed


class SpoolEvents(FileSystemEventHandler):
    """inotify, through watchdog: names that arrived complete, and a nudge to the loop."""

    def __init__(self, daemon: "Daemon"):
        self.daemon = daemon

    def on_any_event(self, event) -> None:
        if event.event_type == "moved":
            # within the folder, or in from elsewhere (no src_path); out of it (a file the daemon
            # claimed or rejected) has no dest_path
            if event.dest_path:
                self.daemon.arrived.add(os.path.basename(event.dest_path))
        elif event.event_type == "closed":
            self.daemon.arrived.add(os.path.basename(event.src_path))
        if event.event_type != "closed_no_write":  # our own reads are not news
            self.daemon.nudged = True
            self.daemon.waker.wake()


class Daemon:
    def __init__(self, spool: Spool, options: Options, notifier: Notifier | None = None):
        self.spool, self.options = spool, options
        self.notifier = notifier or Notifier()
        self.gpus = options.gpus if options.gpus is not None else list(range(gpu_count()))
        self.max_jobs = options.max_jobs or max(1, len(self.gpus))
        self.children: dict[str, Child] = {}
        self.orphans: dict[str, int | None] = {}    # job -> pid of a worker we did not start
        self.orphan_gpus: dict[str, tuple[int, ...]] = {}  # what their run_started recorded
        self.orphan_sessions: dict[str, int] = {}  # job -> the session its worker's processes are in
        self.lingering: dict[str, float] = {}  # job -> since when its worker's session outlives it
        # workers gone whose end could not be recorded yet (a full disk): retried every tick
        self.unsettled: dict[str, tuple[int | None, str | None]] = {}
        self.unwritable: set[str] = set()  # of those, the ones already reported
        self.last_disk_error = 0.0
        self.entries: dict[str, scheduler.Entry] = {}
        # job -> (why, its log's size and mtime then): out of every decision until the log changes
        self.quarantined: dict[str, tuple[str, tuple[int, int] | None]] = {}
        self.arrived: set[str] = set()              # names inotify saw renamed in or closed
        self.nudged = False                         # inotify saw something: scan now
        self.signals = 0
        self.stop_signal: str | None = None  # the first that came
        self.waker = Waker()
        self.stopping_since: float | None = None
        self.child_signalled = False  # SIGCHLD since the last reap of adopted orphans
        self.last_scan = 0.0
        self.last_watchdog = 0.0

    # ---------------------------------------------------------------- the loop

    def serve(self) -> int:
        faults.role = "daemon"
        self.spool.ensure()
        lock = lock_spool(self.spool)
        observer = None
        try:
            self.install_signal_handlers()
            observer = self.watch()
            self.startup()
            self.guarded_tick(time.time())
            self.notifier.ready(self.status_line())
            while not self.finished():
                self.waker.wait(self.wait_seconds(time.time()))
                self.guarded_tick(time.time())
        finally:
            if observer is not None:
                observer.stop()
            self.teardown()
            lock.release()
        return 0

    def guarded_tick(self, now: float) -> None:
        """A full or failing disk must not end the daemon: every step of a tick is safe to
        repeat, so say what happened (stderr: the spool's disk may be the full one) and go on."""
        try:
            self.tick(now)
        except OSError as e:
            if now - self.last_disk_error >= 60:
                log.error("cannot write to the spool (%s); still serving, retrying every tick", e)
                self.last_disk_error = now

    def tick(self, now: float) -> None:
        """One step of the loop; tests may call it directly with their own `now`."""
        self.enforce_memory_limits()
        freed = self.reap()
        if self.signals:
            self.stop_workers(now)
        else:
            # a job whose worker just ended may have a request waiting for it (a pause that came
            # while the worker waited for other machines): carry it out before a restart
            if freed or self.nudged or now - self.last_scan >= self.options.rescan_seconds:
                self.nudged = False
                self.recheck_quarantined()
                self.forget_removed()
                self.accept_incoming(now)
                self.handle_requests(now)
                self.last_scan = now
            self.start_jobs(now)
        self.ping_watchdog(now)

    def finished(self) -> bool:
        return bool(self.signals) and not self.children

    def wait_seconds(self, now: float) -> float:
        timeout = min(1.0, self.options.rescan_seconds)
        backoff = scheduler.next_wakeup(list(self.entries.values()), now)
        return min(timeout, backoff) if backoff is not None else timeout

    # ---------------------------------------------------------------- start and stop

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self.waker.w, warn_on_full_buffer=False)
        # SIGHUP too: `epochd serve` in a terminal that closes (an ssh session that drops) would
        # otherwise die at once, unrecorded, its workers left running unsupervised. It stops as
        # on SIGTERM, its jobs checkpointed and continued on the next start. There is nothing
        # to reload: all settings are serve's options, and the spool is rescanned every tick.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_stop_signal)
        signal.signal(signal.SIGCHLD, self.on_child_signal)  # wakes the loop too

    def on_stop_signal(self, signum, frame) -> None:
        self.signals += 1
        self.stop_signal = self.stop_signal or signal.Signals(signum).name

    def on_child_signal(self, signum, frame) -> None:
        self.child_signalled = True

    def watch(self) -> BaseObserver:
        if sys.platform.startswith("linux"):
            # full events: a file renamed in from another folder (`mv job.json incoming/`) is
            # reported as a move, not as a creation, so it is known complete and taken at once
            # rather than after QUIET_SECONDS
            from watchdog.observers.inotify import InotifyObserver
            if not pair_moves_within(MOVE_PAIRING_SECONDS):
                log.warning("this watchdog has no pairing delay where epochd looks for it: a file "
                            "moved into incoming/ within 0.5 s after the daemon took another may "
                            "wait out the rest")
            observer: BaseObserver = InotifyObserver(generate_full_events=True)
        else:
            observer = Observer()
        handler = SpoolEvents(self)
        observer.schedule(handler, str(self.spool.incoming), recursive=False)
        observer.schedule(handler, str(self.spool.control), recursive=False)
        observer.daemon = True
        observer.start()
        return observer

    def startup(self) -> None:
        settings = self.options.settings
        daemon_log(self.spool, "started", pid=os.getpid(), version=__version__,
                   max_jobs=self.max_jobs, max_retries=self.options.max_retries, gpus=self.gpus,
                   base_dir=str(settings.base_dir),
                   allow_roots=[str(r) for r in settings.allow_roots])
        if not settings.allow_roots:
            log.warning("no --allow-root given: job files may read and write anywhere this user can")
        if not settings.base_dir.is_dir():
            log.warning("the base folder %s (--base-dir, else the spool's parent) is not a folder: "
                        "relative paths in job files resolve under it, so no such job finds its data "
                        "(a typo, or a mount not there yet?)", settings.base_dir)
        for root in settings.allow_roots:
            if not root.is_dir():  # a typo, or a mount not there yet: say so now, not per job
                log.warning("--allow-root %s is not a folder: no job can read data or write "
                            "outputs under it until it is (a typo, or a mount not there yet?)", root)
        for job_id in recover_acceptances(self.spool, settings):
            log.info("job %s: acceptance finished after a crash", job_id)
        for job_id in self.spool.job_ids():
            self.recover_job(job_id)
        log.info("serving %s: %d jobs known, %d runnable, max %d at once", self.spool.root,
                 len(self.entries), len(self.runnable()), self.max_jobs)

    def recover_job(self, job_id: str) -> None:
        """A job left running with no live worker was interrupted by our crash; one whose lock
        is held still has its worker (it outlived us) and must not be started twice."""
        lock = job_lock(self.spool, job_id)
        if not self.spool.events_path(job_id).exists():
            return
        if not lock.acquire():
            state = self.fold_or_quarantine(job_id)
            running = state is not None and state.status == Status.RUNNING and state.run
            self.orphans[job_id] = state.run["pid"] if running else None
            if running:
                self.orphan_gpus[job_id] = tuple(state.run.get("gpus") or ())
                try:  # a DDP job's run_started names rank 0, in its launcher's session
                    self.orphan_sessions[job_id] = os.getsid(state.run["pid"])
                except OSError:
                    pass
            self.refresh(job_id)
            log.info("job %s: its worker outlived the last daemon; watching it", job_id)
            return
        with lock:
            state = self.fold_or_quarantine(job_id)
            if state is not None and (state.status == Status.RUNNING or state.pending_control):
                with EventLog(self.spool.events_path(job_id)) as events:
                    if state.status == Status.RUNNING:
                        events.append(Interrupted(reason="crash detected at startup",
                                                  epoch=state.position[0], step=state.position[1]))
                    self.carry_out_pending(events, job_id)
        self.refresh(job_id)

    def stop_workers(self, now: float) -> None:
        """First signal: ask every worker to checkpoint and stop. Past the timeout, or on a second
        signal, kill them: their jobs resume from the last checkpoint on the next start."""
        if self.stopping_since is None:
            self.stopping_since = now
            self.notifier.stopping(f"stopping: checkpointing {len(self.children)} jobs")
            daemon_log(self.spool, "stopping", running=sorted(self.children), signal=self.stop_signal)
            log.info("%s: stopping; checkpointing %d running jobs (a second signal kills them at once)",
                     self.stop_signal or "asked to stop", len(self.children))
        for child in self.children.values():
            if not child.term_sent:
                child.popen.send_signal(signal.SIGTERM)
                child.term_sent = True
        for job_id, pid in self.orphans.items():
            if pid:
                _signal_pid(pid, signal.SIGTERM)
        if self.signals > 1 or now - self.stopping_since > self.options.stop_timeout:
            for child in self.children.values():
                child.kill()
            for child in self.children.values():
                child.popen.wait()
            self.reap()

    def teardown(self) -> None:
        for child in self.children.values():  # only left after an exception in the loop
            child.kill()
            child.popen.wait()
        self.reap()
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            time.sleep(0.05)  # killed: what is left of their sessions ends in moments
            self.reap()
        daemon_log(self.spool, "stopped", pid=os.getpid())
        signal.set_wakeup_fd(-1)

    # ---------------------------------------------------------------- incoming job files

    def accept_incoming(self, now: float) -> None:
        # what inotify has said so far, taken before listing: a name it reports after the
        # listing waits in the next set, never lost between the two
        arrived, self.arrived = self.arrived, set()
        try:
            names = sorted(os.listdir(self.spool.incoming))
        except FileNotFoundError:
            return
        for name in names:
            if not is_candidate(name):
                continue
            path = self.spool.incoming / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            complete = name in arrived or now - st.st_mtime >= QUIET_SECONDS
            if complete or not stat.S_ISREG(st.st_mode):  # a link, FIFO... is rejected at once
                self.accept_one(name)

    def accept_one(self, name: str) -> None:
        try:
            job_id = accept(self.spool, name, self.options.settings)
        except BadJobFile as e:
            reject(self.spool, self.spool.incoming, name, e.errors)
            log.info("rejected %s: %s", shown_name(name), "; ".join(e.errors))
            return
        except FileNotFoundError:
            return  # taken away again before we got to it
        except Exception as e:  # the tick boundary: an internal error must not eat the file
            daemon_log(self.spool, "error", file=shown_name(name), error=repr(e), traceback=traceback.format_exc())
            reject(self.spool, self.spool.incoming, name,
                   [f"epochd could not process this file: {type(e).__name__}: {e}"],
                   what_next="this is an epochd bug; report it with daemon.jsonl, then drop the file again")
            return
        log.info("accepted %s as job %s", shown_name(name), job_id)
        self.refresh(job_id)

    # ---------------------------------------------------------------- control requests

    def handle_requests(self, now: float) -> None:
        requests, strays = control.scan(self.spool)
        for name in strays:
            self.reject_stray(name, now)
        for request in requests:
            if request.job_id in self.children or request.job_id in self.orphans:
                continue  # its worker consumes it between steps
            try:
                self.apply_request(request)
            except FileNotFoundError:
                continue
            except Exception as e:  # the tick boundary: record it, keep serving
                daemon_log(self.spool, "error", file=request.source, error=repr(e),
                           traceback=traceback.format_exc())

    def reject_stray(self, name: str, now: float) -> None:
        path = self.spool.control / name
        try:
            if now - path.lstat().st_mtime < QUIET_SECONDS:
                return
        except FileNotFoundError:
            return
        reject(self.spool, self.spool.control, name,
               [f'"{shown_name(name)}" is not a control request. Expected: <job-id>.pause, <job-id>.resume '
                "or <job-id>.cancel."], kind="control file",
               what_next='use "epochd pause|resume|cancel JOB", which names the file right')

    def apply_request(self, request: control.Request) -> None:
        job_id = request.job_id
        if job_id not in self.entries and job_id not in self.quarantined and self.spool.in_incoming(job_id):
            return  # its job file is still to be taken (quiet for 2 s first, say): so is this
        if job_id not in self.entries:
            why = (f"job {job_id} is quarantined: {self.quarantined[job_id][0]}" if job_id in self.quarantined
                   else f'there is no job "{job_id}" in this spool')
            reject(self.spool, self.spool.control, request.path.name, [why], kind="control file",
                   what_next='run "epochd status" to list the jobs')
            return
        lock = job_lock(self.spool, job_id)
        if not lock.acquire():
            return  # a worker we do not know yet holds it; it will consume the request
        try:
            with lock, EventLog(self.spool.events_path(job_id)) as events:
                state = fold(events.records)
                outcome = control.consume(self.spool, request, state.status, events.append,
                                          control.retryable_failure(state))
                if outcome and outcome[0].kind == "act":
                    events.append(control.idle_outcome(state, request.action, outcome[1]))
        except LogCorrupt as e:  # damaged since the daemon last read it: once, not every tick
            self.quarantine(job_id, e)
            reject(self.spool, self.spool.control, request.path.name,
                   [f"job {job_id} is quarantined: {e}"], kind="control file",
                   what_next=f'run "epochd status {job_id}"')
            return
        log.info("job %s: %s request %s", job_id, request.action, outcome[0].kind if outcome else "rejected")
        self.refresh(job_id)

    # ---------------------------------------------------------------- workers

    def runnable(self) -> list[scheduler.Entry]:
        """Jobs waiting to run (pending, interrupted) that no worker holds: not every job known,
        or each tick would look again at whether finished jobs fit this machine's GPUs."""
        busy = self.children.keys() | self.orphans.keys() | self.unsettled.keys()
        return [e for e in self.entries.values() if e.status in RUNNABLE and e.job_id not in busy]

    def start_jobs(self, now: float) -> None:
        free = self.max_jobs - len(self.children) - len(self.orphans)
        runnable = self.runnable()
        for e in runnable:
            why = scheduler.unmet(e, self.gpus)
            if why is not None:
                self.fail_unplaceable(e.job_id, why)
        busy = {g for c in self.children.values() for g in c.gpus}
        busy.update(g for gpus in self.orphan_gpus.values() for g in gpus)
        if any(e.output for e in runnable):  # one writer per output folder
            working = self.children.keys() | self.orphans.keys() | self.unsettled.keys()
            known = list(self.entries.values())
            runnable = [e for e in runnable if scheduler.output_holder(e, known, working) is None]
        for job_id, gpus in scheduler.pick(runnable, free, now, self.gpus, busy):
            self.spawn(job_id, gpus)

    def fail_unplaceable(self, job_id: str, why: str) -> None:
        """A job asking for GPUs this daemon does not have would wait forever: it fails, with
        `retryable` so that a resume runs it once the daemon has them."""
        lock = job_lock(self.spool, job_id)
        if not lock.acquire():
            return
        try:
            with lock, EventLog(self.spool.events_path(job_id)) as events:
                state = fold(events.records)
                if state.status in RUNNABLE:
                    events.append(Failed(error="DeviceUnavailable", message=why, traceback=None,
                                         retryable=True))
                    log.warning("job %s: %s", job_id, why)
        except OSError as e:  # a full disk: the job stays queued, and this is tried next tick
            log.error("job %s: cannot record that it cannot be placed: %s", job_id, e)
            return
        self.refresh(job_id)

    def spawn(self, job_id: str, gpus: tuple[int, ...]) -> None:
        state = self.fold_or_quarantine(job_id)
        if state is None:
            return
        if state.status is None:  # no log: its folder was removed since the last scan
            return self.forget(job_id)
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   EPOCHD_CPU_SHARE=str(max(1, (os.cpu_count() or 1) // self.max_jobs)),
                   EPOCHD_ALLOW_ROOTS=os.pathsep.join(map(str, self.options.settings.allow_roots)))
        if self.gpus or self.options.gpus is not None:
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # nvidia-smi's numbers, not CUDA's own order
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))  # "": none for a CPU job
        log_file = open(self.spool.job_dir(job_id) / "worker.log", "ab")
        popen = subprocess.Popen(
            [sys.executable, "-m", "daemon.worker", "--spool", str(self.spool.root), "--job", job_id],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # a terminal's Ctrl-C reaches the daemon, which asks workers
        limits = state.spec.get("limits") or {}
        self.children[job_id] = Child(popen, log_file, gpus, memory_mb=limits.get("memory_mb"))
        self.entries[job_id] = scheduler.entry(state)
        daemon_log(self.spool, "worker_started", job_id=job_id, pid=popen.pid, gpus=list(gpus))
        where = f"GPU {','.join(map(str, gpus))}" if gpus else "CPU"
        log.info("job %s: %s on %s (worker pid %d)", job_id,
                 "resuming" if state.epochs_done or state.position != (1, 0) else "starting",
                 where, popen.pid)

    def enforce_memory_limits(self) -> None:
        """The backstop for limits.memory_mb: a worker checks its own memory between engine
        calls and stops at the limit; one that jumps past 1.25x of it (inside a call, or while
        it loads the data) is killed here, and its job fails with the numbers. The limit is
        each process's: a DDP job's ranks, which load the data, are measured one by one."""
        for child in self.children.values():
            if child.memory_mb is None or child.killed_for is not None:
                continue
            rss = 0.0
            for pid in {child.popen.pid, *session_processes(child.popen.pid, PYTHON)}:
                try:
                    rss = max(rss, psutil.Process(pid).memory_info().rss / 2**20)
                except psutil.Error:
                    continue
            if rss > MEMORY_BACKSTOP * child.memory_mb:
                child.killed_for = memory_limit_message(rss, child.memory_mb)
                child.kill()

    def reap(self) -> bool:
        """Settle the workers that have exited; True when a job's worker is gone."""
        freed = False
        if os.getpid() == 1 and self.child_signalled:
            self.reap_adopted()
        for job_id, child in list(self.children.items()):
            code = child.popen.poll()
            if code is None or self.session_lingers(job_id, child.popen.pid, code):
                continue
            del self.children[job_id]
            child.log_file.close()
            self.unsettled[job_id] = (code, child.killed_for)
        for job_id in list(self.orphans):
            if not self.spool.job_dir(job_id).is_dir():
                self.forget(job_id)
                continue
            lock = job_lock(self.spool, job_id)
            if lock.acquire():
                lock.release()
                sid = self.orphan_sessions.get(job_id)
                if sid is not None and self.session_lingers(job_id, sid, None):
                    continue
                del self.orphans[job_id]
                self.orphan_gpus.pop(job_id, None)
                self.orphan_sessions.pop(job_id, None)
                self.unsettled[job_id] = (None, None)
        for job_id, (code, killed_for) in list(self.unsettled.items()):
            try:
                self.settle(job_id, code, killed_for)
            except OSError as e:  # ENOSPC, EIO: the job waits, unscheduled, until it can be written
                if not self.spool.job_dir(job_id).is_dir():  # removed, with its worker's last words
                    self.forget(job_id)
                    freed = True
                    continue
                if job_id not in self.unwritable:
                    self.unwritable.add(job_id)
                    log.error("job %s: cannot record the end of its worker: %s; retrying every tick",
                              job_id, e)
                continue
            self.unsettled.pop(job_id, None)  # gone already when settling forgot the job
            self.unwritable.discard(job_id)
            freed = True
        return freed

    def reap_adopted(self) -> None:
        """As a container's PID 1 the daemon is every orphan's parent: the ranks a killed
        worker leaves behind end as its children, and stay zombies unless it reaps them."""
        self.child_signalled = False
        for pid in adopted_zombies({child.popen.pid for child in self.children.values()}):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def session_lingers(self, job_id: str, sid: int, code: int | None) -> bool:
        """Whether processes of an ended worker's session still run: when a DDP launcher dies
        its ranks get SIGINT (torch's parent-death signal), and rank 0 checkpoints and writes
        the job's log as it stops. The job is settled only once none is left, so that the
        daemon never writes that log beside it; past LINGER_SECONDS they are killed."""
        left = session_processes(sid, PYTHON)
        if not left:
            self.lingering.pop(job_id, None)
            return False
        now = time.monotonic()
        if job_id not in self.lingering:
            self.lingering[job_id] = now
            ended = f"with code {code}" if code is not None else "under an earlier daemon"
            log.info("job %s: its worker ended %s; waiting for its %d other processes to end "
                     "before recording it", job_id, ended, len(left))
        elif now - self.lingering[job_id] > LINGER_SECONDS:
            log.warning("job %s: %d processes of its worker still ran %.0f s after it ended; "
                        "killed them", job_id, len(left), LINGER_SECONDS)
            kill_session(sid)
            self.lingering[job_id] = float("inf")  # killed: wait for them, without killing again
        return True

    def settle(self, job_id: str, code: int | None, killed_for: str | None = None) -> None:
        """A worker is gone. If it left no final word, say on its behalf what happened."""
        daemon_log(self.spool, "worker_exited", job_id=job_id, code=code)
        if not self.spool.events_path(job_id).exists():  # removed (the folder, or what was left)
            self.forget(job_id)
            return
        if code == EXIT_LOCKED:  # another worker holds the job: watch that one instead
            self.orphans[job_id] = None
            return
        lock = job_lock(self.spool, job_id)
        if not lock.acquire():
            self.orphans[job_id] = None
            return
        with lock:
            state = self.fold_or_quarantine(job_id)
            if state is None:
                return
            # running: it died mid-run; runnable with an error code: it died before run_started
            limit_kill = bool(killed_for) and state.status in RUNNABLE | {Status.RUNNING}
            crashed = not limit_kill and (state.status == Status.RUNNING or (
                state.status in RUNNABLE and code not in (0, None)))
            if limit_kill or crashed or state.pending_control:
                with EventLog(self.spool.events_path(job_id)) as events:  # one read, one writer
                    if limit_kill:
                        self.record_limit_kill(events, job_id, state, killed_for)
                    elif crashed:
                        self.record_crash(events, job_id, state, code)
                    self.carry_out_pending(events, job_id)
        state = self.refresh(job_id)
        if state is not None:
            level, text = outcome(state)
            log.log(level, "job %s: %s", job_id, text)

    def carry_out_pending(self, events: EventLog, job_id: str) -> None:
        """A request went on record (`control_received`, accepted) but its process died before
        carrying it out: with no worker holding the job, the daemon does it now, so a pause,
        resume or cancel that was acknowledged is never lost. The caller holds the job's lock."""
        state = fold(events.records)  # with whatever the caller has just appended
        pending = state.pending_control
        if pending is None or state.status not in RUNNABLE | {Status.PAUSED}:
            return
        events.append(control.idle_outcome(state, pending["action"], pending.get("reason")))
        log.info("job %s: carried out the %s request its worker acknowledged before it died",
                 job_id, pending["action"])

    def record_limit_kill(self, events: EventLog, job_id: str, state, message: str) -> None:
        if state.status == Status.RUNNING:
            events.append(Interrupted(reason="killed by the daemon: over its memory limit",
                                      crash=False, epoch=state.position[0], step=state.position[1]))
        events.append(Failed(error="MemoryLimitExceeded", message=message, traceback=None,
                             retryable=False))
        log.warning("job %s: %s", job_id, message)

    def record_crash(self, events: EventLog, job_id: str, state, code: int | None) -> None:
        if code is None:
            reason, crash = "its worker ended while the daemon was away, without a final event", False
        elif self.stopping_since is not None:
            reason, crash = "worker stopped at shutdown before it could checkpoint", False
        elif code < 0:
            reason, crash = f"worker killed by signal {signal.Signals(-code).name}", True
        else:
            reason, crash = f"worker exited with code {code} without a final event", True
        events.append(Interrupted(reason=reason, crash=crash, epoch=state.position[0],
                                  step=state.position[1]))
        crashes = state.crashes + (1 if crash else 0)
        if crash and crashes > self.options.max_retries:
            events.append(Failed(
                error="WorkerCrashed", retryable=False, traceback=None,
                message=f"the worker died {crashes} times in a row without finishing an epoch "
                        f"(last: {reason}). See jobs/{job_id}/worker.log; fix the cause, then "
                        "submit the job again."))
        log.warning("job %s: %s", job_id, reason)

    # ---------------------------------------------------------------- bookkeeping

    def fold_or_quarantine(self, job_id: str):
        try:
            return foldcache.replay(self.spool.events_path(job_id))
        except LogCorrupt as e:
            self.quarantine(job_id, e)
            return None

    def quarantine(self, job_id: str, error: LogCorrupt) -> None:
        """Keep a job with a damaged log out of every decision until its log changes."""
        if self.quarantined.get(job_id, ("",))[0] != str(error):  # new, or damaged anew: said once each
            daemon_log(self.spool, "quarantined", job_id=job_id, error=str(error))
            log.error("job %s quarantined: %s", job_id, error)
        self.quarantined[job_id] = (str(error), self.log_mark(job_id))
        self.entries.pop(job_id, None)

    def log_mark(self, job_id: str) -> tuple[int, int] | None:
        try:
            st = self.spool.events_path(job_id).stat()
        except FileNotFoundError:
            return None
        return st.st_size, st.st_mtime_ns

    def recheck_quarantined(self) -> None:
        """A quarantined log that changed (restored from a backup, say) is read again: the job
        is back if it reads clean, and stays quarantined, with the new error, if not."""
        for job_id, (_, mark) in list(self.quarantined.items()):
            current = self.log_mark(job_id)
            if current == mark:
                continue
            if current is None:  # its folder or log was removed: the job is gone
                del self.quarantined[job_id]
                daemon_log(self.spool, "unquarantined", job_id=job_id, log="removed")
                continue
            state = self.refresh(job_id)  # still damaged: quarantined again, with the new mark
            if state is not None:
                del self.quarantined[job_id]
                daemon_log(self.spool, "unquarantined", job_id=job_id, log="reads clean",
                           status=str(state.status))
                log.info("job %s: its log reads clean again (%s); back in service", job_id, state.status)

    def forget_removed(self) -> None:
        """Jobs whose folder was removed or moved away are no longer the daemon's:
        that is how a user clears out finished jobs, or drops a queued one. Their entries go, so
        that they are never started or waited for. A running job's worker is killed (its log
        went with the folder: nothing it does from there on can be seen or resumed), and the job
        is forgotten once the worker has ended (`reap`)."""
        for job_id, child in self.children.items():
            if child.killed_for is None and not self.spool.job_dir(job_id).is_dir():
                log.warning("job %s: its folder was removed while it ran; killing its worker", job_id)
                child.killed_for = "its folder was removed"
                child.kill()
        try:  # one listing, not a stat per job: a spool may hold thousands of finished ones
            present = set(os.listdir(self.spool.jobs))
        except FileNotFoundError:
            present = set()
        busy = self.children.keys() | self.orphans.keys() | self.unsettled.keys()
        for job_id in [j for j in self.entries if j not in busy and j not in present]:
            self.forget(job_id)

    def forget(self, job_id: str) -> None:
        self.entries.pop(job_id, None)
        self.unsettled.pop(job_id, None)
        self.unwritable.discard(job_id)
        self.lingering.pop(job_id, None)
        for held in (self.orphans, self.orphan_gpus, self.orphan_sessions):
            held.pop(job_id, None)
        daemon_log(self.spool, "forgotten", job_id=job_id, why="its folder or log was removed")
        log.info("job %s: its folder was removed; forgotten", job_id)

    def refresh(self, job_id: str) -> JobState | None:
        state = self.fold_or_quarantine(job_id)
        if state is not None and state.status is not None:
            self.entries[job_id] = scheduler.entry(state)
            if state.status in TERMINAL and not control.retryable_failure(state) \
                    and job_id not in self.children and self.spool.drop_stream_cache(job_id):
                log.info("job %s: removed its streaming cache (%s)", job_id, state.status)
        return state

    def ping_watchdog(self, now: float) -> None:
        interval = self.notifier.watchdog_seconds
        if interval and now - self.last_watchdog >= interval:
            self.notifier.watchdog()
            self.notifier.status(self.status_line())
            self.last_watchdog = now

    def status_line(self) -> str:
        counts: dict[str, int] = {}
        for e in self.entries.values():
            counts[e.status] = counts.get(e.status, 0) + 1
        parts = [f"{n} {s}" for s, n in sorted(counts.items()) if s not in TERMINAL]
        return f"{len(self.children) + len(self.orphans)} running; " + (", ".join(parts) or "idle")


def outcome(state: JobState) -> tuple[int, str]:
    """How a job stands once its worker has gone, for the daemon's own log (the journal)."""
    match state.status:
        case Status.COMPLETED:
            best = state.best_saved
            text = f"completed after {state.epochs_done} epochs ({state.stop_reason})"
            if best:
                text += f"; best {best['monitor']} {best['value']:.4f} at epoch {best['epoch']}"
            return logging.INFO, text
        case Status.FAILED:
            e = state.last_error or {}
            then = (f'; fix the cause, then "epochd resume {state.job_id}"'
                    if control.retryable_failure(state) else "")
            return logging.WARNING, f"failed: {e.get('error')}: {e.get('message')}{then}"
        case Status.PAUSED | Status.CANCELLED:
            epoch, step = state.position
            return logging.INFO, f"{state.status} at epoch {epoch} step {step}"
    return logging.INFO, f"{state.status} after its worker exited"


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass

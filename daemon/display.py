"""Human-readable lines for events and job states (`epochd tail`, `status`, `history`)."""
from .replay import JobState, Status


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(round(value))
    if value < 60:
        return f"{value}s"
    if value < 3600:
        return f"{value // 60}m{value % 60:02d}s"
    return f"{value // 3600}h{value % 3600 // 60:02d}m"


def number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def metrics(h: dict) -> str:
    parts = [f"train_loss {number(h.get('train_loss'))}"]
    for key in ("train_accuracy", "train_mae"):
        if h.get(key) is not None:
            parts.append(f"{key.removeprefix('train_')} {number(h[key])}")
    if h.get("val_loss") is not None:
        parts.append(f"| val_loss {number(h['val_loss'])}")
        for key in ("val_accuracy", "val_mae", "val_r2"):
            if h.get(key) is not None:
                parts.append(f"{key.removeprefix('val_')} {number(h[key])}")
    return " ".join(parts)


def event_line(r: dict, epochs: int | None) -> str | None:
    """One line for an event; None for those not worth a line of their own (progress)."""
    of = f"/{epochs}" if epochs else ""
    match r["type"]:
        case "job_accepted":
            s = r["spec"]
            return (f"accepted {r['source_file'] or '(recovered)'} as {r['job_id']}: "
                    f"{s['framework']}, {s['algorithm_params']['model_type']}, {s['epochs']} epochs")
        case "run_started":
            resumed = r["resumed_from"]
            where = (f"resumed from epoch {resumed['epoch']} step {resumed['step']}" if resumed
                     else "from scratch")
            return "\n".join([
                f"run {r['attempt']} started on {', '.join(r['devices'])} (pid {r['pid']}), "
                f"{where}; {r['train_samples']} train / {r['val_samples']} val rows, {r['task']}",
                *(f"  note: {note}" for note in r.get("notes") or ())])
        case "epoch_completed":
            return (f"epoch {r['epoch']}{of}: {metrics(r)} | lr {r['learning_rate']:.3g} | "
                    f"{r['time_per_epoch']:.2f}s, {r['samples_per_sec']:,.0f} samples/s")
        case "checkpoint_saved":
            return f"checkpoint {r['path']} ({r['bytes'] / 1024:,.0f} KiB)"
        case "checkpoint_rejected":
            return f"checkpoint {r['path']} rejected: {r['reason']}"
        case "best_model_saved":
            return f"best model: {r['monitor']} {number(r['value'])} at epoch {r['epoch']}"
        case "lr_changed":
            return f"learning rate {r['from']:.3g} -> {r['to']:.3g} ({r['reason']})"
        case "early_stopped":
            return f"early stopped after epoch {r['epoch']}: {r['reason']}"
        case "control_received":
            why = f' "{r["reason"]}"' if r.get("reason") else ""
            return f"{r['action']} requested ({r['source_file']}){why}: {r['outcome']}"
        case "paused" | "resumed" | "cancelled":
            return f"{r['type']} at epoch {r['epoch']} step {r['step']}"
        case "interrupted":
            return f"interrupted: {r['reason']}"
        case "completed":
            best = r["best"]
            b = f"; best {best['monitor']} {number(best['value'])} at epoch {best['epoch']}" if best else ""
            return f"completed: {r['epochs_run']} epochs ({r['stop_reason']}){b}"
        case "failed":
            return f"failed: {r['error']}: {r['message']}"
        case "log_repaired":
            return f"log repaired: cut a torn tail of {r['truncated_bytes']} bytes"
    return None


def progress_line(r: dict, epochs: int | None, width: int = 24) -> str:
    done = r["step"] / max(1, r["steps_per_epoch"])
    bar = "#" * int(done * width) + "." * (width - int(done * width))
    of = f"/{epochs}" if epochs else ""
    return (f"epoch {r['epoch']}{of} [{bar}] {r['step']}/{r['steps_per_epoch']} loss "
            f"{number(r['loss'])} {r['samples_per_sec']:,.0f} samples/s eta {seconds(r['eta_seconds'])}")


def current_progress(state: JobState) -> dict | None:
    """The progress of the epoch a running job is in, if one is on record."""
    p = state.last_progress
    if state.status != Status.RUNNING or p is None or p["epoch"] != state.position[0]:
        return None
    return p


def summary(state: JobState) -> dict:
    """What `status --json` prints for a job: all of it comes from the fold."""
    spec = state.spec or {}
    last = state.history[-1] if state.history else None
    es = state.early_stopping()
    return {
        "job_id": state.job_id, "name": spec.get("name"), "status": state.status,
        "framework": spec.get("framework"), "epochs_done": state.epochs_done,
        "epochs": spec.get("epochs"), "position": {"epoch": state.position[0], "step": state.position[1],
                                                   "steps_per_epoch": state.steps_per_epoch},
        "progress": current_progress(state), "last_metrics": last, "best": state.best_saved,
        "early_stopping": None if es is None else {"wait": es.wait, "best_epoch": es.best_epoch,
                                                   "best_value": es.best_value},
        "learning_rate": state.learning_rate, "attempts": state.attempts, "crashes": state.crashes,
        "last_checkpoint": state.last_checkpoint, "last_error": state.last_error,
        "stop_reason": state.stop_reason, "outputs": state.outputs,
        "accepted_at": state.accepted_at, "updated_at": state.updated_at,
        "source_file": state.source_file, "priority": state.priority,
        "notes": list((state.run or {}).get("notes") or ()),
    }

"""The learning-curve picture: loss, accuracy (or mae) and learning rate per epoch."""
from pathlib import Path


FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}  # a file name's ending -> what is drawn


def plot_history(history: dict[str, list], path: Path, title: str, best: dict | None = None,
                 fmt: str = "png") -> Path:
    """Write a picture (`fmt`: one of FORMATS' values) of a `training_history` dict, with a dashed
    line at the best epoch (`best`: a `best_model_saved` payload) if given."""
    import matplotlib.pyplot as plt
    fig = figure(history, title, best)
    fig.savefig(path, dpi=100, format=fmt)  # by `fmt`, not by the name: a temp name has no suffix
    plt.close(fig)
    return path


def figure(history: dict[str, list], title: str, best: dict | None = None):
    """The picture's matplotlib figure. matplotlib is imported here only, and drawn with the Agg
    backend: a service has no screen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = history.get("epoch", [])
    quality = "accuracy" if any(v is not None for v in history.get("train_accuracy", [])) else "mae"
    panels = [("loss", ["train_loss", "val_loss"]), (quality, [f"train_{quality}", f"val_{quality}"]),
              ("learning rate", ["learning_rate"])]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (label, keys) in zip(axes, panels):
        for key in keys:
            values = history.get(key) or []
            points = [(e, v) for e, v in zip(epochs, values) if v is not None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 40 else None, label=key)
        if best and label != "learning rate" and ax.lines:
            ax.axvline(best["epoch"], color="grey", linestyle="--", linewidth=1,
                       label=f"best {best['monitor']} (epoch {best['epoch']})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no "1.2"
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if ax.lines and label != "learning rate":
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig

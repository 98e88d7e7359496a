"""What every dbrx-lab widget shares: the look, an error area, a status line with progress, figure panes,
and a background worker (so a Stop button stays clickable while the model runs).

A widget is a plain object whose `ui` (an ipywidgets box) is what a notebook shows; displaying the object
displays `ui`. Callbacks never raise into the kernel log (a "dead button"): every handler runs through
`_guard`, which puts the error in the widget's error area and keeps it in `last_error`.

Widgets share the model with the notebook's own cells without a lock of their own: hooks, interventions and
recorders belong to the thread (context) that attached them, so the interventions a widget's background
work attaches (AblationLab's ablated generation) apply to that work only, and cells and other widgets
running the same model meanwhile see none of them, and don't wait for it. (Calls on an
accelerate-dispatched model take turns by the model's own lock, one forward at a time.)
"""
from __future__ import annotations

import base64
import contextlib
import contextvars
import functools
import html
import io
import json
import os
import re
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from ..figures import MONO, expert_color, readable_token, text_color
from ..trace import run_with_trace

__all__ = ["LabWidget", "PromptTraceWidget", "FigurePane", "ClickableFigure", "prompt_input", "figure_bundle",
           "fit_width", "token_html", "expert_chip", "EXPORT_KINDS"]

# what the export bar writes: kind -> (file suffix, MIME type of the download link, button label)
EXPORT_KINDS = {"csv": (".csv", "text/csv", "CSV"),
                "parquet": (".parquet", "application/vnd.apache.parquet", "Parquet"),
                "trace": (".safetensors", "application/octet-stream", "Trace"), "html": (".html", "text/html", "HTML")}
# files up to this size also get a download link: a data: URI in the widget's state (kept small: the state
# travels to the browser and may be saved in the notebook; a standalone HTML page, ~4.7 MB, gets none)
DOWNLOAD_LIMIT = 2 << 20

ACCENT = "#2F3E55"
SELECTED = "#CA0020"          # outline of the selected cell / row in clickable figures
STYLE = f"""<style>
.dbrx-lab {{ font-family: Inter, 'Helvetica Neue', Arial, sans-serif; color: #222; }}
.dbrx-lab .dbrx-title {{ font-size: 16px; font-weight: 600; color: {ACCENT}; margin: 2px 0 0 0; }}
.dbrx-lab .dbrx-subtitle {{ font-size: 12px; color: #666; margin-bottom: 4px; }}
.dbrx-lab .dbrx-section {{ font-size: 12px; font-weight: 600; letter-spacing: .04em; text-transform: uppercase;
  color: #667; margin: 8px 0 2px 0; }}
.dbrx-lab .dbrx-card {{ border: 1px solid #E3E6EB; border-radius: 6px; padding: 8px 10px; background: #FCFCFD; }}
.dbrx-lab .dbrx-error-box {{ border-left: 4px solid #CA0020; background: #FDF1F1; color: #6B0012;
  padding: 6px 10px; border-radius: 4px; font-size: 13px; }}
.dbrx-lab .dbrx-error-box details {{ margin-top: 4px; }}
.dbrx-lab .dbrx-error-box pre {{ font-size: 11px; max-height: 220px; overflow: auto; white-space: pre-wrap; }}
.dbrx-lab .dbrx-status {{ font-size: 12px; color: #555; }}
.dbrx-lab .dbrx-text {{ font-family: {MONO}; font-size: 13px; line-height: 1.75; white-space: pre-wrap;
  word-break: break-word; min-height: 4.5em; max-height: 18em; overflow-y: auto; }}
.dbrx-lab .dbrx-text .prompt {{ color: #8A8F98; }}
.dbrx-lab .dbrx-text .same {{ color: #1E2530; }}
.dbrx-lab .dbrx-text .diff {{ background: #FDE9DE; color: #67001F; border-radius: 3px; }}
.dbrx-lab .dbrx-text .first {{ background: #F4A582; outline: 2px solid #CA0020; }}
.dbrx-lab .dbrx-text .cursor {{ color: {ACCENT}; animation: dbrx-blink 1s steps(2) infinite; }}
@keyframes dbrx-blink {{ to {{ visibility: hidden; }} }}
.dbrx-lab .dbrx-chip {{ display: inline-block; font-family: {MONO}; font-size: 11px; padding: 1px 4px;
  border-radius: 3px; margin-right: 2px; }}
.dbrx-lab table.dbrx-path {{ border-collapse: collapse; font-size: 12px; width: 100%; }}
.dbrx-lab table.dbrx-path td, .dbrx-lab table.dbrx-path th {{ padding: 2px 6px; border-bottom: 1px solid #EEF0F3;
  text-align: left; }}
.dbrx-lab table.dbrx-path th {{ color: #667; font-weight: 600; }}
.dbrx-lab .dbrx-bar {{ display: flex; height: 18px; min-width: 220px; border-radius: 3px; overflow: hidden; }}
.dbrx-lab .dbrx-bar span {{ font-family: {MONO}; font-size: 11px; line-height: 18px; text-align: center;
  overflow: hidden; white-space: nowrap; }}
.dbrx-lab .dbrx-grid .jupyter-button {{ margin: 1px; padding: 0; font-family: {MONO}; font-size: 11px;
  border-radius: 3px; }}
.dbrx-lab .dbrx-grid .dbrx-cell.mod-active {{ background: #CA0020 !important; color: white !important;
  box-shadow: inset 0 0 0 1px #67001F; }}
.dbrx-lab .dbrx-grid .dbrx-col.mod-active {{ background: #67001F !important; color: white !important; }}
.dbrx-lab .dbrx-grid .dbrx-rowlabel {{ font-family: {MONO}; font-size: 11px; color: #555; }}
.dbrx-lab .dbrx-attn-row span {{ display: inline-block; padding: 1px 2px; margin: 1px; border-radius: 3px;
  font-family: {MONO}; font-size: 13px; white-space: pre; }}
.dbrx-lab .widget-html-content {{ white-space: normal; }}
.dbrx-lab .dbrx-export .jupyter-button {{ font-size: 11px; height: 24px; padding: 0 8px; }}
.dbrx-lab .dbrx-export-note {{ font-size: 12px; color: #555; }}
</style>"""


def _size_text(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _write_new(target: Path, write: Callable[[Path], None]) -> Path:
    """Create the new file `target` atomically: write(tmp) fills a temporary name beside it, which is then
    hard-linked to `target` (fails with FileExistsError rather than replace anything) and removed."""
    from .. import checkpoint

    checkpoint.sweep_temps(target)
    tmp = checkpoint.temp_path(target)
    try:
        write(tmp)
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError:                               # no hard links here (some network / FUSE file systems)
            if target.exists():
                raise FileExistsError(f"{target} exists; nothing was overwritten") from None
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    checkpoint._fsync_dir(target.parent)
    return target


def prompt_input(text: str, chat: bool):
    """The prompt box's text as the model takes it: plain text, or one user message (chat template)."""
    return [{"role": "user", "content": text}] if chat else text


# --- small HTML pieces --------------------------------------------------------------------------------
def expert_chip(e: int, label: str | None = None) -> str:
    """An inline chip in expert e's colour."""
    c = expert_color(int(e))
    return (f'<span class="dbrx-chip" style="background:{c};color:{text_color(c)}">'
            f'{html.escape(label if label is not None else f"e{e}")}</span>')


def token_html(token: str, max_len: int = 24) -> str:
    return html.escape(readable_token(token, max_len))


def _error_html(err: BaseException, context: str) -> str:
    tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    what = f"{context}: " if context else ""
    return (f'<div class="dbrx-error-box"><b>{html.escape(what)}{html.escape(type(err).__name__)}</b>: '
            f'{html.escape(str(err))}<details><summary>traceback</summary><pre>{html.escape(tb)}</pre>'
            f'</details></div>')


# --- figures ----------------------------------------------------------------------------------------
def figure_bundle(fig: go.Figure) -> dict:
    """A display_data output that renders a plotly figure through JupyterLab's plotly mime renderer
    (JSON only: no plotly.js copy in the notebook)."""
    spec = json.loads(pio.to_json(fig, validate=False))
    title = fig.layout.title.text or "plotly figure"
    return {"output_type": "display_data", "metadata": {},
            "data": {"application/vnd.plotly.v1+json": {"data": spec.get("data", []), "layout": spec.get("layout", {}),
                                                         "config": {"displaylogo": False, "responsive": True}},
                     "text/plain": f"<Figure: {title}>"}}


FIT_WIDTH = 960      # px: about a JupyterLab output area; wider figures are narrowed to it (no clipped colorbar)


def fit_width(fig: go.Figure, max_width: int = FIT_WIDTH) -> go.Figure:
    """fig, or a copy at max_width when its fixed width is wider."""
    if fig.layout.width is not None and fig.layout.width > max_width:
        fig = go.Figure(fig)
        fig.layout.width = max_width
    return fig


class FigurePane:
    """A place for a static plotly figure (an ipywidgets.Output); safe to update from a worker thread.
    `figure` is the figure as the figures module made it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.figure: go.Figure | None = None
        self.widget = W.Output(layout=W.Layout(width="100%"))
        self.widget.add_class(f"dbrx-fig-{name}")

    def show(self, fig: go.Figure | None) -> None:
        self.figure = fig
        self.widget.outputs = () if fig is None else (figure_bundle(fit_width(fig)),)


class ClickableFigure:
    """A plotly FigureWidget (anywidget) whose content can be replaced; `on_click(trace_index, point)` is
    called for a click on any trace, with point = {"x", "y", "point_index"}."""

    def __init__(self, name: str, on_click: Callable[[int, dict], None]) -> None:
        self.name = name
        self.figure: go.Figure | None = None
        self._on_click = on_click
        self.widget = go.FigureWidget()
        self.widget.add_class(f"dbrx-fig-{name}")

    def show(self, fig: go.Figure, fit: bool = False) -> None:
        """Replace the content with fig's (fit: narrow a fixed width over FIT_WIDTH, see `fit_width`)."""
        self.figure = fig
        if fit:
            fig = fit_width(fig)
        fw = self.widget
        with fw.batch_update():
            fw.data = []
            fw.add_traces(list(fig.data))
            fw.layout = fig.layout
        for i, trace in enumerate(fw.data):
            trace.on_click(functools.partial(self._dispatch, i))

    def mark(self, *shapes: dict) -> None:
        """Draw selection shapes (plotly shape dicts) over the figure's own shapes, replacing earlier marks."""
        own = list(self.figure.layout.shapes) if self.figure is not None else []
        self.widget.layout.shapes = own + [go.layout.Shape(**s) for s in shapes]

    def _dispatch(self, index: int, trace, points, state) -> None:
        if not points.point_inds:
            return
        self._on_click(index, {"x": points.xs[0], "y": points.ys[0], "point_index": points.point_inds[0]})

    def click(self, trace_index: int, x, y) -> None:
        """Act as if (x, y) of a trace had been clicked in the browser (tests, keyboard fallbacks)."""
        self._on_click(trace_index, {"x": x, "y": y, "point_index": None})


def clicked_position(value) -> int:
    """The trace position a clicked point stands for: plotly sends the category label of a category axis
    ("token·position", see figures._position_labels) and the number of a numeric axis."""
    if isinstance(value, str):
        tail = value.rsplit("·", 1)[-1].strip()
        try:
            return int(tail) if "·" in value else int(round(float(tail)))
        except ValueError:
            raise ValueError(f"clicked point {value!r} names no position: expected a number or a "
                             f"'token·position' label") from None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"clicked point {value!r} names no position: expected a number or a 'token·position' label")
    if not np.isfinite(value):
        raise ValueError(f"clicked point {value!r} names no position: not a finite number")
    return int(round(float(value)))


# --- base widget --------------------------------------------------------------------------------------
class LabWidget:
    """Shared machinery. Subclasses build `self.ui` (via `_frame`) and call `_start(work)` for long work.

    background: run long work in a thread (the notebook stays responsive, Stop works); False runs it in
    the caller (tests, scripts). `wait()` blocks until the current work is done; `busy` tells if it runs.
    Background work runs in a fresh context: it sees no hook or intervention of the caller's `with` blocks,
    and the ones it attaches never reach the caller's calls (with background=False the work is one of the
    caller's calls, inside whatever blocks the caller is in).
    """

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self.last_error: BaseException | None = None
        self.error = W.HTML(layout=W.Layout(display="none", width="100%"))
        self.error.add_class("dbrx-error")
        self.status = W.HTML("")
        self.status.add_class("dbrx-status")
        self.progress = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="240px", display="none"))
        self.progress.add_class("dbrx-progress")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._quiet = 0
        self.ui: W.Box = W.VBox()

    # displaying the object shows its ui
    def _repr_mimebundle_(self, **kwargs):
        return self.ui._repr_mimebundle_(**kwargs)

    def _frame(self, title: str, subtitle: str, *children: W.Widget) -> W.VBox:
        head = W.HTML(f'{STYLE}<div class="dbrx-title">{html.escape(title)}</div>'
                      f'<div class="dbrx-subtitle">{subtitle}</div>')
        status_row = W.HBox([self.progress, self.status], layout=W.Layout(align_items="center"))
        box = W.VBox([head, *children, status_row, self.export_bar(), self.error], layout=W.Layout(width="100%"))
        box.add_class("dbrx-lab")
        return box

    # --- export ----------------------------------------------------------------------------------------
    def export_table(self):
        """The current view's data as a pandas DataFrame (subclasses; without one the CSV/Parquet buttons are
        hidden)."""
        raise NotImplementedError(f"{type(self).__name__} has no table to export")

    def export_figure(self):
        """The figure on show: by default the one of the widget's `pane` attribute, else of its first figure
        pane (FigurePane / ClickableFigure) that holds one; None when nothing is drawn."""
        panes = [v for v in vars(self).values() if isinstance(v, (FigurePane, ClickableFigure))]
        main = getattr(self, "pane", None)
        if isinstance(main, (FigurePane, ClickableFigure)):
            panes.insert(0, main)
        return next((p.figure for p in panes if p.figure is not None), None)

    def export_trace(self):
        """The Trace the widget shows (its `trace` attribute), or None."""
        return getattr(self, "trace", None)

    def _exportable(self) -> list[str]:
        """The export kinds this widget offers (a kind is offered when the class can produce it at all)."""
        kinds = ["html"]
        if type(self).export_table is not LabWidget.export_table:
            kinds[:0] = ["csv", "parquet"]
        # a trace: the widget keeps one (maybe set later, by Run), or its own export_trace gives one now
        if hasattr(self, "trace") or (type(self).export_trace is not LabWidget.export_trace
                                      and self._trace_now() is not False):
            kinds.insert(len(kinds) - 1, "trace")
        return kinds

    def _trace_now(self):
        """export_trace() while the widget is being built: False for "no trace"; a half-built widget whose
        export_trace fails yet is given the button (a click reports what is missing)."""
        try:
            return self.export_trace() is not None
        except Exception:  # noqa: BLE001 - decided again, with a clear error, on click
            return True

    def export_bar(self) -> W.HBox:
        """Buttons that write the current view's data (CSV, Parquet), trace and figure (standalone HTML) with
        `export`, and a note saying where the file went, with a download link (built once, then reused)."""
        if getattr(self, "_export_box", None) is not None:
            return self._export_box
        self.export_note = W.HTML("")
        self.export_note.add_class("dbrx-export-note")
        self.export_buttons: dict[str, W.Button] = {}
        for kind in self._exportable():
            label = EXPORT_KINDS[kind][2]
            tip = {"csv": "the current view's table as CSV", "parquet": "the current view's table as Parquet",
                   "trace": "the trace (Trace.save format; dbrx_lab.Trace.load reads it)",
                   "html": "the figure as a standalone HTML page (plotly.js inside, works offline)"}[kind]
            b = W.Button(description=label, icon="download", layout=W.Layout(width="auto"), tooltip=tip)
            b.add_class(f"dbrx-export-{kind}")
            b.on_click(self._guard(lambda _, k=kind: self._export_clicked(k), f"export {label}"))
            self.export_buttons[kind] = b
        box = W.HBox([W.HTML('<span class="dbrx-export-note">export&nbsp;</span>'), *self.export_buttons.values(),
                      self.export_note], layout=W.Layout(align_items="center", flex_flow="row wrap"))
        box.add_class("dbrx-export")
        self._export_box = box
        return box

    def _export_clicked(self, kind: str) -> None:
        self.clear_error()
        path = self.export(kind)
        size = path.stat().st_size
        link = ""
        if size <= DOWNLOAD_LIMIT:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            link = (f' · <a class="dbrx-export-link" download="{html.escape(path.name)}" '
                    f'href="data:{EXPORT_KINDS[kind][1]};base64,{data}">download</a>')
        self.export_note.value = (f'saved <code class="dbrx-export-path">{html.escape(str(path))}</code> '
                                  f'({_size_text(size)}){link}')

    def _export_name(self) -> str:
        """The stem of a default export file name: the widget, what it shows, the time."""
        what = getattr(self, "export_label", None)
        what = what() if callable(what) else what
        parts = [re.sub(r"(?<!^)(?=[A-Z])", "-", type(self).__name__).lower()]
        if what:
            parts.append(re.sub(r"[^A-Za-z0-9._-]+", "-", str(what)).strip("-")[:60])
        return "-".join(parts + [time.strftime("%Y%m%d-%H%M%S")])

    def export(self, kind: str, path: str | os.PathLike | None = None) -> Path:
        """Write what the widget shows to a new file and return its path.

        kind: "csv" / "parquet" (`export_table()`), "trace" (`export_trace()`, in Trace.save's format) or
        "html" (`export_figure()` as a standalone page, plotly.js included: opens offline). path: a new file
        (its suffix must fit the kind; none: added), a folder to put a new file in, or None: ./exports under
        the current directory (the notebook's). An existing file is never overwritten: a default name gets a
        numbered variant, an explicit existing path is refused. The file is written under a temporary name
        and linked into place (atomic), with the permissions the umask allows.
        """
        if kind not in EXPORT_KINDS:
            raise ValueError(f"kind must be one of {list(EXPORT_KINDS)}, got {kind!r}")
        suffix = EXPORT_KINDS[kind][0]
        write = self._export_writer(kind)
        if path is not None and not Path(path).is_dir():
            target = Path(path)
            if not target.suffix:
                target = target.with_suffix(suffix)
            elif target.suffix.lower() != suffix:
                raise ValueError(f"a {kind} export is a {suffix} file; {str(path)!r} ends in {target.suffix!r}")
            if target.exists() or target.is_symlink():
                raise FileExistsError(f"{target} exists; nothing was overwritten: give a new name or a folder")
            if not target.parent.is_dir():
                raise FileNotFoundError(f"no folder {target.parent} to export into")
            return _write_new(target, write)
        folder = Path.cwd() / "exports" if path is None else Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        stem = self._export_name()
        for n in range(1000):
            target = folder / f"{stem}{'' if n == 0 else f'-{n}'}{suffix}"
            if target.exists() or target.is_symlink():
                continue
            try:
                return _write_new(target, write)
            except FileExistsError:                   # made meanwhile by someone else: take the next name
                continue
        raise FileExistsError(f"no free file name for {stem}{suffix} in {folder}")

    def _export_writer(self, kind: str) -> Callable[[Path], None]:
        """A function that writes the export of `kind` into a new file (the content is computed now, so a
        missing table / trace / figure is reported before any file is made)."""
        from .. import checkpoint

        if kind in ("csv", "parquet"):
            table = self.export_table()
            if table is None:
                raise ValueError("nothing to export: the widget shows no table yet")
            if kind == "csv":
                data = table.to_csv(index=False).encode("utf-8")
            else:
                buf = io.BytesIO()
                table.to_parquet(buf, index=False)
                data = buf.getvalue()
        elif kind == "trace":
            trace = self.export_trace()
            if trace is None:
                raise ValueError("nothing to export: the widget has no trace yet (run a prompt first)")
            return lambda tmp: trace.save(tmp)
        else:
            fig = self.export_figure()
            if fig is None:
                raise ValueError("nothing to export: the widget shows no figure")
            data = fig.to_html(include_plotlyjs=True, full_html=True,
                               config={"displaylogo": False, "responsive": True}).encode("utf-8")
        return lambda tmp: checkpoint._write_file(tmp, lambda f: f.write(data))

    # --- errors and status ---------------------------------------------------------------------------
    def show_error(self, err: BaseException, context: str = "") -> None:
        self.last_error = err
        self.error.value = _error_html(err, context)
        self.error.layout.display = "block"

    def clear_error(self) -> None:
        self.last_error = None
        self.error.value = ""
        self.error.layout.display = "none"

    def set_status(self, text: str, progress: tuple[int, int] | None = None) -> None:
        """Status line (HTML); progress=(done, total) shows the bar, None hides it."""
        self.status.value = text
        if progress is None:
            self.progress.layout.display = "none"
        else:
            done, total = progress
            self.progress.max = max(int(total), 1)
            self.progress.value = min(int(done), self.progress.max)
            self.progress.layout.display = "flex"

    def _guard(self, fn: Callable, context: str = "") -> Callable:
        """fn wrapped so that an exception shows in the error area instead of vanishing in the kernel log."""
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - shown to the user, kept in last_error
                self.show_error(err, context)
                return None
        return wrapped

    def _observe(self, widget: W.Widget, fn: Callable[[Any], None], context: str, name: str = "value") -> None:
        """widget.observe(fn) guarded, and silent while the widget itself updates its controls (`_quietly`)."""
        guarded = self._guard(fn, context)
        widget.observe(lambda change: None if self._quiet else guarded(change), name)

    @contextlib.contextmanager
    def _quietly(self):
        """Set controls programmatically without triggering their observers."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    # --- background work -----------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start(self, work: Callable[[], None], context: str, on_exit: Callable[[], None] | None = None) -> None:
        """Run work() (in a thread when background); errors go to the error area; on_exit() always runs."""
        if self.busy:
            raise RuntimeError("still running: press Stop or wait for it to finish")
        self._stop.clear()

        def run() -> None:
            try:
                work()
            except Exception as err:  # noqa: BLE001
                self.show_error(err, context)
                self.set_status("")
            finally:
                if on_exit is not None:
                    self._guard(on_exit, context)()

        if self.background:
            # an empty context, whatever the Python version's default for new threads (3.14 can inherit one)
            self._thread = threading.Thread(target=contextvars.Context().run, args=(run,),
                                            name=f"dbrx-lab {type(self).__name__}", daemon=True)
            self._thread.start()
        else:
            run()

    def stop(self) -> None:
        """Ask the running work to stop after the current step."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> "LabWidget":
        """Block until the background work has finished (or timeout seconds passed); returns self."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self


class PromptTraceWidget(LabWidget):
    """A LabWidget with a prompt box, an "as chat" toggle and Run: Run traces the prompt with `record()`
    and shows the result with `set_trace` (subclasses define `record`, `set_trace` and `describe`)."""

    model: Any
    running_message = "running the model…"

    def _prompt_row(self, model, prompt: str, chat: bool, rows: int, placeholder: str = "") -> W.Widget:
        """Build `prompt`, `chat` and `run_button`; -> their row (an empty HTML when there is no model)."""
        self.prompt = W.Textarea(value=prompt, placeholder=placeholder, rows=rows,
                                 layout=W.Layout(flex="1 1 auto", width="auto"), disabled=model is None)
        self.chat = W.Checkbox(value=chat, description="as chat", indent=False, layout=W.Layout(width="80px"),
                               disabled=model is None)
        self.run_button = W.Button(description="Run", button_style="primary", icon="play",
                                   disabled=model is None, layout=W.Layout(width="90px"))
        self.run_button.add_class("dbrx-run")
        self.run_button.on_click(self._guard(lambda _: self.run(), "run"))
        return W.HBox([self.prompt, W.VBox([self.run_button, self.chat])]) if model is not None else W.HTML("")

    def record(self):
        raise NotImplementedError

    def set_trace(self, trace) -> None:
        raise NotImplementedError

    def describe(self, trace) -> str:
        """The status line after a run."""
        raise NotImplementedError

    def run(self) -> None:
        """Trace the prompt box's text (in the background when background=True)."""
        if self.model is None:
            raise ValueError("this explorer shows a given trace; pass model= to run prompts")
        self.clear_error()
        self.run_button.disabled = True
        self._start(self._run_now, "run", on_exit=lambda: setattr(self.run_button, "disabled", False))

    def _run_now(self) -> None:
        text = self.prompt.value
        if not text.strip():
            raise ValueError("the prompt is empty: type some text")
        self.set_status(self.running_message, (0, 1))
        _, trace = run_with_trace(self.model, prompt_input(text, self.chat.value), record=self.record())
        self.batch = 0
        self.set_trace(trace)
        self.set_status(self.describe(trace))

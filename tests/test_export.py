"""Issue #22 item 10: every LabWidget's export bar (CSV, Parquet, Trace, standalone HTML) and
`LabWidget.export(kind, path)`: new files only, atomic, umask permissions, download links; the dashboard's
and the card browser's tables and figures."""
from __future__ import annotations

import base64
import os
import re
import stat

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

import dbrx_lab
from dbrx_lab import Record, load_model
from dbrx_lab.checkpoint import current_umask
from dbrx_lab.widgets import ExpertUsageDashboard
from dbrx_lab.widgets import _base
from dbrx_lab.widgets._base import FigurePane, LabWidget

from test_dashboard_stats import synthetic


@pytest.fixture
def dash():
    return ExpertUsageDashboard(synthetic(n_texts=12, tokens=8, L=2).to_frame(), n_boot=50)


@pytest.fixture(scope="module")
def trace():
    model = load_model("tiny-vocab")
    return model.run_with_trace(["the cat sat", "def f(x): return x"], record=Record(router=True))[1]


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_each_kind_writes_what_the_view_shows(dash, tmp_path):
    dash.view.value = "specialization"
    table = dash.export_table()
    csv = dash.export("csv", tmp_path / "spec.csv")
    back = pd.read_csv(csv)
    assert list(back.columns) == list(table.columns) and len(back) == len(table)
    np.testing.assert_allclose(back["lift_lo"], table["lift_lo"], rtol=1e-9, equal_nan=True)
    pq = dash.export("parquet", tmp_path / "spec")                      # the suffix is added
    assert pq.name == "spec.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(pq), table.reset_index(drop=True), check_dtype=False)
    page = dash.export("html", tmp_path).read_text()                    # a folder: a new name inside it
    assert "<html>" in page[:100] and "Domain specialization" in page
    assert not re.search(r"<script[^>]+src=", page)                     # nothing fetched: plotly.js inline
    assert len(page) > 1_000_000 and "plotly.js" in page.lower()        # ~4 MB: the whole library
    for p in (csv, pq):
        assert mode_of(p) == 0o666 & ~current_umask()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporaries left


def test_default_folder_is_exports_under_the_cwd_and_names_never_collide(dash, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = dash.export("csv"), dash.export("csv")
    assert a.parent == b.parent == tmp_path / "exports" and a != b
    assert re.fullmatch(r"expert-usage-dashboard-usage-\d{8}-\d{6}(-\d+)?\.csv", b.name), b.name
    assert a.read_bytes() == b.read_bytes()


def test_an_existing_file_is_never_overwritten(dash, tmp_path):
    mine = tmp_path / "notes.csv"
    mine.write_text("my own notes")
    with pytest.raises(FileExistsError, match="nothing was overwritten"):
        dash.export("csv", mine)
    assert mine.read_text() == "my own notes"
    # a name taken between the check and the write (another process): the next free name is used
    real = _base._write_new
    calls = []

    def racing(target, write):
        if not calls:
            calls.append(target)
            target.write_text("someone else's")
        return real(target, write)

    folder = tmp_path / "out"
    folder.mkdir()
    orig = _base._write_new
    _base._write_new = racing
    try:
        path = dash.export("csv", folder)
    finally:
        _base._write_new = orig
    assert calls[0].read_text() == "someone else's" and path != calls[0] and path.read_text().startswith("layer")


@pytest.mark.parametrize("kind, path, error, match", [
    ("png", None, ValueError, r"kind must be one of \['csv', 'parquet', 'trace', 'html'\]"),
    ("csv", "table.parquet", ValueError, r"a csv export is a \.csv file"),
    ("csv", "no/such/folder/t.csv", FileNotFoundError, "no folder"),
])
def test_bad_export_requests_are_refused_clearly(dash, tmp_path, kind, path, error, match):
    with pytest.raises(error, match=match):
        dash.export(kind, None if path is None else tmp_path / path)
    assert not list(tmp_path.rglob("*.*"))


def test_buttons_write_and_link_the_file(dash, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert list(dash.export_buttons) == ["csv", "parquet", "html"]       # several traces: no Trace button
    dash.view.value = "coactivation"
    dash.export_buttons["csv"].click()
    assert dash.last_error is None, dash.error.value
    note = dash.export_note.value
    path = re.search(r'class="dbrx-export-path">([^<]+)<', note).group(1)
    uri = re.search(r'href="data:text/csv;base64,([^"]+)"', note).group(1)
    assert base64.b64decode(uri) == open(path, "rb").read() and "coactivation" in path
    monkeypatch.setattr(_base, "DOWNLOAD_LIMIT", 10)                    # big files: no data URI
    dash.export_buttons["html"].click()
    assert "saved" in dash.export_note.value and "download" not in dash.export_note.value


def test_trace_export_round_trips(trace, tmp_path):
    dash = ExpertUsageDashboard(trace, labels=["prose", "code"], n_boot=50)
    assert "trace" in dash.export_buttons
    path = dash.export("trace", tmp_path / "t")
    assert path.suffix == ".safetensors"
    back = dbrx_lab.Trace.load(path)
    assert back.tokens == trace.tokens and (back.topk_experts == trace.topk_experts).all()


class Bare(LabWidget):
    """A widget with one figure pane and nothing else to export."""

    def __init__(self) -> None:
        super().__init__(background=False)
        self.pane = FigurePane("bare")
        self.ui = self._frame("bare", "", self.pane.widget)


def test_defaults_hide_what_a_widget_cannot_export(tmp_path):
    w = Bare()
    assert list(w.export_buttons) == ["html"]
    with pytest.raises(NotImplementedError):
        w.export_table()
    w.export_buttons["html"].click()                                     # nothing drawn yet: a clear error
    assert "no figure" in str(w.last_error) and "dbrx-error-box" in w.error.value
    w.pane.show(go.Figure(go.Bar(y=[1, 2]), layout=dict(title="two bars")))
    assert w.export_figure() is w.pane.figure
    assert "two bars" in w.export("html", tmp_path / "bars.html").read_text()
    assert w.export_bar() is w.export_bar()                              # one bar per widget


def test_card_browser_exports_its_list_and_card_figure(tmp_path):
    from dbrx_lab.analysis import expert_cards
    from dbrx_lab.route_stats import route_stats
    from dbrx_lab.widgets import CardBrowser

    model = load_model("tiny-vocab")
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "the cat sat on the mat"}\n{"text": "def f(x): return x + 1"}\n')
    route_stats(model, data, tmp_path / "stats", min_count=1, predictions=False, progress=False)
    b = CardBrowser(expert_cards(tmp_path / "stats", model, layers=[0], n_contexts=2))
    assert list(b.export_buttons) == ["csv", "parquet", "html"]
    b.sort.value = "expert"
    listed = b.export_table()
    assert list(listed["card"]) == list(b.rows["card"]) and len(listed) == len(b.listing.options)
    back = pd.read_csv(b.export("csv", tmp_path / "cards.csv"))
    assert list(back["card"]) == list(listed["card"])
    assert b.export("parquet", tmp_path).name.startswith(f"card-browser-L{b.selected[0]}-e{b.selected[1]}-")
    if b.pane.figure is not None:                                        # a card with logit effects
        assert "<html>" in b.export("html", tmp_path).read_text()[:100]

"""RoutingExplorer and AttentionExplorer on long (chat) sequences: the span control crops what they show, and
export_table / export_figure give the current view (issue #22 items 7 and 10). Plain Python, tiny model."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from dbrx_lab import Record, figures, load_model
from dbrx_lab.widgets import AttentionExplorer, RoutingExplorer
from dbrx_lab.widgets._base import prompt_input

PROMPT = "def add(a, b):\n    return a + b"


@pytest.fixture(scope="module")
def model():
    from conftest import widen_

    return widen_(load_model("tiny-vocab"), std=0.3, seed=1)


@pytest.fixture(scope="module")
def chat_trace(model):
    """A chat prompt (default system prompt, then the user message): ~200 tokens, most of them system."""
    return model.run_with_trace(prompt_input("What is 2+2?", chat=True),
                                record=Record(router=True, attention=[0]))[1]


@pytest.fixture(scope="module")
def plain_trace(model):
    return model.run_with_trace(PROMPT, record=Record(router=True, attention=True))[1]


def shown_positions(ex: RoutingExplorer) -> list[int]:
    return [int(x) for x in ex.map.figure.data[0].x]


# --- RoutingExplorer -------------------------------------------------------------------------------------
def test_routing_explorer_opens_a_chat_on_the_user_message_and_reply(chat_trace):
    ex = RoutingExplorer(trace=chat_trace)
    start, stop = figures.chat_span(chat_trace)
    assert chat_trace.seq_len > 100 and stop - start < 30                   # the system prompt is most of it
    assert ex.span.mode.value == "chat" and ex.span.value == (start, stop)
    assert shown_positions(ex) == list(range(start, stop))
    assert [p for _, p in ex.token.options] == list(range(start, stop))
    assert ex.position == stop - 1 and ex.last_error is None
    assert 'data-position="%d"' % start in ex.text.value and 'data-position="0"' not in ex.text.value


def test_routing_explorer_span_modes_and_custom_range(chat_trace):
    ex = RoutingExplorer(trace=chat_trace)
    T = chat_trace.seq_len
    ex.span.mode.value = "all"                                              # what the dropdown does
    assert shown_positions(ex) == list(range(T)) and ex.span.range.layout.display == "none"
    assert ex.map.figure.layout.xaxis.rangeslider.visible                   # long: a window with a slider
    ex.select(3)
    ex.span.mode.value = "custom"
    assert ex.span.range.layout.display == "flex"
    ex.span.range.value = (10, 19)                                          # the slider: inclusive ends
    assert ex.span.value == (10, 20) and shown_positions(ex) == list(range(10, 20))
    assert ex.position == 19                                                # 3 is outside: the last shown
    ex.select(12)
    ex.span.range.value = (11, 30)
    assert ex.position == 12                                                # kept when still inside
    ex.set_span((0, 5))
    assert ex.span.mode.value == "custom" and shown_positions(ex) == [0, 1, 2, 3, 4]
    ex.set_span("chat")
    assert ex.span.value == figures.chat_span(chat_trace)
    ex.set_span(None)
    assert ex.span.value is None and len(shown_positions(ex)) == T
    with pytest.raises(ValueError, match=r"0 <= start < stop"):
        ex.set_span((9, 3))
    with pytest.raises(ValueError, match="span shown"):
        ex.set_span((0, 5))
        ex.select(7)


def test_routing_explorer_plain_prompt_has_no_chat_span(plain_trace):
    ex = RoutingExplorer(trace=plain_trace)
    assert [v for _, v in ex.span.mode.options] == ["all", "custom"] and ex.span.value is None
    with pytest.raises(ValueError, match="chat"):
        ex.set_span("chat")


def test_routing_explorer_export_table_is_the_routing_in_the_span(chat_trace):
    ex = RoutingExplorer(trace=chat_trace)
    start, stop = ex.span.value
    df = ex.export_table()
    L, k = chat_trace.topk_experts.shape[0], chat_trace.topk_experts.shape[-1]
    assert {"position", "token", "layer", "rank", "expert", "weight"} <= set(df.columns)
    assert len(df) == (stop - start) * L * k and sorted(df["position"].unique()) == list(range(start, stop))
    row = df[(df.position == start + 1) & (df.layer == 1) & (df["rank"] == 0)].iloc[0]
    assert row.expert == int(chat_trace.topk_experts[1, 0, start + 1, 0])
    assert row.weight == pytest.approx(float(chat_trace.topk_weights[1, 0, start + 1, 0]))
    assert row.token == chat_trace.tokens[0][start + 1]
    ex.set_span((0, 4))
    assert sorted(ex.export_table()["position"].unique()) == [0, 1, 2, 3]
    fig = ex.export_figure()
    assert isinstance(fig, go.Figure) and fig is ex.map.figure and list(fig.data[0].x) == [0, 1, 2, 3]


def test_routing_explorer_export_without_a_trace_says_so(model):
    ex = RoutingExplorer(model, prompt="   ", background=False)                 # empty prompt: no trace
    assert ex.trace is None and ex.export_figure() is None
    with pytest.raises(ValueError, match="nothing to export"):
        ex.export_table()


# --- AttentionExplorer -------------------------------------------------------------------------------------
def test_attention_explorer_span_crops_queries_and_keys(chat_trace):
    ex = AttentionExplorer(trace=chat_trace)
    start, stop = figures.chat_span(chat_trace)
    assert ex.span.value == (start, stop)
    labels = list(ex.pattern.figure.data[0].y)
    assert len(labels) == stop - start and labels[0].endswith(f"·{start}")
    assert [q for _, q in ex.token.options] == list(range(start, stop)) and ex.query == stop - 1
    assert all(len(t.y) == stop - start for t in ex.grid.figure.data)
    ex.select(query=start + 2)                                                # the row mark: category index 2
    shape = ex.pattern.widget.layout.shapes[-1]
    assert (shape.y0, shape.y1, shape.x0, shape.x1) == (1.5, 2.5, -0.5, 2.5)
    ex.span.mode.value = "all"
    assert len(ex.pattern.figure.data[0].y) == chat_trace.seq_len and ex.query == start + 2
    ex.span.mode.value = "custom"
    ex.span.range.value = (5, 9)
    assert [q for _, q in ex.token.options] == [5, 6, 7, 8, 9] and ex.query == 9


def test_attention_explorer_export_table_is_the_current_head(plain_trace):
    ex = AttentionExplorer(trace=plain_trace)
    ex.layer.value = 1
    ex.select(head=2)
    df = ex.export_table()
    T = plain_trace.seq_len
    assert list(df.columns[:2]) == ["layer", "head"] and {"query_pos", "key_pos", "weight"} <= set(df.columns)
    assert len(df) == T * (T + 1) // 2 and (df.key_pos <= df.query_pos).all()          # causal pairs only
    a = plain_trace.attention[1][0, 2].float().numpy()
    np.testing.assert_allclose(df["weight"], a[df["query_pos"], df["key_pos"]], rtol=1e-6)
    np.testing.assert_allclose(df.groupby("query_pos")["weight"].sum(), 1.0, rtol=1e-4)
    assert (df["layer"] == 1).all() and (df["head"] == 2).all()
    ex.set_span((2, 5))
    part = ex.export_table()
    assert sorted(part.query_pos.unique()) == [2, 3, 4] and part.key_pos.min() == 2
    assert ex.export_figure() is ex.pattern.figure and "head 2" in ex.export_figure().layout.title.text

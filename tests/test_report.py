"""The end-of-run summary table: one perplexity column per held-out text."""

from __future__ import annotations

from adaptprune.run.report import summary_table


def _row(stage: int, params: int, ppl: dict | None, tokens: int = 0, loss=None) -> dict:
    first = next(iter(ppl.values())) if ppl else None
    return {
        "stage": stage,
        "params": params,
        "ppl": first,
        "ppl_by_text": ppl or {},
        "train_tokens": tokens,
        "train_loss": loss,
        "prune_seconds": 1.25,
        "wall_seconds": 10.0,
    }


def test_summary_table_has_a_column_per_heldout_text():
    history = [
        _row(0, 1000, {"shakespeare": 17.378, "kjv": 18.024}),
        _row(1, 900, {"shakespeare": 19.0, "kjv": 30.5}, 512, 3.5),
    ]
    assert summary_table(history).splitlines() == [
        "| stage | params | ppl shakespeare | ppl kjv | train tokens | train loss | prune s | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| 0 | 1,000 | 17.38 | 18.02 | 0 | - | 1.2 | 10.0 |",
        "| 1 | 900 | 19.00 | 30.50 | 512 | 3.500 | 1.2 | 10.0 |",
    ]


def test_summary_table_without_evaluation_keeps_one_dash_column():
    lines = summary_table([_row(0, 1000, None)]).splitlines()
    assert lines[0] == "| stage | params | held-out ppl | train tokens | train loss | prune s | wall s |"
    assert lines[2] == "| 0 | 1,000 | - | 0 | - | 1.2 | 10.0 |"


def test_table_head_aligns_the_first_columns_left_and_the_rest_right():
    from adaptprune.run.report import table_head

    assert table_head(["method", "params", "ppl"]) == ["| method | params | ppl |", "|---|---:|---:|"]
    assert table_head(["a", "b", "c", "d"], left=3) == ["| a | b | c | d |", "|---|---|---|---:|"]

"""The data shipped in fastcells/data and its loaders."""
import numpy as np
import pandas as pd
import pytest

from fastcells.datasets import data_path, load_airline, load_electricity


def test_airline_values():
    df = load_airline()
    assert list(df.columns) == ["year", "month", "passengers"]
    assert len(df) == 144
    p = df["passengers"].tolist()
    assert p[:5] == [112, 118, 132, 129, 121]
    assert p[-5:] == [606, 508, 461, 390, 432]
    assert sum(p) == 40363
    assert df["year"].iloc[0] == 1949 and df["year"].iloc[-1] == 1960
    assert df["month"].tolist() == ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                                    "Dec"] * 12


def test_electricity_rows_and_no_gaps():
    df = load_electricity(repair_dst=False)
    assert list(df.columns) == ["ts", "y"]
    assert len(df) == 26304
    assert df["ts"].iloc[0] == pd.Timestamp("2012-01-01 00:00:00")
    assert df["ts"].iloc[-1] == pd.Timestamp("2014-12-31 23:00:00")
    steps = df["ts"].diff().iloc[1:]
    assert (steps == pd.Timedelta(hours=1)).all()
    assert df["y"].notna().all()
    assert df["y"].max() == pytest.approx(5578.158879, abs=1e-3)


def test_electricity_dst_repair():
    raw = load_electricity(repair_dst=False)
    fixed = load_electricity()
    changed = np.flatnonzero(raw["y"].to_numpy() != fixed["y"].to_numpy())
    # Exactly the three daylight-saving hours: 01:00 on the last Sunday of March.
    assert [str(raw["ts"].iloc[i]) for i in changed] == [
        "2012-03-25 01:00:00", "2013-03-31 01:00:00", "2014-03-30 01:00:00"]
    assert raw["y"].iloc[changed].round(2).tolist() == [54.15, 54.71, 5.85]
    y = fixed["y"].to_numpy()
    for i in changed:
        assert y[i] == pytest.approx(0.5 * (y[i - 1] + y[i + 1]))
    assert fixed["y"].min() > 900.0


def test_data_files_ship_with_provenance():
    text = data_path("README.md").read_text(encoding="utf-8")
    assert "Box, Jenkins" in text and "Monash" in text and "daylight-saving" in text

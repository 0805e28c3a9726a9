"""Loaders for the small public time series shipped in ``fastcells/data``.

The files are found next to this module (``Path(__file__)``), so they work from
an installed package and from a source checkout.

Provenance, licences and the cleaning applied are in ``fastcells/data/README.md``.
pandas is needed only by these loaders, so it is imported lazily.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["load_airline", "load_electricity", "data_path"]

_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


_DATA_DIR = Path(__file__).resolve().parent / "data"


def data_path(name: str) -> Path:
    """Return the path of the packaged data file ``name`` (in ``fastcells/data``)."""
    return _DATA_DIR / name


def _read_csv(name: str, **kwargs) -> "pd.DataFrame":
    import pandas as pd

    return pd.read_csv(data_path(name), **kwargs)


def load_airline() -> "pd.DataFrame":
    """Monthly international airline passengers (thousands), Jan 1949 - Dec 1960.

    Returns a DataFrame with 144 rows and columns ``year`` (int), ``month``
    (``"Jan"`` .. ``"Dec"``) and ``passengers`` (int), in time order: the layout
    of the ``flights.csv`` the seed tutorial reads.
    """
    df = _read_csv("flights.csv")
    if list(df.columns) != ["year", "month", "passengers"] or len(df) != 144:
        raise RuntimeError(f"flights.csv is damaged: columns {list(df.columns)}, {len(df)} rows")
    if list(df["month"].iloc[:12]) != _MONTHS:
        raise RuntimeError("flights.csv is damaged: months are not Jan..Dec")
    return df


def load_electricity(repair_dst: bool = True) -> "pd.DataFrame":
    """Hourly average electricity consumption (kW) of 321 clients, 2012-2014.

    Returns a DataFrame with 26,304 rows and columns ``ts`` (datetime64, hourly,
    no gaps) and ``y`` (float kW).

    ``repair_dst``: the hour at 01:00 on the last Sunday of March (the hour the
    clocks skip at the start of daylight-saving time) holds a near-zero value in
    the source each year. When True (default) those three values are replaced by
    the linear interpolation of 00:00 and 02:00 of the same day; when False the
    raw series is returned.
    """
    df = _read_csv("electricity_hourly.csv", parse_dates=["ts"])
    if list(df.columns) != ["ts", "y"]:
        raise RuntimeError(f"electricity_hourly.csv is damaged: columns {list(df.columns)}")
    if repair_dst:
        ts = df["ts"]
        # Last Sunday of March: a Sunday (day_of_week 6) in March on day 25..31.
        mask = (ts.dt.month == 3) & (ts.dt.day_of_week == 6) & (ts.dt.day >= 25) & (ts.dt.hour == 1)
        idx = mask.to_numpy().nonzero()[0]
        idx = idx[(idx > 0) & (idx < len(df) - 1)]
        y = df["y"].to_numpy(copy=True)
        y[idx] = 0.5 * (y[idx - 1] + y[idx + 1])
        df["y"] = y
    return df

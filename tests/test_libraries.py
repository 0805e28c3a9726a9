"""The real forecasting libraries under fastcells.patched(): models trained,
saved and reloaded the libraries' own ways run the fused op while patched and
torch.nn's own forward otherwise, with the same forecasts.

Optional: skipped unless gluonts, pytorch-forecasting and lightning are
installed (`pip install -c constraints.txt "gluonts[torch]==0.17.0"
pytorch-forecasting==1.4.0 lightning`); CI does not install them.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from conftest import needs_fastcells

pytestmark = needs_fastcells

gluonts = pytest.importorskip("gluonts", reason="optional: gluonts not installed")
pytorch_forecasting = pytest.importorskip("pytorch_forecasting",
                                          reason="optional: pytorch-forecasting not installed")
pl = pytest.importorskip("lightning.pytorch", reason="optional: lightning not installed")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        yield
        logging.disable(logging.NOTSET)


def _series(hours=24 * 60):
    from fastcells.datasets import load_electricity

    return load_electricity().iloc[:hours]


def _runs_fused(rnn) -> bool:
    import fastcells

    base = next(c for c in (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN) if isinstance(rnn, c))
    return base.forward is fastcells.patch._patched_forward


def test_gluonts_deepar_serialized_predictor(tmp_path):
    from pathlib import Path

    import fastcells
    from gluonts.dataset.pandas import PandasDataset
    from gluonts.model.predictor import Predictor
    from gluonts.torch.model.deepar import DeepAREstimator

    data = PandasDataset(_series().set_index("ts")[["y"]], target="y", freq="h")
    est = DeepAREstimator(freq="h", prediction_length=24, context_length=48, num_layers=2,
                          hidden_size=8, batch_size=8, num_batches_per_epoch=2,
                          trainer_kwargs=dict(max_epochs=1, enable_progress_bar=False,
                                              enable_model_summary=False, logger=False,
                                              default_root_dir=str(tmp_path / "trainer")))
    torch.manual_seed(0)
    with fastcells.patched():
        predictor = est.train(data)
        assert _runs_fused(predictor.prediction_net.model.rnn)
    predictor.serialize(Path(tmp_path))
    loaded = Predictor.deserialize(Path(tmp_path))
    rnn = loaded.prediction_net.model.rnn
    assert type(rnn) is torch.nn.LSTM and not _runs_fused(rnn)
    torch.manual_seed(1)
    stock = next(iter(loaded.predict(data, num_samples=20))).samples
    with fastcells.patched():
        assert _runs_fused(rnn)
        torch.manual_seed(1)
        fused = next(iter(loaded.predict(data, num_samples=20))).samples
    np.testing.assert_allclose(fused, stock, rtol=1e-3, atol=1e-2 * np.abs(stock).mean())


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_pytorch_forecasting_checkpoint_and_pickle(cell, tmp_path):
    import fastcells
    from pytorch_forecasting import TimeSeriesDataSet
    from pytorch_forecasting.models import RecurrentNetwork

    df = _series().reset_index(drop=True)
    df = df.assign(time_idx=np.arange(len(df)), series="all", y=df["y"].astype("float32"))
    ds = TimeSeriesDataSet(df, time_idx="time_idx", target="y", group_ids=["series"],
                           max_encoder_length=48, max_prediction_length=12,
                           time_varying_unknown_reals=["y"])
    dl = ds.to_dataloader(train=True, batch_size=8, num_workers=0)
    torch.manual_seed(0)
    with fastcells.patched():
        model = RecurrentNetwork.from_dataset(ds, cell_type=cell, hidden_size=8, rnn_layers=2)
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, enable_progress_bar=False,
                             enable_model_summary=False, logger=False, enable_checkpointing=False,
                             default_root_dir=str(tmp_path / "trainer"))
        trainer.fit(model, dl)
        assert _runs_fused(model.rnn)
        ckpt = tmp_path / "model.ckpt"
        trainer.save_checkpoint(str(ckpt))
        # The library's own RNN class pickles as it is (a trained RecurrentNetwork
        # itself holds a local class that torch.save cannot pickle, patched or not).
        torch.save(model.rnn, tmp_path / "rnn.pt")
    x, _ = next(iter(ds.to_dataloader(train=False, batch_size=4, num_workers=0)))
    # (weights_only=False: the checkpoint holds the library's own encoder objects)
    m = RecurrentNetwork.load_from_checkpoint(str(ckpt), weights_only=False)
    m.rnn = torch.load(tmp_path / "rnn.pt", weights_only=False)
    m.eval()  # (the RNN was saved in training mode, with its dropout on)
    assert type(m.rnn).__module__.startswith("pytorch_forecasting")  # the library's own class
    assert not _runs_fused(m.rnn)
    seq = torch.randn(4, 48, m.rnn.input_size)
    with torch.no_grad():
        stock, stock_rnn = m(x)["prediction"], m.rnn(seq)[0]
        with fastcells.patched():
            assert _runs_fused(m.rnn)
            fused, fused_rnn = m(x)["prediction"], m.rnn(seq)[0]
    # The RNN agrees to float32 rounding; the 12-step autoregressive forecast
    # (in kW, after the library's rescaling) carries that rounding through.
    torch.testing.assert_close(fused_rnn, stock_rnn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, stock, rtol=1e-3, atol=0.1)

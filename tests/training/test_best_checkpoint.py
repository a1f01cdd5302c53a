"""BestCheckpoint: the kept epoch among equal validation scores, through a real Trainer."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from captcha_lit.training.callbacks import BestCheckpoint


class ScriptedScores(L.LightningModule):
    """A tiny model whose validation reports the scores it is given, one (seq_acc, loss) per epoch."""

    def __init__(self, scores: list[tuple[float, float]]):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.scores = scores

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        seq_acc, loss = self.scores[self.current_epoch]
        self.log("val/seq_acc", seq_acc)
        self.log("val/loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, scores, max_epochs=None, ckpt_path=None, checkpoint_class=BestCheckpoint,
         **checkpoint_kwargs) -> BestCheckpoint:
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    best = checkpoint_class(dirpath=tmp_path / "checkpoints", filename="epoch{epoch:03d}", monitor="val/seq_acc",
                          mode="max", save_top_k=1, auto_insert_metric_name=False, **checkpoint_kwargs)
    last = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="last", monitor=None)
    trainer = L.Trainer(max_epochs=max_epochs or len(scores), callbacks=[best, last], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(ScriptedScores(scores), data, data, ckpt_path=ckpt_path)
    return best


SCORES = [(0.5, 1.0), (0.9, 0.5), (0.9, 0.3), (0.9, 0.4), (0.8, 0.1)]


def test_a_tie_goes_to_the_lower_validation_loss(tmp_path):
    best = _fit(tmp_path, SCORES, tie_break="val/loss")
    assert best.best_model_path.endswith("epoch002.ckpt")  # 0.9 at loss 0.3, not the first 0.9 (epoch 1)
    assert float(best.best_model_score) == pytest.approx(0.9)
    assert best.best_tie_value == pytest.approx(0.3)
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["epoch002.ckpt", "last.ckpt"]


def test_without_a_tie_break_the_first_of_equal_scores_stays(tmp_path):
    best = _fit(tmp_path, SCORES)
    assert best.best_model_path.endswith("epoch001.ckpt")


def test_a_resumed_run_keeps_its_best_epoch_and_its_tie_break(tmp_path):
    scores = [(0.5, 1.0), (0.9, 0.5), (0.9, 0.3), (0.9, 0.4), (0.9, 0.2)]
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    assert _fit(tmp_path, scores, max_epochs=3, tie_break="val/loss").best_model_path.endswith("epoch002.ckpt")
    # Epoch 3 ties at a higher loss: kept out only if the best score came back with the run.
    resumed = _fit(tmp_path, scores, max_epochs=4, ckpt_path=last, tie_break="val/loss")
    assert resumed.best_model_path.endswith("epoch002.ckpt")
    # Epoch 4 ties at a lower loss than epoch 2's: it wins only if epoch 2's loss came back too.
    resumed = _fit(tmp_path, scores, max_epochs=5, ckpt_path=last, tie_break="val/loss")
    assert resumed.best_model_path.endswith("epoch004.ckpt")
    assert resumed.best_tie_value == pytest.approx(0.2)


def test_a_run_saved_by_lightnings_model_checkpoint_resumes_with_its_best_epoch(tmp_path):
    plain = _fit(tmp_path, SCORES, max_epochs=3, checkpoint_class=L.pytorch.callbacks.ModelCheckpoint)
    assert plain.best_model_path.endswith("epoch001.ckpt")
    # Without the restored best score, epoch 3 (a tie with no known loss to beat) would become the best.
    resumed = _fit(tmp_path, SCORES, max_epochs=4, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"),
                   tie_break="val/loss")
    assert resumed.best_model_path.endswith("epoch001.ckpt")


def test_a_tie_break_needs_a_single_kept_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="tie_break='val/loss' needs save_top_k=1, not 2"):
        BestCheckpoint(dirpath=tmp_path, monitor="val/seq_acc", mode="max", save_top_k=2, tie_break="val/loss")

"""The default recipe's promise, checked for real: slow (about 5 minutes on a 2-core CPU).

    python -m pytest -m slow tests/test_convergence.py
"""

import pytest

from fastgpt.config import load_config
from fastgpt.train import DEFAULT_CONFIG, train

# configs/shakespeare_char.py promises a validation loss of 1.60 or lower.
TARGET_VAL_LOSS = 1.60


@pytest.mark.slow
def test_default_config_reaches_target_val_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/ and out-shakespeare-char/ land in the temporary folder
    cfg = load_config(str(DEFAULT_CONFIG), [])
    result = train(cfg)
    assert result.iter_num == cfg.max_iters
    assert result.losses["val"] <= TARGET_VAL_LOSS

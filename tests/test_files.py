import json

import numpy as np
import pytest

from sharp_minima import files


def test_write_json_is_atomic_and_converts_numpy(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "r.json"
    files.write_json(str(path), {"a": np.arange(3), "b": np.float64(1.5)})
    assert json.loads(path.read_text()) == {"a": [0, 1, 2], "b": 1.5}
    # A failure while writing leaves the old file intact and no temporary behind.
    with pytest.raises(TypeError):
        files.write_json(str(path), {"bad": object()})
    assert json.loads(path.read_text())["b"] == 1.5
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]

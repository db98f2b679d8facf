"""Safe loading: weights files are read as data (safetensors, torch.load with weights_only);
a TorchScript archive, which runs code, only on opt-in and with a warning; checkpoints and run
files never go through pickle."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fedpgp
from fedpgp.backbone import read_state_dict
from fedpgp.errors import BackboneError

STATE = {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.tensor([1.0, -1.0])}


def assert_state(state: dict[str, torch.Tensor]) -> None:
    assert state.keys() == STATE.keys()
    assert all(torch.equal(state[k], STATE[k]) for k in STATE)


def test_safetensors_file(tmp_path: Path) -> None:
    save_file(STATE, str(tmp_path / "w.safetensors"))
    assert_state(read_state_dict(tmp_path / "w.safetensors"))


def test_pickled_state_dict_loads_as_data(tmp_path: Path) -> None:
    torch.save({"state_dict": {f"module.{k}": v for k, v in STATE.items()}}, tmp_path / "w.pt")
    assert_state(read_state_dict(tmp_path / "w.pt"))


class Payload:
    """An object whose unpickling would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_pickle_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    torch.save({"weight": STATE["weight"], "payload": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(BackboneError, match=r"evil\.pt is not a readable CLIP weights file"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_pickle_of_non_tensors_is_refused(tmp_path: Path) -> None:
    torch.save({"weight": STATE["weight"], "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(BackboneError, match=r"mixed\.pt does not hold a dictionary of tensors"):
        read_state_dict(tmp_path / "mixed.pt")
    torch.save([STATE["weight"]], tmp_path / "list.pt")
    with pytest.raises(BackboneError, match=r"list\.pt does not hold a dictionary of tensors"):
        read_state_dict(tmp_path / "list.pt")


@pytest.fixture
def torchscript_file(tmp_path: Path) -> Path:
    linear = torch.nn.Linear(3, 2)
    with torch.no_grad():
        linear.weight.copy_(STATE["weight"])
        linear.bias.copy_(STATE["bias"])
    path = tmp_path / "openai.pt"
    with pytest.warns(FutureWarning):  # torch deprecates TorchScript; the archive is what matters
        torch.jit.save(torch.jit.script(linear), str(path))
    return path


def test_torchscript_is_refused_unless_allowed(torchscript_file: Path) -> None:
    message = r"openai\.pt is a TorchScript archive.*set backbone\.allow_torchscript=true"
    with pytest.raises(BackboneError, match=message):
        read_state_dict(torchscript_file)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_loads_on_opt_in_with_a_warning(torchscript_file: Path) -> None:
    with pytest.warns(UserWarning, match=r"loading TorchScript .*openai\.pt: this executes code"):
        assert_state(read_state_dict(torchscript_file, allow_torchscript=True))


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """(the called name as written, the call) for every call in ``tree``."""
    return [(ast.unparse(n.func), n) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_no_module_loads_pickles_unsafely() -> None:
    """Every torch.load passes weights_only=True; torch.jit.load is only reached behind the
    opt-in in backbone.weights.read_state_dict; nothing calls pickle.load(s) or np.load with
    pickles."""
    package = Path(fedpgp.__file__).parent
    jit_loads = []
    for path in sorted(package.rglob("*.py")):
        for name, call in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(package)}:{call.lineno}"
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords}
            if name == "torch.load":
                assert keywords.get("weights_only") == "True", where
            elif name == "torch.jit.load":
                jit_loads.append(where)
            elif name in ("np.load", "numpy.load"):
                assert keywords.get("allow_pickle", "False") == "False", where
            else:
                assert name not in ("pickle.load", "pickle.loads"), where
    assert [w.split(":")[0] for w in jit_loads] == ["backbone/weights.py"]

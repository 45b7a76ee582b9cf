"""The lock pins every dependency exactly, and a different oracle version is named."""
import ml_dtypes
import pytest

from lockfile import LOCK, locked_version, locked_versions, oracle_version_problem

DIRECT = ["torch", "numpy", "ml_dtypes", "hypothesis", "pytest", "scikit-learn",
          "matplotlib", "tqdm", "torchao", "transformers", "lightning", "tensorboard",
          "setuptools", "wheel"]


@pytest.mark.parametrize("name", DIRECT)
def test_every_direct_dependency_is_pinned_exactly(name):
    assert locked_version(name), f"{name} is not pinned in {LOCK.name}"


def test_installed_ml_dtypes_is_the_locked_one():
    assert oracle_version_problem("ml_dtypes", ml_dtypes.__version__) is None


def test_another_oracle_version_gets_one_message_naming_both():
    locked = locked_version("ml_dtypes")
    msg = oracle_version_problem("ml_dtypes", "0.6.0" if locked != "0.6.0" else "0.5.1")
    assert msg is not None and locked in msg
    assert "0.6.0" in msg or "0.5.1" in msg
    assert "constraints.txt" in msg


def test_lock_parses_every_pin_line():
    lines = [l for l in LOCK.read_text().splitlines() if l and not l.startswith("#")]
    assert len(locked_versions()) == len(lines)
    assert all("==" in l for l in lines)

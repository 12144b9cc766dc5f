"""Fixtures several test files share."""
import pytest

from phantom import write_phantom


@pytest.fixture(scope="session")
def tiny_acdc(tmp_path_factory):
    """a phantom of 12 patients at tiny sizes: test 1 and 11, val 2 and 12, train the other 8"""
    root = str(tmp_path_factory.mktemp("tiny_acdc"))
    write_phantom(root, patients=12, seed=1, size_range=(40, 56), frames_range=(3, 4), slices_range=(2, 3))
    return root


@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    """5 patients: 1 test, 2 val, 3..5 train"""
    root = str(tmp_path_factory.mktemp("phantom"))
    write_phantom(root, patients=5, seed=0, size_range=(40, 56), frames_range=(4, 6), slices_range=(3, 4))
    return root

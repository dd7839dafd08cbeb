"""Handles: which ones a combine trusts without checking their tensors again."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ncclep.handles import HTHandle, LLHandle, claim, made_by


@pytest.mark.parametrize("kind", [LLHandle, HTHandle])
def test_only_the_dispatched_object_is_made_by_its_group(kind: type) -> None:
    handle = kind(*(torch.zeros(2, dtype=torch.int32) for _ in range(4)))
    assert not made_by(handle, 3)  # built from tensors
    claim(handle, 3)
    assert handle.group == 3 and made_by(handle, 3) and not made_by(handle, 4)
    assert made_by(copy.copy(handle), 3)  # the same tensors
    first = dataclasses.fields(handle)[0].name
    replaced = dataclasses.replace(handle, **{first: torch.zeros(5)})
    assert replaced.group == 3 and not made_by(replaced, 3)  # its tensors are checked again
    assert not made_by(kind(*handle.tensors(), group=3), 3)
    assert not made_by(object(), 3)

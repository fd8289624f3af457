"""static/shared_weight.py: the shared weight once in a state dict (and under every name for FSDP1),
reloaded from whichever name holds it; the layers using it counted however they were made."""

import copy
import io

import pytest
import torch
from helpers import Stacked, own_layer, random_pairs
from torch import nn

import lors_kernels as lk


def test_layers_sharing_a_weight_are_counted_however_they_were_made():
    """Writes and merge() need the layer to be the only one on its shared weight: copies, deep copies,
    pickles, replaced and dropped layers all keep the count right."""
    layer = own_layer()
    twin = copy.copy(layer)  # shares the layer's modules, its shared weight among them
    assert twin.shared is layer.shared and layer.shared.n_layers == 2
    with pytest.raises(RuntimeError, match="shared weight of 2 layers"):
        layer.weight.data.zero_()
    del twin
    assert layer.shared.n_layers == 1
    stack = lk.make_lors_stack(3, 6, 4, rank=2)
    alone = copy.deepcopy(stack[0])  # with its own copy of the shared weight
    assert alone.shared.n_layers == 1 and stack[0].shared.n_layers == 3
    alone.weight.data.zero_()
    assert not alone.effective_weight().any()
    buffer = io.BytesIO()
    torch.save(stack, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(stack), torch.load(buffer, weights_only=False)):
        assert copied[2].shared is copied[0].shared and copied[0].shared.n_layers == 3
    stack[2].shared = lk.SharedWeight(6, 4)
    assert stack[0].shared.n_layers == 2 and stack[2].shared.n_layers == 1
    first = stack[0]
    del stack, copied
    assert first.shared.n_layers == 1
    first.merge()  # the dropped layers no longer hold it back


def test_state_dict_holds_the_shared_weight_once_and_reloads():
    torch.manual_seed(0)
    model = random_pairs(Stacked())
    sd = model.state_dict()
    shared = [k for k in sd if k.endswith("shared.weight")]
    assert shared == ["blocks.0.shared.weight", "heads.0.shared.weight"]
    for stack in (model.blocks, model.heads):  # each shared tensor once (model.alias repeats heads.1's own)
        assert sum(v.data_ptr() == stack[0].shared.weight.data_ptr() for v in sd.values()) == 1
    x = torch.randn(4, 8)
    moved = dict(sd)  # the shared weight under a later layer's name: found all the same
    moved["blocks.2.shared.weight"] = moved.pop("blocks.0.shared.weight")
    old = dict(sd, **{f"blocks.{i}.shared.weight": sd["blocks.0.shared.weight"] for i in (1, 2)})
    for seed, checkpoint in enumerate((sd, moved, old)):  # old: named once per layer, as before
        torch.manual_seed(seed + 1)
        clone = Stacked()
        assert clone.load_state_dict(checkpoint, strict=False) == ([], []), seed  # nothing missing or unexpected
        torch.testing.assert_close(clone(x), model(x))
        assert clone.blocks[2].shared is clone.blocks[0].shared
    assert "shared.weight" in model.blocks[2].state_dict()  # a part on its own keeps its shared weight
    del moved["blocks.2.shared.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key.*blocks.0.shared.weight.*blocks.1.shared.weight"):
        Stacked().load_state_dict(moved)


def test_a_state_dict_taken_during_another_leaves_it_whole():
    model = random_pairs(Stacked())
    inner = {}
    model.blocks[0].register_state_dict_post_hook(
        lambda module, state_dict, prefix, metadata: inner.update(model.blocks[2].state_dict())
    )
    sd = model.state_dict()
    assert [k for k in sd if k.endswith("shared.weight")] == ["blocks.0.shared.weight", "heads.0.shared.weight"]
    assert "shared.weight" in inner


@pytest.mark.filterwarnings("ignore::FutureWarning")  # FSDP1 is deprecated in favour of FSDP2
@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")  # one process
@pytest.mark.filterwarnings("ignore:When using ``NO_SHARD`` for ``ShardingStrategy``")
@pytest.mark.parametrize("use_orig_params", [True, False])
def test_fsdp1_full_state_dict(one_process_group, use_orig_params):
    """FSDP1 requires every parameter name in its state dict: there the shared weight appears under
    each layer's name, as a tied weight does, and such a checkpoint loads anywhere."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    torch.manual_seed(0)
    model = random_pairs(nn.Sequential(*lk.make_lors_stack(3, 8, 8, rank=2), nn.Linear(8, 3)))
    x = torch.randn(4, 8)
    y = model(x)
    wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=use_orig_params)
    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT):
        sd = wrapped.state_dict()
    assert [k for k in sd if k.endswith("shared.weight")] == [f"{i}.shared.weight" for i in range(3)]
    torch.manual_seed(1)
    clone = FSDP(
        nn.Sequential(*lk.make_lors_stack(3, 8, 8, rank=2), nn.Linear(8, 3)),
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
    )
    with FSDP.state_dict_type(clone, StateDictType.FULL_STATE_DICT):
        clone.load_state_dict(sd)
    torch.testing.assert_close(clone(x), y)
    plain = nn.Sequential(*lk.make_lors_stack(3, 8, 8, rank=2), nn.Linear(8, 3))
    plain.load_state_dict(sd)
    torch.testing.assert_close(plain(x), y)

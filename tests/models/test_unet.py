"""The ADM UNet: shapes, parameter count and module names of the reference layout, attention checks."""

import pytest
import torch

from loomcfm_core.errors import UsageError
from loomcfm_core.models.unet import AttentionBlock, UNetModel


@pytest.mark.parametrize("channels, resolution, mult, attn", [
    (1, 8, [1, 2], [4]),
    (3, 32, [1, 2, 2], [16, 8]),
    (4, 16, [2, 2], []),          # channel_mult[0] > 1: ADM widens the first conv too
])
def test_output_has_the_input_shape(channels, resolution, mult, attn):
    model = UNetModel(channels, resolution, 32, mult, 1, attn, num_head_channels=32)
    x = torch.randn(3, channels, resolution, resolution)
    assert model(x, torch.rand(3)).shape == x.shape


def test_parameter_count_of_the_smallest_network():
    """in 1x8x8, 32 channels, one level, one res block, no attention but the middle block's (32-channel heads).

    time_embed 32*128+128 + 128*128+128 = 20736; input conv 1*32*9+32 = 320; a 32->32 ResBlock: 2 GroupNorms
    of 64, 2 convs of 9248, emb Linear(128, 32) 4128 = 22752 (one in the input blocks, two in the middle);
    middle attention: GroupNorm 64, qkv 32*96+96 = 3168, proj 32*32+32 = 1056 = 4288; two output ResBlocks
    64->32: GroupNorm(64) 128, conv 18464, emb 4128, GroupNorm 64, conv 9248, skip 1x1 2080 = 34112 each;
    out: GroupNorm 64, conv 32*9+1 = 289.
    """
    model = UNetModel(1, 8, 32, [1], 1, [], num_head_channels=32)
    expected = 20736 + 320 + 22752 + (2 * 22752 + 4288) + 2 * 34112 + (64 + 289)
    assert sum(p.numel() for p in model.parameters()) == expected == 162177


def test_module_names_follow_the_reference_layout():
    """The reference's checkpoints load by name (after stripping ``backbone.``): these names must exist."""
    names = set(UNetModel(3, 32, 32, [1, 2], 1, [16], num_head_channels=32).state_dict())
    for name in ("time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight",
                 "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.emb_layers.1.weight",
                 "input_blocks.1.0.out_layers.3.weight", "input_blocks.3.1.qkv.weight",
                 "input_blocks.3.1.proj_out.weight", "input_blocks.2.0.op.weight",
                 "input_blocks.3.0.skip_connection.weight", "middle_block.1.norm.weight",
                 "output_blocks.1.2.conv.weight", "out.0.weight", "out.2.weight"):
        assert name in names, name


def test_a_fresh_network_outputs_zero_and_takes_a_scalar_time():
    torch.manual_seed(0)
    model = UNetModel(1, 8, 32, [1, 2], 1, [4], num_head_channels=32).eval()
    x = torch.randn(5, 1, 8, 8)
    assert torch.count_nonzero(model(x, torch.rand(5))) == 0, "the last conv starts at zero"
    for p in model.parameters():  # leave the zero start: residual branches (where t enters) count now
        torch.nn.init.normal_(p, std=0.05)
    torch.testing.assert_close(model(x, torch.tensor(0.3)), model(x, torch.full((5,), 0.3)))
    assert not torch.allclose(model(x, torch.full((5,), 0.1)), model(x, torch.full((5,), 0.9))), "depends on t"


def test_attention_needs_whole_heads():
    assert AttentionBlock(64, 32).num_heads == 2
    with pytest.raises(UsageError, match=r"model.num_head_channels=32 does not divide the attention width 48"):
        AttentionBlock(48, 32)
    with pytest.raises(UsageError, match="does not divide the attention width 32"):  # the middle block attends at 32
        UNetModel(1, 8, 32, [1], 1, [], num_head_channels=64)

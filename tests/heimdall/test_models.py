"""Networks: the seed's shape contract, invariances, geography, configs and exportability."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from heimdall.errors import ConfigError
from heimdall.geometry import LocalFrame, default_frame
from heimdall.models import (
    GeographicOutput,
    LocalizationNet,
    ReceiverSetNet,
    ResNetConfig,
    SetNetConfig,
    TargetScaling,
    build_model,
    decode_head,
    local_to_geographic_torch,
    model_config_from_dict,
)

SMALL_SET = SetNetConfig(encoder_channels=(4, 8), embed_dim=16, n_heads=2, n_layers=1, head_hidden=16)


def _features(b: int = 4, r: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, r, 128, 32, generator=torch.Generator().manual_seed(seed))


def test_seed_contract_three_receivers_four_outputs():
    net = LocalizationNet(in_channels=3)
    net.eval()
    x = _features(4, 3)
    assert net(x).shape == (4, 4)
    geo = GeographicOutput(net)(x)
    assert geo.shape == (4, 4)
    assert GeographicOutput(net).output_names == ("lat_deg", "lon_deg", "sigma_east_m", "sigma_north_m")


@pytest.mark.parametrize(
    "config",
    [
        ResNetConfig(),
        ResNetConfig(stem="mixed", pooling="max", norm="group", kernel_size=5, head="full"),
        ResNetConfig(pooling="attention", norm="layer", level_summary=False, stage_depths=(2, 1)),
        ResNetConfig(norm="none", width=8, width_multiplier=1.0, stage_depths=(1, 1, 1, 1)),
    ],
)
def test_resnet_variants_produce_their_head(config):
    net = build_model("resnet", config)
    net.eval()
    out = net(_features(2), torch.tensor([[True] * 7, [True, False] * 3 + [True]]))
    assert out.shape == (2, 5 if config.head == "full" else 4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch,config", [("resnet", ResNetConfig()), ("setnet", SMALL_SET)])
def test_masked_receivers_features_change_nothing(arch, config):
    net = build_model(arch, config)
    net.eval()
    x = _features(3)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 2] = False
    mask[1, 5] = False
    y = x.clone()
    y[:, 2] = 100.0 * torch.randn(3, 128, 32)
    y[1, 5] = -7.0
    with torch.no_grad():
        torch.testing.assert_close(net(x, mask), net(y, mask))
        assert not torch.allclose(net(x, mask), net(x))  # the mask itself does matter


def test_setnet_is_invariant_to_receiver_order():
    net = ReceiverSetNet(7, SMALL_SET)
    net.eval()
    x = _features(3)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    perm = torch.tensor([4, 0, 6, 2, 1, 5, 3])
    with torch.no_grad():
        ref = net(x, mask)
        out = net(x[:, perm], mask[:, perm], positions=net.positions[perm])
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        # Permuting features without their positions is a different network input.
        assert not torch.allclose(net(x[:, perm], mask[:, perm]), ref, atol=1e-6, rtol=1e-6)


def test_setnet_handles_a_row_heard_by_nobody():
    net = ReceiverSetNet(7, SMALL_SET)
    net.eval()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        out = net(_features(2), mask)
    assert torch.isfinite(out).all()


def test_setnet_needs_positions_for_other_networks():
    with pytest.raises(ConfigError, match="positions_km"):
        ReceiverSetNet(3, SMALL_SET)
    net = ReceiverSetNet(3, SMALL_SET, positions_km=np.array([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]]))
    assert net(_features(2, 3)).shape == (2, 4)


def test_torch_tangent_plane_inverse_matches_numpy_geometry():
    frame = default_frame()
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(-300, 300, (200, 2)), [[0.0, 0.0]]])
    lat, lon = frame.to_geographic(pts[:, 0], pts[:, 1])
    t = torch.from_numpy(pts)
    tlat, tlon = local_to_geographic_torch(t[:, 0], t[:, 1], frame.origin_lat, frame.origin_lon)
    np.testing.assert_allclose(tlat.numpy(), lat, atol=1e-9)
    np.testing.assert_allclose(tlon.numpy(), lon, atol=1e-9)
    # float32, as in the exported model: well under a meter (1e-5 deg ~ 1 m).
    tlat32, tlon32 = local_to_geographic_torch(t[:, 0].float(), t[:, 1].float(), frame.origin_lat, frame.origin_lon)
    np.testing.assert_allclose(tlat32.numpy(), lat, atol=1e-5)
    np.testing.assert_allclose(tlon32.numpy(), lon, atol=1e-5)


def test_geographic_output_returns_degrees_and_meters():
    scaling = TargetScaling(origin_lat=45.0, origin_lon=8.0, target_scale_km=80.0)
    net = build_model("resnet", ResNetConfig(head="full"))
    net.eval()
    wrapper = GeographicOutput(net, scaling, sigma_floor=0.02, rho_limit=0.9)
    x = _features(3)
    with torch.no_grad():
        out = wrapper(x).double().numpy()
        mean, sigma, rho = decode_head(net(x).double(), 0.02, 0.9)
    lat, lon = LocalFrame(45.0, 8.0).to_geographic(mean[:, 0].numpy() * 80.0, mean[:, 1].numpy() * 80.0)
    np.testing.assert_allclose(out[:, 0], lat, atol=1e-5)
    np.testing.assert_allclose(out[:, 1], lon, atol=1e-5)
    np.testing.assert_allclose(out[:, 2:4], sigma.numpy() * 80_000.0, rtol=1e-5)
    np.testing.assert_allclose(out[:, 4], rho.numpy(), atol=1e-6)
    assert wrapper.output_names[-1] == "rho" and (np.abs(out[:, 4]) < 0.9).all()


def test_fresh_network_predicts_a_sane_prior():
    net = build_model("resnet")
    net.eval()
    mean, sigma, _ = decode_head(net(_features(4)), 0.01, 0.95)
    assert mean.abs().max() < 1.0  # within 100 km of the centre
    assert ((sigma > 0.2) & (sigma < 1.5)).all()  # 20-150 km: NLL starts sane


@pytest.mark.parametrize("arch,config", [("resnet", ResNetConfig(width=8, stem_channels=2)), ("setnet", SMALL_SET)])
def test_geographic_model_exports_without_data_dependent_control_flow(arch, config):
    wrapper = GeographicOutput(build_model(arch, config)).eval()
    x, mask = _features(2), torch.ones(2, 7, dtype=torch.bool)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(wrapper, (x, mask), dynamic_shapes=({0: batch}, {0: batch}))
    x3, mask3 = _features(3, seed=5), torch.rand(3, 7) > 0.3
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x3, mask3), wrapper(x3, mask3))


def test_build_model_names_valid_architectures():
    with pytest.raises(ConfigError, match="valid names: resnet, setnet"):
        build_model("transformer")
    with pytest.raises(ConfigError, match="needs a ResNetConfig"):
        build_model("resnet", SetNetConfig())
    net = build_model("setnet", SMALL_SET.to_dict())
    assert net.arch == "setnet" and net.config == SMALL_SET and net.n_receivers == 7


def test_configs_list_every_problem():
    with pytest.raises(ConfigError) as err:
        ResNetConfig(stage_depths=(), kernel_size=4, norm="instance", pooling="sum", stem="deep", head="triangle", dropout=1.0)
    assert len(err.value.problems) == 7
    with pytest.raises(ConfigError) as err:
        SetNetConfig(embed_dim=30, n_heads=4, n_queries=0, position_scale_km=0.0)
    assert len(err.value.problems) == 3


def test_configs_roundtrip_through_dicts():
    for arch, cfg in (("resnet", ResNetConfig(stage_depths=(2, 1), head="full")), ("setnet", SMALL_SET)):
        assert model_config_from_dict(arch, cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key 'depth'"):
        ResNetConfig.from_dict({"depth": 3})
    scaling = TargetScaling(target_scale_km=50.0)
    assert TargetScaling.from_dict(scaling.to_dict()) == scaling
    assert TargetScaling().origin_lat == pytest.approx(default_frame().origin_lat)
    with pytest.raises(ConfigError):
        TargetScaling(target_scale_km=-1.0, origin_lat=95.0)
    assert math.isclose(ResNetConfig().level_sharpness, math.log(10) / 10 * 20)
